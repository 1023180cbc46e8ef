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


# A daemon that adopts serves in 2-12 s with the 2-core machine loaded (issue 12); the
# timeout only bounds a daemon that never serves (one that exits is seen at once).
SERVING_TIMEOUT = 60.0


def wait_until_serving(daemon: DaemonProcess, timeout: float = SERVING_TIMEOUT) -> None:
    import grpc

    import aurae_sdk

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if daemon.process.poll() is not None:
            raise RuntimeError(f"auraed exited with {daemon.process.returncode}:\n{daemon.log()}")
        # A Unix socket: a plain connect first (a socket file left by a killed daemon refuses
        # it at once, where a gRPC channel would back off for a second); TCP only by trying.
        if (daemon.socket.startswith("/") and os.path.exists(daemon.socket)
                and _accepting(daemon.socket)) or not daemon.socket.startswith("/"):
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
                   socket: str | None = None,
                   netns: str | None = None,
                   vms: bool = False) -> Iterator[DaemonProcess]:
    """Start auraed; on exit stop it with SIGINT and check it left nothing behind.

    vms: give it the CA key, so that it can mint guest identities and boot virtual machines
    (without it VmService Start refuses at once: fuzzing never boots a guest).

    cgroup_mount: where it finds cgroups (a hybrid host's unified mount gives it the v2
    backend). library_dir: an earlier daemon's (`workdir / "lib"`), to start as its
    successor; the caller owns it then. after: a daemon (stopped or killed) whose place this
    one takes: the same PKI, socket, runtime and library directories and cgroup root, so it
    adopts what that one left running. socket: where it listens (default: a Unix socket in
    its work directory; an IP:PORT for TCP). netns: the name of a network namespace
    (`ip netns`) to run it in."""
    if after is not None:
        workdir, pki, cgroup_root = after.workdir, after.pki, after.cgroup_root
        socket = after.socket
        log_path = workdir / f"auraed.{time.monotonic_ns()}.log"
    else:
        # Unix socket paths must stay short (108 bytes), so not under pytest's tmp_path.
        workdir = Path(tempfile.mkdtemp(prefix="aurae-test-", dir="/tmp"))
        socket = socket or str(workdir / "aurae.sock")
        pki = init_pki(workdir / "pki", clients=("admin", "other"), socket=socket)
        log_path = workdir / "auraed.log"
    cgroup_root = cgroup_root or f"aurae-test-{secrets.token_hex(4)}"
    command = [
        # nsenter, not `ip netns exec`: that one remounts /sys, hiding the host's cgroups.
        *(("nsenter", f"--net=/run/netns/{netns}", "--") if netns else ()),
        sys.executable, "-m", "auraed",
        "--socket", socket,
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
    daemon = DaemonProcess(process, pki, workdir, socket, cgroup_root, log_path)
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


@dataclass
class NetnsNode:
    """An auraed in a network namespace of its own, reached over a veth pair on TCP."""

    name: str  # the context name tests give it: node1, node2, ...
    netns: str
    address: str  # the namespace side of the veth, where auraed listens
    daemon: DaemonProcess

    @property
    def socket(self) -> str:
        return self.daemon.socket


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def _free_subnet_prefix() -> str:
    """A 10.X. prefix no route of this host mentions (other tests may hold some)."""
    routes = subprocess.run(["ip", "-4", "route", "show", "table", "all"], check=True,
                            capture_output=True, text=True).stdout
    for _ in range(100):
        prefix = f"10.{200 + secrets.randbelow(55)}."
        if prefix not in routes:
            return prefix
    raise RuntimeError("no free 10.X.0.0/16 for test veth links")


@contextmanager
def netns_nodes(count: int, port: int = 8080) -> Iterator[list[NetnsNode]]:
    """`count` auraed nodes, each in a network namespace made here, listening on TCP.

    Each namespace gets one veth pair: the host side holds X.Y.i.1/30, the namespace side
    X.Y.i.2/30, and auraed listens on X.Y.i.2:port. Only those links carry addresses. On exit
    every daemon is stopped and every namespace and veth pair deleted, whatever happened.
    """
    from contextlib import ExitStack

    tag = secrets.token_hex(2)
    prefix = _free_subnet_prefix()
    made: list[tuple[str, str]] = []  # (netns, host-side veth)
    nodes: list[NetnsNode] = []
    try:
        with ExitStack() as daemons:
            for index in range(1, count + 1):
                netns, host_veth, ns_veth = f"aurae-fl-{tag}-{index}", f"afl{tag}{index}h", \
                    f"afl{tag}{index}n"
                _ip("netns", "add", netns)
                made.append((netns, host_veth))
                _ip("link", "add", host_veth, "type", "veth", "peer", "name", ns_veth)
                _ip("link", "set", ns_veth, "netns", netns)
                _ip("addr", "add", f"{prefix}{index}.1/30", "dev", host_veth)
                _ip("link", "set", host_veth, "up")
                _ip("-n", netns, "addr", "add", f"{prefix}{index}.2/30", "dev", ns_veth)
                _ip("-n", netns, "link", "set", ns_veth, "up")
                _ip("-n", netns, "link", "set", "lo", "up")
                address = f"{prefix}{index}.2"
                daemon = daemons.enter_context(
                    running_daemon(socket=f"{address}:{port}", netns=netns))
                nodes.append(NetnsNode(f"node{index}", netns, address, daemon))
            yield nodes
    finally:
        for netns, host_veth in made:
            # Deleting the namespace deletes its veth end, and with it the host's.
            subprocess.run(["ip", "link", "del", host_veth], capture_output=True, check=False)
            subprocess.run(["ip", "netns", "del", netns], capture_output=True, check=False)


def fleet_config(path: Path, nodes: list[NetnsNode]) -> Path:
    """A client config with one context per node (each with its own PKI), no default."""
    lines = []
    for node in nodes:
        pki = node.daemon.pki
        admin = pki.clients[0]
        lines += [
            f"[contexts.{node.name}.auth]",
            f'ca_crt = "{pki.ca_crt}"',
            f'client_crt = "{admin.crt}"',
            f'client_key = "{admin.key}"',
            f"[contexts.{node.name}.system]",
            f'socket = "{node.socket}"',
            "",
        ]
    path.write_text("\n".join(lines))
    return path
