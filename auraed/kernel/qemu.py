"""QEMU as the VMM: the command line of one microvm guest, the accelerator probe, and a QMP session.

One QEMU process per VM, `-M microvm` (virtio-mmio devices found through ACPI), booting an
uncompressed kernel through PVH. The serial console goes to QEMU's stdout, which the daemon
captures like any executable's output. QMP listens on a private Unix socket in the VM's runtime
directory; `QmpSession` (qemu.qmp, the QEMU project's client) runs on one asyncio loop thread
shared by every VM and turns events into callbacks.

Nothing here knows of gRPC.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient, QMPError

# What a QMP call can fail with: the protocol, the socket, or QEMU going away meanwhile.
QMP_FAILURES = (QMPError, OSError, EOFError, TimeoutError, asyncio.TimeoutError)
CONNECT_ATTEMPT = 5.0  # seconds one QMP connect may take before it is undone and retried

log = logging.getLogger("auraed.qemu")

QEMU = "qemu-system-x86_64"
# Measured (docs/vms.md): without tsc_early_khz 1 in 3-5 microvm TCG boots hung; notests skips a
# 276 ms self-test; panic=-1 with -no-reboot makes a guest panic end QEMU instead of hanging it.
BASE_KERNEL_ARGS = ("console=ttyS0", "quiet", "cryptomgr.notests", "panic=-1")
PROBE_TIMEOUT = 20.0


@dataclass(frozen=True)
class Share:
    """A host directory shared read-only (9p) under a mount tag."""

    tag: str
    path: str


@dataclass(frozen=True)
class Disk:
    path: str
    read_only: bool


@dataclass(frozen=True)
class QemuMachine:
    kernel: str
    initramfs: str
    kernel_args: tuple[str, ...]
    mem_size_mb: int
    vcpu_count: int
    accelerator: str
    qmp_socket: str
    tap: str | None
    mac: str = "52:54:00:12:34:56"
    shares: tuple[Share, ...] = ()
    disks: tuple[Disk, ...] = field(default_factory=tuple)

    def argv(self) -> list[str]:
        args = [
            QEMU, "-M", "microvm,rtc=on", "-accel", self.accelerator,
            *(["-cpu", "host"] if self.accelerator == "kvm" else []),
            "-m", f"{self.mem_size_mb}M", "-smp", str(self.vcpu_count),
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-chardev", "stdio,id=console,signal=off", "-serial", "chardev:console",
            "-qmp", f"unix:{self.qmp_socket},server=on,wait=off",
            "-kernel", self.kernel, "-initrd", self.initramfs,
            "-append", " ".join(self.kernel_args),
        ]
        for index, share in enumerate(self.shares):
            args += ["-fsdev", (f"local,id=fs{index},path={share.path},security_model=none,"
                                "readonly=on"),
                     "-device", f"virtio-9p-device,fsdev=fs{index},mount_tag={share.tag}"]
        for index, disk in enumerate(self.disks):
            readonly = ",readonly=on" if disk.read_only else ""
            args += ["-drive", f"if=none,id=d{index},file={disk.path},format=raw{readonly}",
                     "-device", f"virtio-blk-device,drive=d{index}"]
        if self.tap is not None:
            args += ["-netdev", f"tap,id=n0,ifname={self.tap},script=no,downscript=no",
                     "-device", f"virtio-net-device,netdev=n0,mac={self.mac}"]
        return args

    def shell_command(self) -> str:
        # exec: the spawner's child becomes QEMU itself, so its pid is QEMU's.
        return "exec " + shlex.join(self.argv())


def tsc_khz() -> int | None:
    """The host's TSC frequency, which the guest is told instead of calibrating its own."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return int(float(line.split(":")[1]) * 1000)
    except (OSError, ValueError):
        pass
    return None


def default_kernel_args() -> list[str]:
    khz = tsc_khz()
    return [*BASE_KERNEL_ARGS, *([f"tsc_early_khz={khz}"] if khz else [])]


