"""Cells' cgroups: limits in cgroup v2 terms, enforced through a v1 or v2 backend.

Knows nothing of gRPC: services translate API messages into CgroupLimits and these errors into
status codes.
"""

from auraed.kernel.cgroups.base import CgroupBackend, CgroupMetrics, CgroupUsage
from auraed.kernel.cgroups.detect import detect_backend
from auraed.kernel.cgroups.errors import (
    CgroupBusy,
    CgroupError,
    CgroupExists,
    CgroupNotFound,
    InvalidLimit,
    LimitRefused,
    UnsafePath,
    UnsupportedLimit,
)
from auraed.kernel.cgroups.limits import (
    CgroupLimits,
    shares_to_weight,
    validate,
    weight_to_shares,
)
from auraed.kernel.cgroups.v1 import CgroupV1Backend
from auraed.kernel.cgroups.v2 import CgroupV2Backend

__all__ = [
    "CgroupBackend",
    "CgroupBusy",
    "CgroupError",
    "CgroupExists",
    "CgroupLimits",
    "CgroupMetrics",
    "CgroupNotFound",
    "CgroupUsage",
    "CgroupV1Backend",
    "CgroupV2Backend",
    "InvalidLimit",
    "LimitRefused",
    "UnsafePath",
    "UnsupportedLimit",
    "detect_backend",
    "shares_to_weight",
    "validate",
    "weight_to_shares",
]
