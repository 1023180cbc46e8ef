"""aurae.vms.v0.VmService on the runtime's VirtualMachines."""

from __future__ import annotations

import grpc

from aurae_sdk.wire.generated.pb.vms import vms_pb2 as pb
from auraed.errors import InvalidArgument
from auraed.generated.vms import VmServiceBase
from auraed.runtime.names import parse_labels
from auraed.runtime.vms import (
    DEFAULT_MEMORY_MB,
    DEFAULT_VCPUS,
    DriveSpec,
    MachineSpec,
    VirtualMachines,
)
from auraed.validation import blamed


def machine_spec(request: pb.VmServiceAllocateRequest) -> MachineSpec:
    if not request.HasField("machine"):
        raise InvalidArgument("a machine is required", field="machine")
    machine = request.machine
    with blamed("machine.labels"):
        labels = parse_labels(dict(machine.labels))
    if machine.auraed_address:
        # The guest's address is the daemon's to choose (its TAP); a request cannot pick one.
        raise InvalidArgument("auraed_address is set by the daemon at Start; leave it empty",
                              field="machine.auraed_address")
    return MachineSpec(
        id=machine.id,
        mem_size_mb=machine.mem_size_mb or DEFAULT_MEMORY_MB,
        vcpu_count=machine.vcpu_count or DEFAULT_VCPUS,
        kernel_img_path=machine.kernel_img_path,
        kernel_args=tuple(machine.kernel_args),
        root_drive=machine.root_drive.image_path,
        root_read_only=machine.root_drive.read_only,
        drive_mounts=tuple(DriveSpec(d.image_path, d.vm_path, d.fs_type, d.read_only)
                           for d in machine.drive_mounts),
        labels=labels,
    )


class VmService(VmServiceBase):
    def __init__(self, machines: VirtualMachines) -> None:
        self.machines = machines

    def allocate(self, request: pb.VmServiceAllocateRequest,
                 context: grpc.ServicerContext) -> pb.VmServiceAllocateResponse:
        vm = self.machines.allocate(machine_spec(request))
        return pb.VmServiceAllocateResponse(vm_id=vm.spec.id)

    def free(self, request: pb.VmServiceFreeRequest,
             context: grpc.ServicerContext) -> pb.VmServiceFreeResponse:
        self.machines.free(request.vm_id)
        return pb.VmServiceFreeResponse()

    def start(self, request: pb.VmServiceStartRequest,
              context: grpc.ServicerContext) -> pb.VmServiceStartResponse:
        return pb.VmServiceStartResponse(auraed_address=self.machines.start_machine(request.vm_id))

    def stop(self, request: pb.VmServiceStopRequest,
             context: grpc.ServicerContext) -> pb.VmServiceStopResponse:
        self.machines.stop_machine(request.vm_id)
        return pb.VmServiceStopResponse()

    def list(self, request: pb.VmServiceListRequest,
             context: grpc.ServicerContext) -> pb.VmServiceListResponse:
        summaries = []
        for vm in self.machines.list():
            spec = vm.spec
            status, detail = self.machines.status_of(vm)
            summaries.append(pb.VirtualMachineSummary(
                id=spec.id,
                status=status,
                mem_size_mb=spec.mem_size_mb,
                vcpu_count=spec.vcpu_count,
                kernel_img_path=spec.kernel_img_path or vm.kernel or self.machines.default_kernel(),
                root_dir_path=spec.root_drive,
                auraed_address=vm.address,
                accelerator=vm.accelerator,
                stop_reason=vm.stop_reason,
                labels=dict(spec.labels),
                status_detail=detail,
            ))
        return pb.VmServiceListResponse(machines=summaries)
