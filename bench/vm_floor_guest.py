"""The floor of a VM boot: a minimal Python gRPC server as pid 1 of the same kernel and initramfs.

The initramfs execs `$AURAE_PYTHON -m auraed.pid1 CONFIG`; the floor's boot.env points
AURAE_PYTHON at a two-line script that runs this file instead. It does only what any gRPC guest
must: mount /proc and /sys, bring up eth0 (the same code auraed.pid1 uses), and serve Discovery
with the same mTLS material on [::]:8080. No daemon, no spawner, no cgroups, no shutdown.

    python bench/vm_floor_guest.py GUEST_DIR
"""

from __future__ import annotations

import signal
import sys
from concurrent import futures
from pathlib import Path

from auraed.kernel import libc
from auraed.kernel.guest_network import configure


def main(guest: Path) -> None:
    libc.mount("proc", "/proc", "proc", 0)
    libc.mount("sysfs", "/sys", "sysfs", 0)
    configure("eth0", "fe80::2/64", 10.0)
    import grpc

    from auraed.services.discovery import DiscoveryService

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    DiscoveryService(healthy=lambda: True).register(server)
    credentials = grpc.ssl_server_credentials(
        [((guest / "server.key").read_bytes(), (guest / "server.crt").read_bytes())],
        root_certificates=(guest / "ca.crt").read_bytes(), require_client_auth=True)
    server.add_secure_port("[::]:8080", credentials)
    server.start()
    print("floor: serving", flush=True)
    while True:  # pid 1 must never return; the bench kills QEMU
        signal.pause()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
