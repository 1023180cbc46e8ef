"""A throwaway auraed for tests and benchmarks: its own temporary PKI,
socket, runtime directory and cgroup subtree, started as a subprocess and
always cleaned up.

Cleanup does not trust the daemon: after it exits (or is killed), whatever is
left under its cgroup subtree is killed and removed, and the test that
started it fails if anything had to be.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aurae_cli.pki import PkiPaths, init_pki

if TYPE_CHECKING:
    from aurae_sdk.client import Client

CGROUP_MOUNT = Path("/sys/fs/cgroup")


def cgroup_dirs(root_name: str) -> list[Path]:
    """Every directory of the subtree `root_name` in every hierarchy."""
    found = []
    for hierarchy in CGROUP_MOUNT.iterdir():
        top = hierarchy / root_name
        if top.is_dir():
            found.append(top)
    if (CGROUP_MOUNT / root_name).is_dir():  # a v2 host
        found.append(CGROUP_MOUNT / root_name)
    return found


def cgroup_pids(root_name: str) -> set[int]:
    pids: set[int] = set()
    for top in cgroup_dirs(root_name):
        for procs in top.rglob("cgroup.procs"):
            pids.update(int(p) for p in procs.read_text().split())
    return pids


def force_cleanup(root_name: str, cgroup_mount: str = str(CGROUP_MOUNT)) -> bool:
    """Kill and remove what is left of a cgroup subtree; True if anything was."""
    if not cgroup_dirs(root_name):
        return False
    from auraed.kernel.cgroups import detect_backend

    backend = detect_backend(root_name=root_name, mount_root=cgroup_mount)
    backend.cleanup_stale()
    backend.teardown()
    return True


@dataclass
class DaemonProcess:
    process: subprocess.Popen[bytes]
    pki: PkiPaths
    workdir: Path
    socket: str
    cgroup_root: str
    log_path: Path

    @property
    def config(self) -> str:
        return str(self.pki.config)

    @property
    def runtime_dir(self) -> Path:
        return self.workdir / "run"

    def client(self, **settings: Any) -> Client:
        import aurae_sdk

        return aurae_sdk.Client(self.config, **settings)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def cli(self, *args: str, timeout: float = 30, input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run `aurae-py ARGS` against this daemon."""
        return subprocess.run(
            [sys.executable, "-m", "aurae_cli", *args],
            env={**os.environ, "AURAE_CONFIG": self.config},
            capture_output=True, text=True, timeout=timeout, input=input, check=False,
        )

    def stop(self, sig: int = signal.SIGINT, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def wait_until_serving(daemon: DaemonProcess, timeout: float = 20) -> None:
    import grpc

    import aurae_sdk

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if daemon.process.poll() is not None:
            raise RuntimeError(f"auraed exited with {daemon.process.returncode}:\n{daemon.log()}")
        # A plain connect first: a socket file left by a killed daemon refuses it at once,
        # where a gRPC channel would back off for a second.
        if os.path.exists(daemon.socket) and _accepting(daemon.socket):
            try:
                with aurae_sdk.Client(daemon.config, timeout=2) as client:
                    status = client.health.check(service="")
                if status.status == 1:
                    return
            except (aurae_sdk.AuraeError, grpc.RpcError):
                pass
        time.sleep(0.01)
    raise RuntimeError(f"auraed did not start serving in {timeout} s:\n{daemon.log()}")


def _accepting(path: str) -> bool:
    import socket

    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True


@contextmanager
def running_daemon(*extra_args: str, grace_period: float = 2.0,
                   cgroup_root: str | None = None,
                   cgroup_mount: str = str(CGROUP_MOUNT),
                   library_dir: Path | None = None,
                   after: DaemonProcess | None = None,
                   vms: bool = False) -> Iterator[DaemonProcess]:
    """Start auraed; on exit stop it with SIGINT and check it left nothing behind.

    vms: give it the CA key, so that it can mint guest identities and boot virtual machines
    (without it VmService Start refuses at once: fuzzing never boots a guest).

    cgroup_mount: where it finds cgroups (a hybrid host's unified mount gives it the v2
    backend). library_dir: an earlier daemon's (`workdir / "lib"`), to start as its
    successor; the caller owns it then. after: a daemon (stopped or killed) whose place this
    one takes: the same PKI, socket, runtime and library directories and cgroup root, so it
    adopts what that one left running."""
    if after is not None:
        workdir, pki, cgroup_root = after.workdir, after.pki, after.cgroup_root
        log_path = workdir / f"auraed.{time.monotonic_ns()}.log"
    else:
        # Unix socket paths must stay short (108 bytes), so not under pytest's tmp_path.
        workdir = Path(tempfile.mkdtemp(prefix="aurae-test-", dir="/tmp"))
        pki = init_pki(workdir / "pki", clients=("admin", "other"),
                       socket=str(workdir / "aurae.sock"))
        log_path = workdir / "auraed.log"
    cgroup_root = cgroup_root or f"aurae-test-{secrets.token_hex(4)}"
    command = [
        sys.executable, "-m", "auraed",
        "--socket", str(workdir / "aurae.sock"),
        "--ca-crt", str(pki.ca_crt),
        "--server-crt", str(pki.server_crt),
        "--server-key", str(pki.server_key),
        *(["--ca-key", str(pki.ca_key)] if vms else []),
        "--runtime-dir", str(workdir / "run"),
        "--library-dir", str(library_dir or workdir / "lib"),
        "--cgroup-root", cgroup_root,
        "--grace-period", str(grace_period),
        "--cgroup-mount", cgroup_mount,
        "--verbose",
        *extra_args,
    ]
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)
    daemon = DaemonProcess(process, pki, workdir, str(workdir / "aurae.sock"), cgroup_root, log_path)
    leftovers = False
    try:
        wait_until_serving(daemon)
        yield daemon
    finally:
        # SIGINT stops everything even with --live-restore (SIGTERM would leave it running).
        daemon.stop(signal.SIGINT)
        leftovers = force_cleanup(cgroup_root, cgroup_mount)
        shutil.rmtree(workdir, ignore_errors=True)
    assert not leftovers, f"auraed left cgroups under {cgroup_root}"
