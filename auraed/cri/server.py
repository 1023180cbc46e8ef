"""The CRI socket: runtime.v1 RuntimeService and ImageService, plaintext gRPC on a Unix socket
born with mode 0600 — kubelet speaks plaintext to its runtime, and the file mode is the guard,
as with containerd's socket."""

from __future__ import annotations

import os
import socket
import stat
from concurrent import futures
from pathlib import Path
from typing import cast

import grpc

from auraed.cri.generated import api_pb2_grpc as cri_grpc
from auraed.cri.service import CriImageService
from auraed.interceptors import FaultTranslation
from auraed.pending import PendingServices

# kubelet sends container configs and lists larger than gRPC's 4 MiB default on busy nodes.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


class CriSocketError(Exception):
    """The socket cannot be served; the message says why."""


def _prepare(path: Path) -> None:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        return
    if not stat.S_ISSOCK(mode):
        raise CriSocketError(f"--cri-socket {path}: exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()  # left by a daemon that died
        return
    finally:
        probe.close()
    raise CriSocketError(f"--cri-socket {path}: another runtime is listening there")


def listen_cri(path: Path, *, max_workers: int = 32) -> tuple[grpc.Server, PendingServices]:
    """Serve the CRI on `path` before its services exist: they need the daemon's cgroup subtree,
    which a spare learns only at its claim, and a server built and bound after the claim was
    30-60 ms of a pod's start. Calls wait (PendingServices, bounded) until the services are
    registered (`register_cri`) and wired. The caller stops the server and removes the file."""
    _prepare(path)
    pending = PendingServices()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="cri"),
        handlers=[pending.generic_handler()],
        interceptors=[pending, FaultTranslation()],
        options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                 ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)],
    )
    previous = os.umask(0o177)  # the socket file is born 0600
    try:
        server.add_insecure_port(f"unix:{path}")
    except RuntimeError as error:
        raise CriSocketError(f"--cri-socket {path}: cannot listen: {error}") from None
    finally:
        os.umask(previous)
    os.chmod(path, 0o600)
    server.start()
    return server, pending


def register_cri(pending: PendingServices, runtime: object, images: CriImageService) -> None:
    """The services behind a server `listen_cri` started; the calls held back run once the
    caller says `pending.wired()`."""
    # The services define the RPCs they implement and answer UNIMPLEMENTED for the rest
    # (see auraed.cri.service), without subclassing the generated abstract servicers.
    target = cast(grpc.Server, pending)  # a registration target, as a server is
    cri_grpc.add_RuntimeServiceServicer_to_server(cast(cri_grpc.RuntimeServiceServicer, runtime),
                                                  target)
    cri_grpc.add_ImageServiceServicer_to_server(cast(cri_grpc.ImageServiceServicer, images),
                                                target)
