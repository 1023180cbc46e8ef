"""Unary RPC cost: the SDK against the raw generated stub on the same
channel, and mTLS against plaintext on the same server."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

from aurae_cli.pki import init_pki
from aurae_sdk.config import channel_credentials, channel_options, load_config, parse_target
from aurae_sdk.wire.generated.pb.discovery import discovery_pb2, discovery_pb2_grpc
from bench.core import Comparison, Mode, Result, Series, interleave
from tests.support.daemon import running_daemon


def _per_call(call, batch: int):  # type: ignore[no-untyped-def]
    """A sampler timing `batch` calls and returning microseconds per call."""
    def sample() -> float:
        begin = time.perf_counter()
        for _ in range(batch):
            call()
        return (time.perf_counter() - begin) / batch * 1e6
    return sample


def run(mode: Mode) -> list[Result]:
    runs, batch = mode.pick(full=(40, 200), quick=(15, 50), smoke=(1, 1))
    sdk = Series("SDK: client.discovery.discover()", "µs")
    stub = Series("raw generated stub: DiscoveryServiceStub.Discover", "µs")
    with running_daemon() as daemon, daemon.client() as client:
        raw = discovery_pb2_grpc.DiscoveryServiceStub(client.channel)
        request = discovery_pb2.DiscoverRequest()
        interleave(runs,
                   (sdk, _per_call(lambda: client.discovery.discover(), batch)),
                   (stub, _per_call(lambda: raw.Discover(request, timeout=30), batch)),
                   warmup=mode.warmup(3))

    plain = Series("plaintext (raw stub)", "µs")
    tls = Series("mTLS (raw stub)", "µs")
    with tempfile.TemporaryDirectory(prefix="aurae-bench-", dir="/tmp") as tmp:
        pki = init_pki(Path(tmp) / "pki")
        plain_socket, tls_socket = f"{tmp}/plain.sock", f"{tmp}/tls.sock"
        server = subprocess.Popen([sys.executable, "-m", "bench.discovery_server", plain_socket,
                                   tls_socket, str(pki.ca_crt), str(pki.server_crt), str(pki.server_key)])
        try:
            while not (os.path.exists(plain_socket) and os.path.exists(tls_socket)):
                time.sleep(0.02)
            config = load_config(pki.config, socket=tls_socket)
            secure = grpc.secure_channel(parse_target(tls_socket).grpc_target,
                                         channel_credentials(config), channel_options(parse_target(tls_socket)))
            insecure = grpc.insecure_channel(parse_target(plain_socket).grpc_target)
            tls_stub = discovery_pb2_grpc.DiscoveryServiceStub(secure)
            plain_stub = discovery_pb2_grpc.DiscoveryServiceStub(insecure)
            request = discovery_pb2.DiscoverRequest()
            interleave(runs,
                       (tls, _per_call(lambda: tls_stub.Discover(request, timeout=30), batch)),
                       (plain, _per_call(lambda: plain_stub.Discover(request, timeout=30), batch)),
                       warmup=mode.warmup(3))
            secure.close()
            insecure.close()
        finally:
            server.terminate()
            server.wait()
    return [
        Comparison("sdk_vs_stub", "Unary call: SDK vs raw generated stub (same channel)", sdk, stub,
                   goal="within 5%"),
        Comparison("mtls_vs_plaintext", "Unary call: mTLS vs plaintext (same server)", tls, plain),
    ]



