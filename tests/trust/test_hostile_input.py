"""Hostile input: a corpus of bad requests for every RPC, sent as raw bytes.

Each case names the exact status and, where the daemon blames one, the
request field; and each must leave the host as it found it: no cgroup
directory and no process appears under (or vanishes from) the daemon's root.

VmService refuses hostile machines at Allocate (before any cell or file is
made) and unknown ids with NOT_FOUND; this daemon has no CA key, so it could
boot no guest anyway.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2

import aurae_sdk
from aurae_sdk.errors import blamed_field
from aurae_sdk.wire.generated.pb.cells.cells_pb2 import (
    Cell,
    CellServiceAllocateRequest,
    CellServiceFreeRequest,
    CellServiceStartRequest,
    CellServiceStopRequest,
    CellServiceWaitRequest,
    CpuController,
    CpusetController,
    Executable,
    MemoryController,
)
from aurae_sdk.wire.generated.pb.observe import observe_pb2 as observe
from aurae_sdk.wire.generated.pb.vms import vms_pb2 as vms
from tests.support.daemon import DaemonProcess, cgroup_dirs

from .conftest import host_state, record_figure

CELLS = "/aurae.cells.v0.CellService/"
OBSERVE = "/aurae.observe.v0.ObserveService/"
VMS = "/aurae.vms.v0.VmService/"
HEALTH = "/grpc.health.v1.Health/"
DISCOVER = "/aurae.discovery.v0.DiscoveryService/Discover"
STREAMING = {OBSERVE + "GetAuraeDaemonLogStream", OBSERVE + "GetSubProcessStream",
             OBSERVE + "GetPosixSignalsStream", HEALTH + "Watch"}
EVERY_METHOD = [CELLS + m for m in ("Allocate", "Free", "Start", "Stop", "List", "Wait")] + [
    DISCOVER, *sorted(STREAMING - {HEALTH + "Watch"}),
    *(VMS + m for m in ("Allocate", "Free", "Start", "Stop", "List")),
    HEALTH + "Check", HEALTH + "Watch"]

# An existing cell, so cases can aim at things inside it.
CORPUS_CELL = "corpus"
OVERSIZED = 5 * 1024 * 1024  # over the daemon's 4 MiB limit
INVALID = "INVALID_ARGUMENT"
STREAM_PATIENCE = 1.0


@dataclass(frozen=True)
class Case:
    id: str
    method: str
    request: Message | bytes
    code: str
    field: str | None = None


def allocate(name: str = "hostile", **limits: Message) -> CellServiceAllocateRequest:
    return CellServiceAllocateRequest(cell=Cell(name=name, **limits))  # type: ignore[arg-type]


def start(name: str = "x", command: str = "true", cell: str | None = CORPUS_CELL,
          **ids: int) -> CellServiceStartRequest:
    return CellServiceStartRequest(cell_name=cell, executable=Executable(name=name,
                                                                           command=command), **ids)


BAD_CELL_NAMES = {
    "empty": "", "dot": ".", "dotdot": "..", "dotdot-inside": "a/../b", "dot-first": "./a",
    "dot-last": "a/.", "absolute": "/a", "trailing-slash": "a/", "double-slash": "a//b",
    "underscore-first": "_x", "underscore": "a_b", "host-leaf": "_host", "procs-leaf": "a/_procs",
    "dash-first": "-a", "dash-last": "a-", "64-chars": "x" * 64, "64-chars-nested": "a/" + "x" * 64,
    "254-chars": "/".join(["x" * 63] * 4) + "x", "17-deep": "/".join("a" * 17), "non-ascii": "café",
    "fullwidth": "ｗｅｂ", "nul": "a\0b", "newline": "web\n", "space": "a b", "uppercase": "Web",
    "cgroup-procs": "cgroup.procs", "memory-max": "memory.max", "tasks": "tasks",
    "nested-tasks": "a/tasks", "cpu-shares": "cpu.shares", "rtl-override": "a\u202eb",
}

CASES: list[Case] = [
    # --- CellService/Allocate: names, then limits out of range -------------------------------
    *(Case(f"allocate-name-{key}", CELLS + "Allocate", allocate(name), INVALID, "cell.name")
      for key, name in BAD_CELL_NAMES.items()),
    Case("allocate-parent-missing", CELLS + "Allocate", allocate("nowhere/child"), "NOT_FOUND",
         "cell.name"),
    Case("allocate-existing", CELLS + "Allocate", allocate(CORPUS_CELL), "ALREADY_EXISTS",
         "cell.name"),
    *(Case(f"allocate-{key}", CELLS + "Allocate", allocate(**{controller: message}), INVALID,
           f"cell.{field}")
      for key, controller, message, field in [
          ("weight-0", "cpu", CpuController(weight=0), "cpu.weight"),
          ("weight-10001", "cpu", CpuController(weight=10001), "cpu.weight"),
          ("weight-max-u64", "cpu", CpuController(weight=2**64 - 1), "cpu.weight"),
          ("quota-negative", "cpu", CpuController(max=-5), "cpu.max"),
          ("quota-min-i64", "cpu", CpuController(max=-(2**63)), "cpu.max"),
          ("quota-zero", "cpu", CpuController(max=0), "cpu.max"),
          ("quota-below-1ms", "cpu", CpuController(max=999), "cpu.max"),
          ("quota-over-kernel-max", "cpu", CpuController(max=2**44), "cpu.max"),
          ("period-zero", "cpu", CpuController(period=0), "cpu.period"),
          ("period-below-1ms", "cpu", CpuController(period=999), "cpu.period"),
          ("period-over-1s", "cpu", CpuController(period=1_000_001), "cpu.period"),
          ("period-max-u64", "cpu", CpuController(period=2**64 - 1), "cpu.period"),
          ("cpus-empty", "cpuset", CpusetController(cpus=""), "cpuset.cpus"),
          ("cpus-open-range", "cpuset", CpusetController(cpus="0-"), "cpuset.cpus"),
          ("cpus-negative", "cpuset", CpusetController(cpus="-1"), "cpuset.cpus"),
          ("cpus-absent", "cpuset", CpusetController(cpus=str(os.cpu_count() or 1)),
           "cpuset.cpus"),
          ("cpus-99", "cpuset", CpusetController(cpus="99"), "cpuset.cpus"),
          ("cpus-huge-range", "cpuset", CpusetController(cpus="0-" + "9" * 40), "cpuset.cpus"),
          ("cpus-backwards", "cpuset", CpusetController(cpus="1-0"), "cpuset.cpus"),
          ("cpus-letters", "cpuset", CpusetController(cpus="a"), "cpuset.cpus"),
          ("cpus-empty-item", "cpuset", CpusetController(cpus="0,,1"), "cpuset.cpus"),
          ("cpus-space", "cpuset", CpusetController(cpus="0 1"), "cpuset.cpus"),
          ("cpus-newline", "cpuset", CpusetController(cpus="0\n"), "cpuset.cpus"),
          ("mems-absent", "cpuset", CpusetController(mems="7"), "cpuset.mems"),
          ("mems-empty", "cpuset", CpusetController(mems=""), "cpuset.mems"),
          ("memory-max-negative", "memory", MemoryController(max=-1), "memory.max"),
          ("memory-max-min-i64", "memory", MemoryController(max=-(2**63)), "memory.max"),
          ("memory-low-negative", "memory", MemoryController(low=-1), "memory.low"),
          ("memory-min-negative", "memory", MemoryController(min=-1), "memory.min"),
          ("memory-high-negative", "memory", MemoryController(high=-1), "memory.high"),
      ]),
    # In range, but too small for the kernel to charge even the cell's own cgroups to.
    Case("allocate-memory-max-1-byte", CELLS + "Allocate",
         allocate(memory=MemoryController(max=1)), "FAILED_PRECONDITION", "cell.memory.max"),
    # Valid everywhere, but this host's cgroup v1 cannot enforce it.
    Case("allocate-memory-high-on-v1", CELLS + "Allocate",
         allocate(memory=MemoryController(high=1 << 20)), "FAILED_PRECONDITION",
         "cell.memory.high"),
    # --- CellService/Free ------------------------------------------------------------------
    *(Case(f"free-{key}", CELLS + "Free", CellServiceFreeRequest(cell_name=name), INVALID,
           "cell_name")
      for key, name in [("empty", ""), ("dotdot", ".."), ("escape", "../etc"),
                        ("host-leaf", "_host"), ("procs-leaf", f"{CORPUS_CELL}/_procs"),
                        ("control-file", "cgroup.procs"), ("tasks", f"{CORPUS_CELL}/tasks"),
                        ("uppercase", "CORPUS"), ("nul", "\0"), ("64-chars", "x" * 64)]),
    Case("free-unknown", CELLS + "Free", CellServiceFreeRequest(cell_name="ghost"), "NOT_FOUND",
         "cell_name"),
    # --- CellService/Start -----------------------------------------------------------------
    *(Case(f"start-cell-{key}", CELLS + "Start", start(cell=name), INVALID, "cell_name")
      for key, name in [("dotdot", ".."), ("host-leaf", "_host"), ("uppercase", "Corpus"),
                        ("escape", f"{CORPUS_CELL}/../.."), ("nul", "a\0")]),
    *(Case(f"start-name-{key}", CELLS + "Start", start(name=name), INVALID, "executable.name")
      for key, name in [("empty", ""), ("dotdot", ".."), ("slash", "a/b"), ("underscore", "_x"),
                        ("64-chars", "x" * 64), ("nul", "a\0"), ("non-ascii", "é"),
                        ("control-file", "cgroup.procs")]),
    *(Case(f"start-command-{key}", CELLS + "Start", start(command=command), INVALID,
           "executable.command")
      for key, command in [("empty", ""), ("blank", " \t\n"), ("nul", "true\0; reboot"),
                           ("over-128k", "true " + "x" * (128 * 1024))]),
    Case("start-uid-absent", CELLS + "Start", start(uid=2**32 - 1), INVALID, "uid"),
    Case("start-uid-unmapped", CELLS + "Start", start(uid=99_999), INVALID, "uid"),
    Case("start-gid-absent", CELLS + "Start", start(gid=99_999), INVALID, "gid"),
    Case("start-cell-unknown", CELLS + "Start", start(cell="ghost"), "NOT_FOUND", "cell_name"),
    Case("start-no-executable", CELLS + "Start", CellServiceStartRequest(), INVALID,
         "executable.name"),
    # --- CellService/Stop and Wait ---------------------------------------------------------
    *(Case(f"{verb.lower()}-{key}", CELLS + verb, request(**fields), INVALID, field)
      for verb, request in (("Stop", CellServiceStopRequest), ("Wait", CellServiceWaitRequest))
      for key, fields, field in [
          ("cell-dotdot", {"cell_name": "..", "executable_name": "x"}, "cell_name"),
          ("cell-host-leaf", {"cell_name": "_host", "executable_name": "x"}, "cell_name"),
          ("name-empty", {"cell_name": CORPUS_CELL}, "executable_name"),
          ("name-slash", {"cell_name": CORPUS_CELL, "executable_name": "../x"},
           "executable_name"),
          ("name-64-chars", {"executable_name": "x" * 64}, "executable_name"),
      ]),
    Case("stop-grace-over-10-min", CELLS + "Stop", CellServiceStopRequest(
        cell_name=CORPUS_CELL, executable_name="x", grace_period_ms=600_001), INVALID,
         "grace_period_ms"),
    Case("stop-grace-max-u32", CELLS + "Stop", CellServiceStopRequest(
        executable_name="x", grace_period_ms=2**32 - 1), INVALID, "grace_period_ms"),
    Case("stop-unknown", CELLS + "Stop", CellServiceStopRequest(
        cell_name=CORPUS_CELL, executable_name="ghost"), "NOT_FOUND", "executable_name"),
    Case("stop-cell-unknown", CELLS + "Stop", CellServiceStopRequest(
        cell_name="ghost", executable_name="x"), "NOT_FOUND", "cell_name"),
    Case("wait-unknown", CELLS + "Wait", CellServiceWaitRequest(executable_name="ghost"),
         "NOT_FOUND", "executable_name"),
    # --- ObserveService --------------------------------------------------------------------
    *(Case(f"subprocess-{key}", OBSERVE + "GetSubProcessStream",
           observe.GetSubProcessStreamRequest(**fields), code, field)
      for key, fields, code, field in [
          ("pid-zero", {}, INVALID, "process_id"),
          ("pid-negative", {"process_id": -1}, INVALID, "process_id"),
          ("pid-min-i32", {"process_id": -(2**31)}, INVALID, "process_id"),
          ("channel-unknown", {"process_id": 1, "channel_type": 99}, INVALID, "channel_type"),
          ("channel-negative", {"process_id": 1, "channel_type": -1}, INVALID, "channel_type"),
          ("batch-over-limit", {"process_id": 1, "max_batch_lines": 10_001}, INVALID,
           "max_batch_lines"),
          ("batch-max-u32", {"process_id": 1, "max_batch_lines": 2**32 - 1}, INVALID,
           "max_batch_lines"),
          ("pid-of-init", {"process_id": 1}, "NOT_FOUND", "process_id"),
          ("pid-max-i32", {"process_id": 2**31 - 1}, "NOT_FOUND", "process_id"),
      ]),
    *(Case(f"signals-{key}", OBSERVE + "GetPosixSignalsStream",
           observe.GetPosixSignalsStreamRequest(workload=observe.Workload(**fields)), code, field)
      for key, fields, code, field in [
          ("type-unknown", {"workload_type": 99}, INVALID, "workload.workload_type"),
          ("type-negative", {"workload_type": -7}, INVALID, "workload.workload_type"),
          ("id-without-type", {"id": "web"}, INVALID, "workload.workload_type"),
          ("cell-id-dotdot", {"workload_type": 1, "id": ".."}, INVALID, "workload.id"),
          ("cell-id-empty", {"workload_type": 1}, INVALID, "workload.id"),
          ("cell-id-host-leaf", {"workload_type": 1, "id": "_host"}, INVALID, "workload.id"),
          ("pod", {"workload_type": 2, "id": "p"}, "UNIMPLEMENTED", "workload.workload_type"),
          ("vm", {"workload_type": 3, "id": "v"}, "UNIMPLEMENTED", "workload.workload_type"),
      ]),
    # --- VmService: validated at the edge; unknown ids are not found -------------------------
    Case("vm-allocate-hostile", VMS + "Allocate", vms.VmServiceAllocateRequest(
        machine=vms.VirtualMachine(id="../../etc", mem_size_mb=2**32 - 1, vcpu_count=0,
                                   kernel_img_path="/etc/shadow", kernel_args=["\0"] * 3,
                                   root_drive=vms.RootDrive(image_path="/dev/sda"),
                                   drive_mounts=[vms.DriveMount(vm_path="/", fs_type="x")])),
         "INVALID_ARGUMENT", "machine.id"),
    *(Case(f"vm-allocate-{key}", VMS + "Allocate",
           vms.VmServiceAllocateRequest(machine=vms.VirtualMachine(id="v", **fields)),
           "INVALID_ARGUMENT", f"machine.{blamed}")
      for key, fields, blamed in (
          ("huge-memory", {"mem_size_mb": 2**32 - 1}, "mem_size_mb"),
          ("many-vcpus", {"vcpu_count": 10_000}, "vcpu_count"),
          ("nul-kernel-arg", {"kernel_args": ["\0"]}, "kernel_args"),
          ("spaced-kernel-arg", {"kernel_args": ["a b"]}, "kernel_args"),
          ("missing-kernel", {"kernel_img_path": "/nonexistent/vmlinux"}, "kernel_img_path"),
          ("relative-kernel", {"kernel_img_path": "vmlinux"}, "kernel_img_path"),
          ("device-root", {"root_drive": vms.RootDrive(image_path="/dev/sda")},
           "root_drive.image_path"),
          ("chosen-address", {"auraed_address": "[::1]:1"}, "auraed_address"),
      )),
    Case("vm-allocate-missing-root-drive", VMS + "Allocate", vms.VmServiceAllocateRequest(
        machine=vms.VirtualMachine(id="v", root_drive=vms.RootDrive(
            image_path="/nonexistent/root.ext4"))),
         "INVALID_ARGUMENT", "machine.root_drive.image_path"),
    Case("vm-allocate-root-mount", VMS + "Allocate", vms.VmServiceAllocateRequest(
        machine=vms.VirtualMachine(id="v", drive_mounts=[vms.DriveMount(
            image_path="/etc/hostname", vm_path="/", fs_type="ext4")])),
         "INVALID_ARGUMENT", "machine.drive_mounts[0].vm_path"),
    Case("vm-allocate-empty", VMS + "Allocate", vms.VmServiceAllocateRequest(),
         "INVALID_ARGUMENT", "machine"),
    *(Case(f"vm-{verb.lower()}-{key}", VMS + verb, request(vm_id=vm_id), "NOT_FOUND", "vm_id")
      for verb, request in (("Free", vms.VmServiceFreeRequest), ("Start", vms.VmServiceStartRequest),
                            ("Stop", vms.VmServiceStopRequest))
      for key, vm_id in (("escape", "../../etc"), ("nul", "\0"))),
    *(Case(f"vm-{verb.lower()}-empty", VMS + verb, request(), "INVALID_ARGUMENT", "vm_id")
      for verb, request in (("Free", vms.VmServiceFreeRequest), ("Start", vms.VmServiceStartRequest),
                            ("Stop", vms.VmServiceStopRequest))),
    Case("vm-list", VMS + "List", vms.VmServiceListRequest(), "OK"),
    # --- Health ----------------------------------------------------------------------------
    *(Case(f"health-check-{key}", HEALTH + "Check", health_pb2.HealthCheckRequest(service=name),
           "NOT_FOUND")
      for key, name in [("unknown", "no.such.Service"), ("huge", "x" * 1_000_000),
                        ("nul", "\0"), ("dotdot", "../..")]),
    # Watch of an unknown service is a stream whose first status is SERVICE_UNKNOWN.
    *(Case(f"health-watch-{key}", HEALTH + "Watch", health_pb2.HealthCheckRequest(service=name),
           "OK")
      for key, name in [("unknown", "no.such.Service"), ("nul", "\0")]),
    # --- Bytes that are no message at all, for every RPC -------------------------------------
    *(Case(f"garbage-{method.strip('/').replace('/', '-')}", method, b"\xff\xff\xff\xff", INVALID)
      for method in EVERY_METHOD),
    # A string field holding invalid UTF-8 (proto3 strings must be UTF-8).
    Case("utf8-free", CELLS + "Free", b"\x0a\x02\xff\xfe", INVALID),
    Case("utf8-allocate", CELLS + "Allocate", b"\x0a\x04\x0a\x02\xc3\x28", INVALID),
    Case("utf8-health", HEALTH + "Check", b"\x0a\x01\x80", INVALID),
    # Unknown fields are legal protobuf: ignored, the request is served.
    Case("unknown-field-list", CELLS + "List", b"\xf8\x06\x01", "OK"),
    Case("unknown-field-discover", DISCOVER, b"\xf8\x06\x01", "OK"),
    Case("unknown-field-daemon-log", OBSERVE + "GetAuraeDaemonLogStream", b"\xf8\x06\x01", "OK"),
    # --- Over the 4 MiB message limit --------------------------------------------------------
    Case("oversized-allocate", CELLS + "Allocate", allocate("x" * OVERSIZED), "RESOURCE_EXHAUSTED"),
    Case("oversized-start", CELLS + "Start", start(command="x" * OVERSIZED), "RESOURCE_EXHAUSTED"),
    Case("oversized-health", HEALTH + "Check",
         health_pb2.HealthCheckRequest(service="x" * OVERSIZED), "RESOURCE_EXHAUSTED"),
    Case("oversized-vm", VMS + "Allocate", vms.VmServiceAllocateRequest(
        machine=vms.VirtualMachine(kernel_args=["x" * 1024] * 5000)), "RESOURCE_EXHAUSTED"),
]


def invoke(channel: grpc.Channel, method: str, payload: bytes) -> tuple[str, str | None]:
    """Status name and blamed field of one call with raw request bytes.

    A stream counts as served ("OK") once it yields or stays open for a while:
    refusals come at once.
    """
    try:
        if method in STREAMING:
            responses = channel.unary_stream(method)(payload, timeout=STREAM_PATIENCE)
            try:
                first = next(responses)
            except StopIteration:
                return "OK", None
            except grpc.RpcError as error:
                if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:  # type: ignore[attr-defined]
                    return "OK", None
                raise
            responses.cancel()
            if method == HEALTH + "Watch":
                status = health_pb2.HealthCheckResponse.FromString(first).status
                assert status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
        else:
            channel.unary_unary(method)(payload, timeout=10)
    except grpc.RpcError as error:
        return error.code().name, blamed_field(error.trailing_metadata())  # type: ignore[attr-defined]
    return "OK", None


@pytest.fixture(scope="module")
def corpus_client(daemon: DaemonProcess) -> Iterator[aurae_sdk.Client]:
    with daemon.client() as client:
        client.cells.allocate(cell={"name": CORPUS_CELL})
        try:
            yield client
        finally:
            client.cells.free(cell_name=CORPUS_CELL)


def test_the_corpus_covers_every_rpc() -> None:
    assert len(CASES) >= 100
    assert {case.method for case in CASES} == set(EVERY_METHOD)
    assert len({case.id for case in CASES}) == len(CASES)
    record_figure("hostile-input corpus", f"{len(CASES)} cases over {len(EVERY_METHOD)} RPCs")


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_hostile_request(daemon: DaemonProcess, corpus_client: aurae_sdk.Client,
                         case: Case) -> None:
    payload = case.request if isinstance(case.request, bytes) else case.request.SerializeToString()
    before = host_state(daemon)
    assert invoke(corpus_client.channel, case.method, payload) == (case.code, case.field)
    assert host_state(daemon) == before


def test_garbage_in_a_request_stream_is_refused(corpus_client: aurae_sdk.Client) -> None:
    # Reflection is the one method whose requests stream in; each message is parsed alike.
    reflect = corpus_client.channel.stream_stream(
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
    with pytest.raises(grpc.RpcError) as refused:
        list(reflect(iter([b"\xff\xff\xff\xff"]), timeout=10))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]


def test_nothing_was_internal(daemon: DaemonProcess, corpus_client: aurae_sdk.Client) -> None:
    assert "unexpected error" not in daemon.log()
    assert corpus_client.health.check(service="").status == health_pb2.HealthCheckResponse.SERVING


def test_a_foreign_cgroup_where_a_cell_would_go_is_refused_and_kept(
        daemon: DaemonProcess, corpus_client: aurae_sdk.Client) -> None:
    # Someone else's cgroup in one hierarchy, in the cell's place: never adopted, never removed.
    planted = cgroup_dirs(daemon.cgroup_root)[0] / "planted"
    planted.mkdir()
    try:
        with pytest.raises(aurae_sdk.FailedPrecondition) as refused:
            corpus_client.cells.allocate(cell={"name": "planted", "cpu": {"weight": 50}})
        assert refused.value.field == "cell.name"
        assert planted.is_dir()
        assert [top for top in cgroup_dirs(daemon.cgroup_root) if (top / "planted").exists()] \
            == [planted.parent]
    finally:
        planted.rmdir()
    corpus_client.cells.allocate(cell={"name": "planted"})
    corpus_client.cells.free(cell_name="planted")


def test_no_symlink_can_be_planted_in_cgroupfs(daemon: DaemonProcess) -> None:
    # cgroupfs refuses symlinks (EPERM), so on a real host nothing can stand in a cell's place
    # as a symlink. The refusal itself (O_NOFOLLOW walks) is tested on a fake tree in
    # tests/kernel/test_cgroups_v1.py::test_planted_symlink_or_file_is_refused.
    top = cgroup_dirs(daemon.cgroup_root)[0]
    with pytest.raises(PermissionError):
        os.symlink("/tmp", top / "planted-link")
    assert not os.path.lexists(top / "planted-link")
