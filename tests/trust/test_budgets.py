"""No client can make the daemon unresponsive: long-lived calls (streams, Wait, Stop) are
admitted against a budget per identity and a total, and operators keep a reserve of their own.

Before budgets, 260 idle Health/Watch streams from one peer held every thread of the daemon's
pool, and every other client's List and Health.Check timed out.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import aurae_sdk
from aurae_sdk.wire.generated.pb.cells import cells_pb2, cells_pb2_grpc
from auraed.admission import Budget
from tests.support.daemon import DaemonProcess

from .conftest import TRUST_DOMAIN, audit_lines, issue, secure_channel

PER_PEER = Budget().per_peer
TOTAL = Budget().total
# More than the daemon's whole thread pool used to hold (256).
ATTEMPTS = 300


class Peer:
    """One client identity: a channel presenting its certificate, and the streams it holds."""

    def __init__(self, daemon: DaemonProcess, name: str) -> None:
        self.spiffe_id = f"spiffe://{TRUST_DOMAIN}/ci/{name}"
        self.channel = secure_channel(daemon, issue(daemon, name, [self.spiffe_id]))
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.streams: list[grpc.Future] = []

    def open_watches(self, count: int) -> list[str]:
        """Open count Watch streams; the status each got ('OK' once SERVING arrived)."""
        outcomes = []
        for _ in range(count):
            stream = self.health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=300)
            try:
                first = next(stream)
                assert first.status == health_pb2.HealthCheckResponse.SERVING
                outcomes.append("OK")
                self.streams.append(stream)
            except grpc.RpcError as error:
                outcomes.append(error.code().name)
                self.refusal = error.details()
        return outcomes

    def close(self) -> None:
        for stream in self.streams:
            stream.cancel()
        self.channel.close()


@pytest.fixture
def peers(daemon: DaemonProcess) -> Iterator[list[Peer]]:
    opened: list[Peer] = []
    yield opened
    for peer in opened:
        peer.close()
    # Streams end on the daemon's side within its poll interval: wait until all are released,
    # so the next test starts with the whole budget.
    deadline = time.monotonic() + 30
    with daemon.client(timeout=10) as admin:
        probe = Peer(daemon, "probe")
        try:
            while probe.open_watches(1) != ["OK"]:
                assert time.monotonic() < deadline, "long-lived calls were never released"
                time.sleep(0.2)
        finally:
            probe.close()
        admin.health.check(service="")


def admin_answers(daemon: DaemonProcess) -> None:
    """The operator's short calls and a stream of its own get through at once."""
    with daemon.client(timeout=10, retry=aurae_sdk.RetryPolicy(attempts=1)) as admin:
        admin.cells.list()
        assert admin.health.check(service="").status == health_pb2.HealthCheckResponse.SERVING
    channel = secure_channel(daemon, issue(daemon, "admin"))
    try:
        stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(),
                                                           timeout=10)
        assert next(stream).status == health_pb2.HealthCheckResponse.SERVING
        stream.cancel()
    finally:
        channel.close()


def test_idle_streams_beyond_a_peers_budget_are_refused_and_the_operator_still_answers(
        daemon: DaemonProcess, peers: list[Peer]) -> None:
    peer = Peer(daemon, "build")
    peers.append(peer)
    before = len(audit_lines(daemon))
    outcomes = peer.open_watches(ATTEMPTS)
    assert outcomes.count("OK") == PER_PEER
    assert outcomes.count("RESOURCE_EXHAUSTED") == ATTEMPTS - PER_PEER
    assert peer.spiffe_id in peer.refusal and "budget" in peer.refusal
    admin_answers(daemon)
    # The audit log is written by its own thread, a moment after each call is answered.
    deadline = time.monotonic() + 30
    while True:
        refusals = [json.loads(line) for line in audit_lines(daemon)[before:]]
        refusals = [r for r in refusals if r.get("code") == "RESOURCE_EXHAUSTED"]
        if len(refusals) >= ATTEMPTS - PER_PEER or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert len(refusals) == ATTEMPTS - PER_PEER
    assert {r["peer"] for r in refusals} == {peer.spiffe_id}
    assert {r["method"] for r in refusals} == {"/grpc.health.v1.Health/Watch"}


