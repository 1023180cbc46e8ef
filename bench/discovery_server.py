"""A bare Discovery server for transport benchmarks: the same generated
service on a plaintext and an mTLS Unix socket, in its own process (a server
in the measuring process would share its GIL).

    python -m bench.discovery_server PLAIN_SOCKET TLS_SOCKET CA CERT KEY
"""

from __future__ import annotations

import signal
import sys
from concurrent import futures
from pathlib import Path

import grpc

from aurae_sdk.config import parse_target
from auraed.services.discovery import DiscoveryService


def main(plain: str, tls: str, ca: str, cert: str, key: str) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    DiscoveryService(healthy=lambda: True).register(server)
    server.add_insecure_port(parse_target(plain).grpc_target)
    credentials = grpc.ssl_server_credentials(
        [(Path(key).read_bytes(), Path(cert).read_bytes())],
        root_certificates=Path(ca).read_bytes(), require_client_auth=True,
    )
    server.add_secure_port(parse_target(tls).grpc_target, credentials)
    server.start()
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    server.stop(None)


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    main(*sys.argv[1:])
