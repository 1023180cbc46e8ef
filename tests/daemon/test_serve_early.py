"""`--serve-early` (a VM guest's auraed): Health and Discovery answer while the other services
are wired; calls to those wait for them (auraed/pending.py), bounded, and then run through the
same interceptors as any call."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aurae_sdk.wire.generated.pb.discovery import discovery_pb2
from auraed.interceptors import FaultTranslation
from auraed.pending import PendingServices
from auraed.services.discovery import DiscoveryService
from auraed.services.health import HealthService
from tests.support.daemon import running_daemon

DISCOVER = "/aurae.discovery.v0.DiscoveryService/Discover"


@pytest.fixture
def early_server() -> Iterator[tuple[grpc.Server, PendingServices, HealthService, grpc.Channel]]:
    """Health served at once; Discovery registered late, behind PendingServices."""
    pending = PendingServices(wait=30.0)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8),
                         interceptors=[pending, FaultTranslation()],
                         handlers=[pending.generic_handler()])
    health = HealthService([DiscoveryService.SERVICE])
    health.register(server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    health.serving([HealthService.SERVICE])
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield server, pending, health, channel
    finally:
        channel.close()
        server.stop(0).wait()


def discover(channel: grpc.Channel, timeout: float = 10.0) -> discovery_pb2.DiscoverResponse:
    call = channel.unary_unary(DISCOVER,
                               request_serializer=discovery_pb2.DiscoverRequest.SerializeToString,
                               response_deserializer=discovery_pb2.DiscoverResponse.FromString)
    response: discovery_pb2.DiscoverResponse = call(discovery_pb2.DiscoverRequest(),
                                                    timeout=timeout)
    return response


def test_a_call_made_while_wiring_waits_and_is_answered_by_the_wired_service(
        early_server: tuple[grpc.Server, PendingServices, HealthService, grpc.Channel]) -> None:
    _, pending, health, channel = early_server
    stub = health_pb2_grpc.HealthStub(channel)  # type: ignore[no-untyped-call]
    serving = stub.Check(health_pb2.HealthCheckRequest(service=HealthService.SERVICE), timeout=5)
    assert serving.status == health_pb2.HealthCheckResponse.SERVING
    # The daemon as a whole is not serving yet, and says so.
    whole = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert whole.status == health_pb2.HealthCheckResponse.NOT_SERVING

    answers: list[discovery_pb2.DiscoverResponse] = []
    caller = threading.Thread(target=lambda: answers.append(discover(channel)))
    caller.start()
    time.sleep(0.5)
    assert answers == [] and caller.is_alive()  # held back: nothing serves Discover yet
    DiscoveryService(healthy=lambda: True).register(pending)  # type: ignore[arg-type]
    pending.wired()
    health.serving()
    caller.join(10)
    assert len(answers) == 1 and answers[0].healthy and answers[0].version
    assert discover(channel).healthy  # and every call after the wiring goes straight to it
    whole = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert whole.status == health_pb2.HealthCheckResponse.SERVING


def test_a_malformed_request_held_back_is_refused_as_any_other(
        early_server: tuple[grpc.Server, PendingServices, HealthService, grpc.Channel]) -> None:
    _, pending, _, channel = early_server
    DiscoveryService(healthy=lambda: True).register(pending)  # type: ignore[arg-type]
    raw = channel.unary_unary(DISCOVER)
    outcome: list[grpc.RpcError] = []

    def call() -> None:
        try:
            raw(b"\xff\xff\xff", timeout=10)
        except grpc.RpcError as error:
            outcome.append(error)

    caller = threading.Thread(target=call)
    caller.start()
    time.sleep(0.3)
    pending.wired()
    caller.join(10)
    assert outcome and outcome[0].code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_call_waits_only_so_long_and_a_failed_wiring_says_why() -> None:
    pending = PendingServices(wait=0.3)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), interceptors=[pending],
                         handlers=[pending.generic_handler()])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        with pytest.raises(grpc.RpcError) as waited:
            discover(channel)
        assert waited.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "still wiring" in str(waited.value.details())
        pending.failed("cgroups: no cgroup filesystem")
        with pytest.raises(grpc.RpcError) as failed:
            discover(channel)
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "cgroups: no cgroup filesystem" in str(failed.value.details())
    finally:
        channel.close()
        server.stop(0).wait()


def test_after_the_wiring_an_unknown_method_is_unimplemented(
        early_server: tuple[grpc.Server, PendingServices, HealthService, grpc.Channel]) -> None:
    _, pending, _, channel = early_server
    pending.wired()
    with pytest.raises(grpc.RpcError) as unknown:
        discover(channel)
    assert unknown.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_a_daemon_serving_early_serves_every_service_once_wired() -> None:
    with running_daemon("--serve-early") as daemon, daemon.client() as client:
        assert client.discovery.discover().healthy
        assert client.health.check(service="").status == 1
        assert client.health.check(service="aurae.cells.v0.CellService").status == 1
        client.cells.allocate(cell={"name": "early"})
        assert [c.cell.name for c in client.cells.list().cells] == ["early"]
        client.cells.free(cell_name="early")
        assert "auraed answering health and discovery" in daemon.log()