def test_pending_waits_count_against_the_same_budget(daemon: DaemonProcess,
                                                    peers: list[Peer]) -> None:
    peer = Peer(daemon, "waiter")
    peers.append(peer)
    cells = cells_pb2_grpc.CellServiceStub(peer.channel)
    cells.Allocate(cells_pb2.CellServiceAllocateRequest(cell=cells_pb2.Cell(name="waits")),
                   timeout=30)
    try:
        cells.Start(cells_pb2.CellServiceStartRequest(
            cell_name="waits", executable=cells_pb2.Executable(name="sleeper",
                                                               command="exec sleep 600")),
            timeout=30)
        request = cells_pb2.CellServiceWaitRequest(cell_name="waits", executable_name="sleeper")
        pending = [cells.Wait.future(request, timeout=300) for _ in range(ATTEMPTS)]
        peer.streams.extend(pending)
        # The refused ones end at once; the admitted ones wait on the sleeper.
        deadline = time.monotonic() + 60
        while sum(f.done() for f in pending) < ATTEMPTS - PER_PEER:
            assert time.monotonic() < deadline, "refusals did not come"
            time.sleep(0.1)
        refused = [f for f in pending if f.done()]
        assert {f.code() for f in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert len(refused) == ATTEMPTS - PER_PEER
        admin_answers(daemon)
        for future in pending:
            future.cancel()
    finally:
        # Stop is long-lived too: it is admitted once the daemon has seen the Waits end (their
        # threads notice a cancellation within half a second).
        stop = cells_pb2.CellServiceStopRequest(cell_name="waits", executable_name="sleeper",
                                                grace_period_ms=0)
        deadline = time.monotonic() + 30
        while True:
            try:
                cells.Stop(stop, timeout=30)
                break
            except grpc.RpcError as error:
                if (error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED
                        or time.monotonic() > deadline):
                    raise
                time.sleep(0.2)
        cells.Free(cells_pb2.CellServiceFreeRequest(cell_name="waits"), timeout=30)


def test_peers_share_a_total_and_operators_keep_their_own_reserve(
        daemon: DaemonProcess, peers: list[Peer]) -> None:
    filling = TOTAL // PER_PEER
    for index in range(filling):
        peer = Peer(daemon, f"fill{index}")
        peers.append(peer)
        assert peer.open_watches(PER_PEER) == ["OK"] * PER_PEER
    latecomer = Peer(daemon, "late")
    peers.append(latecomer)
    assert latecomer.open_watches(1) == ["RESOURCE_EXHAUSTED"]
    assert "the daemon's budget" in latecomer.refusal
    admin_answers(daemon)


def test_budget_accounting_per_peer_total_and_operators() -> None:
    from auraed.admission import LongLivedCalls, OverBudget

    calls = LongLivedCalls(Budget(per_peer=2, total=3, operators=1))
    a1, a2 = calls.admit("a", operator=False), calls.admit("a", operator=False)
    with pytest.raises(OverBudget, match="a holds 2"):
        calls.admit("a", operator=False)
    b1 = calls.admit("b", operator=False)
    with pytest.raises(OverBudget, match="the daemon's budget"):
        calls.admit("c", operator=False)
    ops = calls.admit("ops", operator=True)  # the total is full; the reserve is not
    with pytest.raises(OverBudget, match="reserve"):
        calls.admit("ops", operator=True)
    a1.release()
    a1.release()  # twice is once
    assert calls.held("a") == 1 and calls.held() == 3
    calls.admit("c", operator=False).release()
    for ticket in (a2, b1, ops):
        ticket.release()
    assert calls.held() == 0 and calls.held("a") == 0
