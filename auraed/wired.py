"""The daemon's parts that auraed.server wires behind its server, imported together.

auraed.server imports this module when it wires them: after its server listens in a VM guest
(`--serve-early`: Health and Discovery answer before these ~300 modules load, which under TCG
takes seconds), before it listens everywhere else. The guest's Python layer
(auraed/kernel/guest_python.py) imports it to find what a guest loads at start.
"""

from __future__ import annotations

from google.protobuf import descriptor_pool
from grpc_reflection.v1alpha import reflection

from auraed.generated.registry import SERVICE_NAMES, SERVICES, ServiceEntry, Servicer
from auraed.images import ImageStore
from auraed.kernel.cgroups import CgroupError, detect_backend
from auraed.kernel.spawner.client import SpawnerRefused
from auraed.runtime.containers import Containers
from auraed.runtime.events import EventJournal
from auraed.runtime.instances import Instances, own_spiffe_id
from auraed.runtime.vms import VirtualMachines, VmSettings
from auraed.runtime.workloads import Workloads
from auraed.services.cells import CellService
from auraed.services.images import ImageService
from auraed.services.instances import InstanceService
from auraed.services.observe import ObserveService
from auraed.services.vms import VmService

__all__ = [
    "SERVICES", "SERVICE_NAMES", "CellService", "CgroupError", "Containers", "EventJournal",
    "ImageService", "ImageStore", "InstanceService", "Instances", "ObserveService",
    "ServiceEntry", "Servicer", "SpawnerRefused", "VirtualMachines", "VmService", "VmSettings",
    "Workloads", "descriptor_pool", "detect_backend", "own_spiffe_id", "reflection",
]