def probe_accelerator(kernel: str, initramfs: str) -> tuple[str, str]:
    """("kvm" | "tcg", why): KVM only when a probe boot under it reaches power-off.

    The probe boots the guest kernel and initramfs with no shares: its init finds no `aurae`
    share and powers off at once. A nested KVM that cannot run a stock kernel fails fast (e.g.
    `-cpu host` refused an MSR) or not in time; either way TCG is chosen.
    """
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg", "/dev/kvm is not usable"
    argv = [QEMU, "-M", "microvm", "-accel", "kvm", "-cpu", "host", "-m", "256",
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-serial", "stdio", "-kernel", kernel, "-initrd", initramfs,
            "-append", " ".join(default_kernel_args())]
    started = time.monotonic()
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=PROBE_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        return "tcg", f"a KVM probe boot did not finish in {PROBE_TIMEOUT:.0f} s"
    except OSError as error:
        return "tcg", f"cannot run {QEMU}: {error.strerror}"
    output = done.stdout + done.stderr
    if done.returncode == 0 and b"reboot: Power down" in output:
        return "kvm", f"a KVM probe boot powered off in {time.monotonic() - started:.2f} s"
    last = output.decode(errors="replace").strip().splitlines()[-1:] or [""]
    return "tcg", f"a KVM probe boot failed ({done.returncode}): {last[0][:200]}"


class QmpLoop:
    """One asyncio loop on a thread of its own, for every QMP session of the daemon."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="qmp", daemon=True)
        self._thread.start()

    def call(self, coroutine: Any, timeout: float) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            # Left alone, the coroutine runs on in the loop: a connect that timed out here
            # would still connect, and the retry would find the client "already connected".
            future.cancel()
            raise

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


EventHandler = Callable[[str, dict[str, Any]], None]


class QmpSession:
    """A connection to one QEMU's monitor; `on_event(name, data)` runs on the loop thread."""

    def __init__(self, loop: QmpLoop, socket: str, on_event: EventHandler) -> None:
        self._loop = loop
        self._socket = socket
        self._on_event = on_event
        self._client = QMPClient(os.path.basename(os.path.dirname(socket)))
        self._listener: asyncio.Task[None] | None = None
        self._events: Any = None  # the EventListener, once listening

    def connect(self, deadline: float, alive: Callable[[], bool]) -> None:
        """Connect once QEMU listens (it creates the socket early in its start)."""
        while True:
            if not alive():
                raise ConnectionError("QEMU exited before its monitor answered")
            if os.path.exists(self._socket):
                try:
                    self._loop.call(self._connect(), timeout=CONNECT_ATTEMPT + 5)
                    return
                except QMP_FAILURES as error:
                    if time.monotonic() > deadline:
                        raise ConnectionError(f"QMP at {self._socket}: {error}") from None
            elif time.monotonic() > deadline:
                raise ConnectionError(f"QEMU did not open its monitor socket {self._socket}")
            time.sleep(0.02)

    async def _connect(self) -> None:
        # Timed out inside the loop, so the attempt is undone (the client back to idle) before
        # the caller retries; a loaded host can keep QEMU from answering its greeting for long.
        await asyncio.wait_for(self._client.connect(self._socket), CONNECT_ATTEMPT)
        self._listener = asyncio.get_running_loop().create_task(self._listen())

    async def _listen(self) -> None:
        with self._client.listener() as listener:
            self._events = listener
            async for event in listener:
                self._handle(event)

    def _handle(self, event: Any) -> None:
        data = event.get("data")
        try:
            self._on_event(str(event["event"]), dict(data) if isinstance(data, dict) else {})
        except Exception:
            log.exception("QMP event handler failed")

    def execute(self, command: str, timeout: float = 5.0) -> Any:
        return self._loop.call(self._client.execute(command), timeout)

    def close(self) -> None:
        async def disconnect() -> None:
            # QEMU's last words (SHUTDOWN with its reason) come just before it exits: read
            # them before the session goes, and handle what the listener had not yet, so a
            # loaded loop cannot lose how the guest ended.
            try:
                await self._client.disconnect()
            finally:
                if self._listener is not None:
                    self._listener.cancel()
                if self._events is not None:
                    for event in self._events.clear():
                        self._handle(event)

        try:
            self._loop.call(disconnect(), timeout=5)
        except EOFError:
            pass  # QEMU had exited: the session ended with it
        except QMP_FAILURES as error:
            log.debug("QMP disconnect failed", extra={"error": repr(error)})
