"""Generated requests for every RPC against one running auraed.

Requests are built from the message descriptors: every field by its type
(strings mixing valid names, hostile names and random text; integers with
their boundaries and extremes; enums with unknown numbers; nested messages
and repeated fields), so a new field is exercised without editing this file.
Whatever comes in, the daemon must answer with a status a caller can act on —
never INTERNAL or UNKNOWN —, keep answering health checks SERVING, and leave
nothing behind once the test frees what it allocated.

Commands are not generated as free text: a Start that passes validation runs
its command as root, so commands come from a small harmless set (plus
strings the daemon must refuse before running anything).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import aurae_sdk
import auraed.server  # noqa: F401 - loads every served service's descriptors
from tests.support.daemon import DaemonProcess

from .conftest import host_state, record_figure

pytestmark = pytest.mark.slow

SERVICES = ["aurae.cells.v0.CellService", "aurae.discovery.v0.DiscoveryService",
            "aurae.observe.v0.ObserveService", "aurae.vms.v0.VmService", "grpc.health.v1.Health"]
# Not served by this daemon's Health (newer grpc-health protos add it).
NOT_SERVED = {"/grpc.health.v1.Health/List"}
# Statuses that mean the daemon failed rather than the request.
FORBIDDEN = {"INTERNAL", "UNKNOWN", "UNAVAILABLE", "DATA_LOSS"}
UNARY_TIMEOUT = 30.0
STREAM_TIMEOUT = 0.3  # a valid stream stays open; refusals come at once
WAIT_TIMEOUT = 2.0

# Examples per RPC: enough for thousands of requests in all, within CI's minutes.
EXAMPLES = 500
FEW_EXAMPLES = 60  # streams that stay open for STREAM_TIMEOUT when valid
SEQUENCES = 800

# --- strings ----------------------------------------------------------------------------------
CELL_POOL = ["hc-a", "hc-a/b", "hc-a/b/c", "hc-b", "0"]
EXECUTABLE_POOL = ["job", "job-2", "x"]
HOSTILE = ["", ".", "..", "../..", "a/../b", "/", "//", "a//b", "_host", "_procs", "hc-a/_procs",
           "cgroup.procs", "memory.max", "tasks", "hc-a/tasks", "x" * 64, "x" * 300, "a\0b",
           "\0", "café", "Web", "a b", "-a", "a-", "\u202e", "\n", "spiffe://td/x", "%s%n",
           "'; rm -rf / #", "🙂"]
SAFE_COMMANDS = ["true", "false", "exit 3", "echo hello", "echo oops >&2", "sleep 0.1",
                 "printf 'a\\nb\\n'", "kill -KILL $$"]
# Refused by validation before anything runs.
REFUSED_COMMANDS = ["", "   ", "\n", "true\0; reboot", "true " + "x" * (128 * 1024)]
CPU_LISTS = ["0", "1", "0-1", "0,1", "1-1", "2", "0-", "-1", "1-0", "", "0,,1", "a", "0-99"]


def names(pool: list[str]) -> st.SearchStrategy[str]:
    # Mostly from the shared pool, so generated calls meet each other's cells and executables;
    # one in ten is random text.
    listed = st.sampled_from(pool * 10 + HOSTILE)
    return st.integers(0, 9).flatmap(lambda i: st.text(max_size=12) if i == 0 else listed)


STRING_FIELDS: dict[str, st.SearchStrategy[str]] = {
    "aurae.cells.v0.Cell.name": names(CELL_POOL),
    "cell_name": names(CELL_POOL),
    "aurae.observe.v0.Workload.id": names(CELL_POOL),
    "aurae.cells.v0.Executable.name": names(EXECUTABLE_POOL),
    "executable_name": names(EXECUTABLE_POOL),
    "command": st.sampled_from(SAFE_COMMANDS * 3 + REFUSED_COMMANDS),
    "cpus": st.one_of(st.sampled_from(CPU_LISTS), st.text("0123456789-,", max_size=6)),
    "mems": st.one_of(st.sampled_from(CPU_LISTS), st.text("0123456789-,", max_size=6)),
    "service": st.one_of(st.sampled_from(["", *SERVICES, "no.such.Service"]), st.text(max_size=20)),
}

# --- integers ---------------------------------------------------------------------------------
INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
}
# Values where the daemon's limits change their answer.
BOUNDARIES = [0, 1, 2, 99, 100, 999, 1000, 4096, 10_000, 10_001, 100_000, 600_000, 600_001,
              1_000_000, 1_000_001, 1 << 20, 256 << 20, 2**31 - 1, 2**32 - 1, 2**44, 2**63 - 1]


def integers(type_: int) -> st.SearchStrategy[int]:
    low, high = INT_RANGES[type_]
    edges = [v for v in BOUNDARIES + [-v for v in BOUNDARIES] + [low, high] if low <= v <= high]
    # Small values are where most limits are valid; the full range is where overflows hide.
    return st.one_of(st.sampled_from(sorted(set(edges))), st.integers(max(low, 0), 2_000_000),
                     st.integers(low, high))


def mostly(low: int, high: int, type_: int) -> st.SearchStrategy[int]:
    """Often inside the valid range [low, high], otherwise anything the type holds."""
    inside = st.integers(low, high)
    return st.one_of(inside, inside, integers(type_))


INT_FIELDS: dict[str, st.SearchStrategy[int]] = {
    # Existing users (root, nobody) and absent ones.
    "uid": st.sampled_from([0, 65534, 1, 99_999, 2**32 - 1]),
    "gid": st.sampled_from([0, 65534, 1, 99_999, 2**32 - 1]),
    # Stop waits this long for a process ignoring SIGTERM; the safe commands do not.
    "grace_period_ms": st.one_of(st.sampled_from([0, 1, 50, 600_000, 600_001, 2**32 - 1]),
                                 st.integers(0, 2**32 - 1)),
    # Limits: biased towards what allocates, so later calls find cells to work in.
    "aurae.cells.v0.CpuController.weight": mostly(1, 10_000, FieldDescriptor.TYPE_UINT64),
    "aurae.cells.v0.CpuController.max": mostly(1_000, 2_000_000, FieldDescriptor.TYPE_INT64),
    "aurae.cells.v0.CpuController.period": mostly(1_000, 1_000_000, FieldDescriptor.TYPE_UINT64),
    "aurae.cells.v0.MemoryController.max": mostly(1, 1 << 30, FieldDescriptor.TYPE_INT64),
    "aurae.cells.v0.MemoryController.low": mostly(0, 1 << 30, FieldDescriptor.TYPE_INT64),
}


def field_strategy(fd: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    if fd.type == FieldDescriptor.TYPE_MESSAGE:
        return message_strategy(fd.message_type, depth + 1)
    if fd.type == FieldDescriptor.TYPE_STRING:
        for key in (fd.full_name, fd.name):
            if key in STRING_FIELDS:
                return STRING_FIELDS[key]
        return st.one_of(st.sampled_from(HOSTILE), st.text(max_size=40))
    if fd.type == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if fd.type == FieldDescriptor.TYPE_ENUM:
        known = [value.number for value in fd.enum_type.values]
        return st.one_of(st.sampled_from(known), st.integers(-(2**31), 2**31 - 1))
    if fd.type in INT_RANGES:
        for key in (fd.full_name, fd.name):
            if key in INT_FIELDS:
                return INT_FIELDS[key]
        return integers(fd.type)
    raise NotImplementedError(f"no strategy for {fd.full_name} (type {fd.type})")


def message_strategy(descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
    """Messages of this type, each field set or (where presence is visible) left unset.

    Only presence can be told apart from a default: a plain proto3 scalar is always drawn
    (its strategy yields the default too); `optional` scalars and nested messages may be
    absent, except a request's own submessages (the cell, the executable), which carry what
    gets a request further into the daemon.
    """
    cls = message_factory.GetMessageClass(descriptor)
    if depth > 3:
        return st.just(cls())
    always: dict[str, st.SearchStrategy[Any]] = {}
    maybe: dict[str, st.SearchStrategy[Any]] = {}
    for fd in descriptor.fields:
        entry = fd.message_type if fd.type == FieldDescriptor.TYPE_MESSAGE else None
        if entry is not None and entry.GetOptions().map_entry:
            always[fd.name] = st.dictionaries(field_strategy(entry.fields_by_name["key"], depth),
                                              field_strategy(entry.fields_by_name["value"], depth),
                                              max_size=3)
            continue
        strategy = field_strategy(fd, depth)
        if fd.is_repeated:
            always[fd.name] = st.lists(strategy, max_size=3)
        elif fd.has_presence and not (fd.type == FieldDescriptor.TYPE_MESSAGE and depth == 0):
            maybe[fd.name] = strategy
        else:
            always[fd.name] = strategy
    return st.fixed_dictionaries(always, optional=maybe).map(lambda fields: cls(**fields))


@dataclass(frozen=True)
class Rpc:
    path: str
    request: type[Message]
    response: type[Message]
    streaming: bool

    @property
    def timeout(self) -> float:
        if self.streaming:
            return STREAM_TIMEOUT
        return WAIT_TIMEOUT if self.path.endswith("/Wait") else UNARY_TIMEOUT


def served_rpcs() -> list[Rpc]:
    pool = descriptor_pool.Default()
    rpcs = []
    for service in SERVICES:
        for method in pool.FindServiceByName(service).methods:
            path = f"/{service}/{method.name}"
            if path not in NOT_SERVED:
                rpcs.append(Rpc(path, message_factory.GetMessageClass(method.input_type),
                                message_factory.GetMessageClass(method.output_type),
                                method.server_streaming))
    return rpcs


RPCS = served_rpcs()
BY_PATH = {rpc.path: rpc for rpc in RPCS}


@dataclass
class Tally:
    requests: int = 0
    by_code: dict[str, int] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)


TALLY = Tally()


class Session:
    """Sends generated requests and remembers what they created, to undo it."""

    def __init__(self, daemon: DaemonProcess, client: aurae_sdk.Client) -> None:
        self.daemon = daemon
        self.client = client
        self.host_executables: set[str] = set()
        self.last_pid: int | None = None

    def send(self, rpc: Rpc, request: Message) -> str:
        TALLY.requests += 1
        code = "OK"
        try:
            if rpc.streaming:
                responses = self.client.channel.unary_stream(
                    rpc.path, request_serializer=rpc.request.SerializeToString,
                    response_deserializer=rpc.response.FromString)(request, timeout=rpc.timeout)
                for _ in responses:  # read what comes within the timeout
                    pass
            else:
                response = self.client.channel.unary_unary(
                    rpc.path, request_serializer=rpc.request.SerializeToString,
                    response_deserializer=rpc.response.FromString)(request, timeout=rpc.timeout)
                self._remember(rpc, request, response)
        except grpc.RpcError as error:
            code = error.code().name  # type: ignore[attr-defined]
            if code == "DEADLINE_EXCEEDED" and (rpc.streaming or rpc.path.endswith("/Wait")):
                code = "OK"  # still open or still running: not a failure
        TALLY.by_code[code] = TALLY.by_code.get(code, 0) + 1
        assert code not in FORBIDDEN, f"{rpc.path} answered {code} to {request!r}"
        return code

    def _remember(self, rpc: Rpc, request: Any, response: Any) -> None:
        if rpc.path == "/aurae.cells.v0.CellService/Start":
            self.last_pid = response.host_pid
            if not request.cell_name:
                self.host_executables.add(request.executable.name)

    def clean_up(self) -> None:
        """Stop what was started at host level and free every cell; check the daemon lives."""
        for name in sorted(self.host_executables):
            try:
                self.client.cells.stop(executable_name=name, grace_period_ms=0)
            except aurae_sdk.NotFound:
                pass
        self.host_executables.clear()
        for machine in self.client.vms.list().machines:  # their cells go with them
            self.client.vms.free(vm_id=machine.id)
        for node in self.client.cells.list().cells:
            self.client.cells.free(cell_name=node.cell.name)
        assert self.client.health.check(service="").status == health_pb2.HealthCheckResponse.SERVING


@pytest.fixture(scope="module")
def session(daemon: DaemonProcess) -> Iterator[Session]:
    with daemon.client(timeout=UNARY_TIMEOUT) as client:
        baseline = host_state(daemon)
        session = Session(daemon, client)
        TALLY.started = time.monotonic()  # not at import: collection and earlier modules ran since
        yield session
        session.clean_up()
        # Nothing left: no cgroup but the root and host leaf, no process in them.
        assert host_state(daemon) == baseline
        assert "unexpected error" not in daemon.log()
        elapsed = time.monotonic() - TALLY.started
        codes = ", ".join(f"{code} {count}" for code, count in sorted(TALLY.by_code.items()))
        record_figure("hypothesis", f"{TALLY.requests} generated requests over {len(RPCS)} RPCs "
                                    f"in {elapsed:.0f} s ({codes})")


def examples_for(rpc: Rpc) -> int:
    return FEW_EXAMPLES if rpc.streaming else EXAMPLES


def run_one(session: Session, rpc: Rpc, request: Message) -> None:
    try:
        session.send(rpc, request)
    finally:
        session.clean_up()


def given_requests(rpc: Rpc) -> Callable[[Callable[..., None]], Callable[..., None]]:
    return lambda test: settings(
        max_examples=examples_for(rpc), deadline=None, derandomize=True, database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                               HealthCheck.function_scoped_fixture],
    )(given(request=message_strategy(rpc.request.DESCRIPTOR))(test))


def make_test(rpc: Rpc) -> Callable[[Session], None]:
    @given_requests(rpc)
    def test(session: Session, request: Message) -> None:
        run_one(session, rpc, request)

    return test


# One test per RPC, so a failure names it and each has its own example budget.
for _rpc in RPCS:
    globals()[f"test_{_rpc.path.strip('/').replace('.', '_').replace('/', '_')}"] = make_test(_rpc)


# A step of a sequence: a generated request, or a stream of the last started process's output.
Step = tuple[Rpc, Message] | tuple[None, Message]
FOLLOW = message_strategy(BY_PATH["/aurae.observe.v0.ObserveService/GetSubProcessStream"]
                          .request.DESCRIPTOR)
STEPS: st.SearchStrategy[Step] = st.one_of(
    *(st.tuples(st.just(rpc), message_strategy(rpc.request.DESCRIPTOR)) for rpc in RPCS
      if rpc.path.startswith("/aurae.cells.")),
    st.tuples(st.none(), FOLLOW),
)
# Three steps in four aim at the sequence's focus (one cell, one executable).
FOCUSED = st.integers(0, 3).map(bool)
# Where a step aims when it follows the sequence's focus: fields naming a cell or executable.
CELL_FIELDS = ("cell_name",)
EXECUTABLE_FIELDS = ("executable_name",)


def aim(request: Any, cell: str, executable: str) -> None:
    """Point a generated request at the sequence's cell and executable."""
    for name in CELL_FIELDS:
        if name in request.DESCRIPTOR.fields_by_name:
            setattr(request, name, cell)
    for name in EXECUTABLE_FIELDS:
        if name in request.DESCRIPTOR.fields_by_name:
            setattr(request, name, executable)
    if "cell" in request.DESCRIPTOR.fields_by_name:
        request.cell.name = cell
    if "executable" in request.DESCRIPTOR.fields_by_name:
        request.executable.name = executable


@settings(max_examples=SEQUENCES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(steps=st.lists(st.tuples(STEPS, FOCUSED), min_size=1, max_size=8),
       focus=st.tuples(st.sampled_from(["hc-a", "hc-b", ""]), st.sampled_from(EXECUTABLE_POOL)))
def test_sequences_of_cell_calls(session: Session, steps: list[tuple[Step, bool]],
                                 focus: tuple[str, str]) -> None:
    """Allocate, start, stop, wait, free and follow in generated orders. Steps marked to
    follow the focus name one cell and executable, so they meet each other."""
    try:
        for (rpc, request), focused in steps:
            if rpc is None:
                if session.last_pid is None:
                    continue
                request.process_id = session.last_pid  # type: ignore[attr-defined]
                rpc = BY_PATH["/aurae.observe.v0.ObserveService/GetSubProcessStream"]
            elif focused:
                aim(request, *focus)
            session.send(rpc, request)
    finally:
        session.clean_up()
        session.last_pid = None
