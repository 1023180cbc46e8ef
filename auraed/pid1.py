"""auraed as pid 1 of a guest: the machine's init, kernel-facing, no gRPC.

`python -m auraed.pid1 CONFIG.json` is what the initramfs execs. It does, in order:

1. mounts /proc, /sys, /dev (devtmpfs), /dev/pts, /dev/shm, /run, /tmp and cgroup2 on
   /sys/fs/cgroup with every available controller enabled for the subtree, then the drive mounts;
2. brings up lo and eth0 (`fe80::2/64`, DAD off), waiting for the address through netlink
   events rather than a fixed sleep;
3. runs the real daemon (`python -m auraed --socket [::]:8080 ...`) as its one child, tini-style.

Why a child and not pid 1 itself: pid 1 inherits every orphan and must reap them all, while the
daemon's spawner owns the waits of the workloads (a catch-all waitpid there would steal their
statuses). With the daemon a child, pid 1's catch-all waitpid(-1) only ever sees the daemon and
orphans (the spawner is itself a subreaper, so workload orphans stay with it), and nothing is
stolen. The kernel gives pid 1 no default signal actions, so every signal it acts on has a handler:

- SIGTERM, SIGINT, SIGPWR, SIGUSR2 (busybox `poweroff`) and KEY_POWER on /dev/input/event0 (what
  QMP system_powerdown presses) begin the ordered shutdown;
- SIGCHLD: reap.

Ordered shutdown: SIGTERM to the daemon, which stops its workloads with their grace period and
flushes its logs; after `daemon_grace` seconds, SIGKILL. Then SIGTERM and later SIGKILL to every
process left, sync, unmount in reverse order, and reboot(POWER_OFF). pid 1 never exits: that would
panic the kernel. If the daemon ends by itself, the machine powers off the same way.

Standard library only, and quick to import: it runs before anything else in the guest.
"""

from __future__ import annotations

import errno
import json
import os
import select
import signal
import socket
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from auraed.kernel import libc

INPUT_EVENT = struct.Struct("llHHi")  # struct input_event on 64-bit: timeval, type, code, value
EV_KEY = 1
KEY_POWER = 116
SHUTDOWN_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGPWR, signal.SIGUSR2)
# After the daemon: how long the processes that remain get between SIGTERM and SIGKILL.
STRAGGLER_GRACE = 2.0
NETWORK_DEADLINE = 10.0


@dataclass(frozen=True)
class Drive:
    device: str
    path: str
    fs_type: str
    read_only: bool


@dataclass(frozen=True)
class Pid1Config:
    """What the host wrote for this guest (CONFIG.json), or a host test for its pid namespace."""

    daemon: list[str]
    daemon_grace: float = 15.0
    mount_system: bool = True
    cgroup: bool = True
    interface: str | None = "eth0"
    address: str = "fe80::2/64"
    drives: list[Drive] = field(default_factory=list)
    power_button: str | None = "/dev/input/event0"
    hostname: str | None = None

    @classmethod
    def load(cls, path: str) -> Pid1Config:
        raw = json.loads(Path(path).read_text())
        raw["drives"] = [Drive(**d) for d in raw.get("drives", [])]
        return cls(**raw)


def say(message: str) -> None:
    """A line on the console (the serial port the host captures)."""
    try:
        os.write(2, f"auraed-pid1: {message}\n".encode())
    except OSError:
        pass


