"""Wire compatibility with public Aurae v0, checked byte by byte.

The expected bytes are written out by hand from the field numbers and types
of the public definitions (tag = field_number << 3 | wire_type), so a
renumbered or retyped field in proto/ fails here.
"""

from __future__ import annotations

import pytest
from google.protobuf.message import Message

from aurae_sdk import cells, discovery, health, observe, vms

CASES: list[tuple[str, Message, bytes]] = [
    (
        "Allocate: cell{name, cpu{weight}}",
        cells.CellServiceAllocateRequest(cell=cells.Cell(name="ab", cpu=cells.CpuController(weight=2))),
        # 0a 08: field 1 (cell), 8 bytes; inside: 0a 02 "ab" (name), 12 02 08 02 (cpu{weight=2})
        bytes.fromhex("0a08" "0a026162" "12020802"),
    ),
    (
        "Cell isolation flags are fields 10 and 11",
        cells.Cell(isolate_process=True, isolate_network=True),
        bytes.fromhex("5001" "5801"),
    ),
    (
        "Cell cpuset and memory are fields 3 and 4; memory.max is an int64",
        cells.Cell(cpuset=cells.CpusetController(cpus="0-1"), memory=cells.MemoryController(max=-1)),
        bytes.fromhex("1a05" "0a03302d31" "220b" "20ffffffffffffffffff01"),
    ),
    (
        "Start: optional uid/gid keep presence even at zero",
        cells.CellServiceStartRequest(
            cell_name="c", executable=cells.Executable(name="e", command="true"), uid=0, gid=0
        ),
        bytes.fromhex("0a0163" "1209" "0a0165" "120474727565" "1800" "2000"),
    ),
    (
        "Executable description is field 4 (3 is unused)",
        cells.Executable(description="d"),
        bytes.fromhex("220164"),
    ),
    (
        "Start response: pid int32, uid/gid uint32",
        cells.CellServiceStartResponse(pid=300, uid=1, gid=2),
        bytes.fromhex("08ac02" "1001" "1802"),
    ),
    (
        "Stop: optional cell_name 1, executable_name 2",
        cells.CellServiceStopRequest(cell_name="c", executable_name="e"),
        bytes.fromhex("0a0163" "120165"),
    ),
    (
        "Allocate response: cell_name, cgroup_v2",
        cells.CellServiceAllocateResponse(cell_name="c", cgroup_v2=True),
        bytes.fromhex("0a0163" "1001"),
    ),
    (
        "List response: repeated CellGraphNode{cell, children}",
        cells.CellServiceListResponse(
            cells=[cells.CellGraphNode(cell=cells.Cell(name="a"), children=[cells.CellGraphNode()])]
        ),
        bytes.fromhex("0a07" "0a03" "0a0161" "1200"),
    ),
    (
        "Discover response: healthy bool 1, version string 2",
        discovery.DiscoverResponse(healthy=True, version="1"),
        bytes.fromhex("0801" "120131"),
    ),
    (
        "GetSubProcessStream: channel_type enum 1, process_id int32 2",
        observe.GetSubProcessStreamRequest(channel_type=observe.LOG_CHANNEL_TYPE_STDERR, process_id=42),
        bytes.fromhex("0802" "102a"),
    ),
    (
        "LogItem: channel 1, line 2, timestamp int64 3",
        observe.LogItem(channel="a", line="b", timestamp=1),
        bytes.fromhex("0a0161" "120162" "1801"),
    ),
    (
        "Signals: workload{type, id}, Signal{signal, process_id}",
        observe.GetPosixSignalsStreamRequest(
            workload=observe.Workload(workload_type=observe.WORKLOAD_TYPE_CELL, id="c")
        ),
        bytes.fromhex("0a05" "0801" "120163"),
    ),
    (
        "Signal",
        observe.Signal(signal=15, process_id=7),
        bytes.fromhex("080f" "1007"),
    ),
    (
        "VirtualMachine: scalars, repeated kernel_args, root_drive, drive_mounts",
        vms.VirtualMachine(
            id="v", mem_size_mb=512, vcpu_count=2, kernel_img_path="k", kernel_args=["x", "y"],
            root_drive=vms.RootDrive(image_path="r", read_only=True),
            drive_mounts=[vms.DriveMount(image_path="i", vm_path="/m", fs_type="e", read_only=True)],
            auraed_address="a",
        ),
        bytes.fromhex(
            "0a0176" "108004" "1802" "22016b" "2a0178" "2a0179" "3205" "0a0172" "1001"
            "3a0c" "0a0169" "12022f6d" "1a0165" "2001" "420161"
        ),
    ),
    (
        "VirtualMachineSummary: status 2, root_dir_path 6",
        vms.VirtualMachineSummary(id="v", status="Running", root_dir_path="p"),
        bytes.fromhex("0a0176" "120752756e6e696e67" "320170"),
    ),
    (
        "Health check response: status enum 1",
        health.HealthCheckResponse(status=health.HealthCheckResponse.SERVING),
        bytes.fromhex("0801"),
    ),
]


@pytest.mark.parametrize("message,expected", [(m, b) for _, m, b in CASES], ids=[c[0] for c in CASES])
def test_serialises_to_the_public_wire_bytes(message: Message, expected: bytes) -> None:
    assert message.SerializeToString(deterministic=True) == expected
    # And reads back from them unchanged.
    assert type(message).FromString(expected) == message


def test_our_health_proto_matches_the_runtime_module() -> None:
    """proto/grpc/health/v1/health.proto is served through grpcio-health-checking's
    module; every message, field and method we declare must exist there
    with the same number and type."""
    from pathlib import Path

    from grpc_health.v1 import health_pb2

    from codegen.protoc import run_protoc

    root = Path(__file__).resolve().parents[1] / "proto"
    (ours,) = [f for f in run_protoc(root, ["grpc/health/v1/health.proto"]).descriptors.file
               if f.name == "grpc/health/v1/health.proto"]
    runtime = health_pb2.DESCRIPTOR
    for message in ours.message_type:
        theirs = runtime.message_types_by_name[message.name]
        for field in message.field:
            other = theirs.fields_by_name[field.name]
            assert (other.number, other.type) == (field.number, field.type), field.name
    service = runtime.services_by_name["Health"]
    for method in ours.service[0].method:
        other = service.methods_by_name[method.name]
        assert other.input_type.full_name == method.input_type.lstrip(".")
        assert other.output_type.full_name == method.output_type.lstrip(".")