class Init:
    def __init__(self, config: Pid1Config) -> None:
        self.config = config
        self.mounted: list[str] = []
        self.daemon_pid: int | None = None
        self.daemon_status: int | None = None
        self.reaped_orphans = 0
        self._wake_read, self._wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._pending: set[int] = set()
        self._button: int | None = None

    # ------------------------------------------------------------------ start

    def run(self) -> None:
        self._install_handlers()
        if self.config.mount_system:
            self._mount_system()
        self._mount_drives()
        if self.config.hostname:
            socket.sethostname(self.config.hostname)
        # The daemon starts before the network is configured: it binds [::]:8080, which needs no
        # address yet, and its start (Python imports, under TCG seconds) overlaps the link's.
        self.daemon_pid = self._spawn(self.config.daemon)
        say(f"daemon started (pid {self.daemon_pid})")
        self._network()
        self._open_power_button()
        reason = self._serve()
        self.shutdown(reason)

    def _install_handlers(self) -> None:
        signal.set_wakeup_fd(self._wake_write, warn_on_full_buffer=False)
        for signum in (*SHUTDOWN_SIGNALS, signal.SIGCHLD):
            signal.signal(signum, self._note)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)

    def _note(self, signum: int, frame: object) -> None:
        self._pending.add(signum)

    def _mount(self, source: str, target: str, fstype: str | None, flags: int = 0,
               data: str | None = None) -> None:
        os.makedirs(target, exist_ok=True)
        if os.path.ismount(target):
            return
        libc.mount(source, target, fstype, flags, data)
        self.mounted.append(target)

    def _mount_system(self) -> None:
        quiet = libc.MS_NOSUID | libc.MS_NODEV | libc.MS_NOEXEC
        self._mount("proc", "/proc", "proc", quiet)
        self._mount("sysfs", "/sys", "sysfs", quiet)
        self._mount("devtmpfs", "/dev", "devtmpfs", libc.MS_NOSUID, "mode=0755")
        self._mount("devpts", "/dev/pts", "devpts", libc.MS_NOSUID | libc.MS_NOEXEC,
                    "newinstance,ptmxmode=0666,mode=0620")
        self._mount("shm", "/dev/shm", "tmpfs", libc.MS_NOSUID | libc.MS_NODEV, "mode=1777")
        self._mount("run", "/run", "tmpfs", libc.MS_NOSUID | libc.MS_NODEV, "mode=0755")
        self._mount("tmp", "/tmp", "tmpfs", libc.MS_NOSUID | libc.MS_NODEV, "mode=1777")
        os.makedirs("/var/lib", exist_ok=True)
        self._mount("varlib", "/var/lib", "tmpfs", libc.MS_NOSUID | libc.MS_NODEV, "mode=0755")
        if self.config.cgroup:
            self._mount("cgroup2", "/sys/fs/cgroup", "cgroup2", quiet, "nsdelegate")
            enable_controllers(Path("/sys/fs/cgroup"))

    def _mount_drives(self) -> None:
        for drive in self.config.drives:
            # The device node appears once virtio-blk probed it; devtmpfs makes it.
            wait_for(lambda device=drive.device: os.path.exists(device), 10.0)
            try:
                self._mount(drive.device, drive.path, drive.fs_type,
                            libc.MS_RDONLY if drive.read_only else 0)
                say(f"mounted {drive.device} ({drive.fs_type}) at {drive.path}")
            except OSError as error:
                say(f"cannot mount {drive.device} at {drive.path}: {error.strerror}")

    def _network(self) -> None:
        from auraed.kernel.guest_network import configure

        try:
            configure(self.config.interface, self.config.address, NETWORK_DEADLINE)
        except OSError as error:
            say(f"network: {error}")

    def _open_power_button(self) -> None:
        path = self.config.power_button
        if path is None:
            return
        try:
            self._button = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as error:
            say(f"no power button at {path}: {error.strerror}")

    def _spawn(self, argv: list[str]) -> int:
        pid = os.fork()
        if pid == 0:
            try:
                for signum in (*SHUTDOWN_SIGNALS, signal.SIGCHLD, signal.SIGHUP):
                    signal.signal(signum, signal.SIG_DFL)
                signal.set_wakeup_fd(-1)
                os.close(self._wake_read)
                os.close(self._wake_write)
                os.setsid()
                if argv[:3] == [sys.executable, "-m", "auraed"]:
                    # Our own daemon: run it in this forked child instead of exec'ing a second
                    # interpreter (its start-up is measurable under TCG). Still a child of pid 1.
                    from auraed.__main__ import main as daemon_main

                    try:
                        daemon_main(argv[3:])
                    except SystemExit as done:
                        os._exit(done.code if isinstance(done.code, int) else 1)
                    os._exit(0)
                os.execvp(argv[0], argv)
            except BaseException as error:  # noqa: BLE001 -- the forked child must never return
                say(f"cannot exec {argv[0]}: {error}")
            finally:
                os._exit(127)
        return pid

    # ------------------------------------------------------------------ serve

    def _serve(self) -> str:
        """Reap until a shutdown is asked for or the daemon ends; returns why."""
        while True:
            reason = self._handle_pending()
            if reason is not None:
                return reason
            readable = [self._wake_read] + ([self._button] if self._button is not None else [])
            try:
                ready, _, _ = select.select(readable, [], [])
            except InterruptedError:
                continue
            if self._wake_read in ready:
                self._drain_wakeups()
            if self._button is not None and self._button in ready and self._power_pressed():
                return "power button"

    def _drain_wakeups(self) -> None:
        try:
            while os.read(self._wake_read, 512):
                pass
        except BlockingIOError:
            pass

    def _handle_pending(self) -> str | None:
        pending, self._pending = self._pending, set()
        if signal.SIGCHLD in pending or self.daemon_status is None:
            self._reap()
        for signum in SHUTDOWN_SIGNALS:
            if signum in pending:
                return signal.Signals(signum).name
        if self.daemon_status is not None:
            return f"the daemon ended ({describe_status(self.daemon_status)})"
        return None

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.daemon_pid:
                self.daemon_status = status
            else:
                self.reaped_orphans += 1

    def _power_pressed(self) -> bool:
        assert self._button is not None
        try:
            data = os.read(self._button, INPUT_EVENT.size * 16)
        except BlockingIOError:
            return False
        for offset in range(0, len(data) - INPUT_EVENT.size + 1, INPUT_EVENT.size):
            _, _, kind, code, value = INPUT_EVENT.unpack_from(data, offset)
            if kind == EV_KEY and code == KEY_POWER and value == 1:
                return True
        return False

    # ------------------------------------------------------------------ shutdown

    def shutdown(self, reason: str) -> None:
        say(f"shutting down: {reason}")
        if self.daemon_status is None and self.daemon_pid is not None:
            self._signal_daemon(signal.SIGTERM)
            if not self._wait(lambda: self.daemon_status is not None, self.config.daemon_grace):
                say("the daemon did not stop in time: SIGKILL")
                self._signal_daemon(signal.SIGKILL)
                self._wait(lambda: self.daemon_status is not None, 5.0)
        if self.daemon_status is not None:
            say(f"daemon {describe_status(self.daemon_status)}")
        self._end_everyone()
        say(f"reaped {self.reaped_orphans} orphans")
        os.sync()
        self._unmount()
        say("power off")
        libc.reboot(libc.RB_POWER_OFF)
        # Only reached where reboot(2) returned (it should not): never exit, that would panic.
        while True:
            signal.pause()

    def _signal_daemon(self, signum: int) -> None:
        assert self.daemon_pid is not None
        try:
            os.killpg(self.daemon_pid, signum)
        except ProcessLookupError:
            pass

    def _wait(self, done: object, timeout: float) -> bool:
        """Reap until done() or the timeout; signals that arrive meanwhile are only recorded."""
        assert callable(done)
        deadline = time.monotonic() + timeout
        while True:
            self._reap()
            self._pending.discard(signal.SIGCHLD)
            if done():
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            try:
                select.select([self._wake_read], [], [], min(remaining, 0.5))
            except InterruptedError:
                pass
            self._drain_wakeups()

    def _end_everyone(self) -> None:
        for signum, grace in ((signal.SIGTERM, STRAGGLER_GRACE), (signal.SIGKILL, 5.0)):
            try:
                os.kill(-1, signum)  # every process but pid 1
            except ProcessLookupError:
                return
            if self._wait(self._no_children, grace):
                return
            if signum == signal.SIGTERM:
                say(f"processes left {grace:.0f} s after SIGTERM: SIGKILL")

    def _no_children(self) -> bool:
        try:
            os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return True
        return False

    def _unmount(self) -> None:
        for target in reversed(self.mounted):
            try:
                libc.umount(target)
            except OSError as error:
                if error.errno in (errno.EBUSY, errno.EINVAL):
                    try:
                        libc.umount(target, libc.MNT_DETACH)
                    except OSError:
                        pass




def wait_for(condition: object, timeout: float) -> bool:
    assert callable(condition)
    deadline = time.monotonic() + timeout
    delay = 0.005
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.1)
    return True


def enable_controllers(root: Path) -> None:
    """Enable every controller the hierarchy offers for the subtree (the daemon's cells)."""
    available = (root / "cgroup.controllers").read_text().split()
    for controller in available:
        try:
            (root / "cgroup.subtree_control").write_text(f"+{controller}")
        except OSError as error:
            say(f"cgroup controller {controller}: {error.strerror}")


def describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exited with {os.WEXITSTATUS(status)}"


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        say("usage: python -m auraed.pid1 CONFIG.json")
        config = None
    else:
        try:
            config = Pid1Config.load(argv[0])
        except (OSError, ValueError, TypeError) as error:
            say(f"cannot read {argv[0]}: {error}")
            config = None
    if config is None:
        # Nothing to run; still never exit as pid 1.
        config = Pid1Config(daemon=["/bin/false"], mount_system=False, cgroup=False,
                            interface=None, power_button=None)
    Init(config).run()


if __name__ == "__main__":
    main(sys.argv[1:])
