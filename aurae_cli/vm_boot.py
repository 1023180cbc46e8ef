"""A VM's boot as someone at a terminal watches it: the time elapsed and the boot's phase, read
from the guest's serial console (QEMU's stdout, followed through Observe) while Start runs.

`aurae-py vms start ID` draws it on stderr (start_with_progress), and `aurae-py apply` under its
bar over the plan's steps (aurae_cli.progress.Steps), both from one BootWatch. Nothing is drawn
when the output is not a terminal: piped or logged, a command prints what it prints and no more.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aurae_sdk.client import Client

# (what the console shows, the phase it begins), in boot order. The kernel runs `quiet`, so the
# first lines are pid 1's (auraed.pid1) and then the guest daemon's own log.
CONSOLE_PHASES = (
    ("auraed-pid1: daemon started", "pid 1 started the guest's auraed"),
    # --serve-early: Health and Discovery answer first; Start returns on that health check.
    ("auraed answering health", "the guest's auraed answers; waiting for its health check"),
    ("auraed serving", "the guest's auraed serves every service"),
)
POLL_SECONDS = 0.5


def wanted() -> bool:
    return sys.stdout.isatty() and sys.stderr.isatty()


class BootWatch:
    """The phase of one VM's boot, from its cell's `qemu` executable and console."""

    def __init__(self, client: Client, vm_id: str) -> None:
        self.client = client
        self.cell = f"vm-{vm_id}"
        self.began = time.time()
        self.phase = "preparing (guest artefacts, accelerator)"
        self.last_line = ""
        self._following = False

    def describe(self) -> str:
        """The phase, and the console's last line: what a progress line shows (plain text)."""
        if not self.last_line:
            return self.phase
        return f"{self.phase} | {self.last_line[:80]}"

    def poll(self) -> None:
        """Find the QEMU this Start runs, once; then its console is followed on a thread."""
        if self._following:
            return
        try:
            cells = self.client.cells.list(timeout=5).cells
        except Exception:  # noqa: BLE001 -- progress is best effort; Start reports the errors
            return
        for node in cells:
            if node.cell.name != self.cell:
                continue
            for executable in node.executables:
                running = not executable.HasField("exit_code") and not executable.HasField("signal")
                if executable.name == "qemu" and running and executable.started_at >= self.began - 5:
                    self._following = True
                    self.phase = "QEMU started; the guest kernel boots"
                    threading.Thread(target=self._follow, args=(executable.pid,), daemon=True,
                                     name="console").start()

    def _follow(self, pid: int) -> None:
        from aurae_sdk.logs import follow

        try:
            for item in follow(self.client, pid, "stdout"):
                self.last_line = item.line.strip()
                for marker, phase in CONSOLE_PHASES:
                    if marker in item.line:
                        self.phase = phase
        except Exception as error:  # noqa: BLE001 -- the console ends with QEMU, or the command
            self.last_line = f"(console: {error})"


def start_with_progress(client: Client, request: dict[str, Any], timeout: float | None) -> Any:
    """Start, drawing the boot's progress on stderr until it returns (or fails)."""
    from rich.console import Console
    from rich.markup import escape

    vm_id = str(request.get("vm_id", ""))
    outcome: dict[str, Any] = {}

    def call() -> None:
        try:
            outcome["response"] = client.vms.start(request, timeout=timeout)
        except BaseException as error:  # noqa: BLE001 -- re-raised on the main thread
            outcome["error"] = error

    watch = BootWatch(client, vm_id)
    starter = threading.Thread(target=call, daemon=True, name="start")
    starter.start()
    console = Console(stderr=True)
    with console.status(f"booting {escape(vm_id)}") as status:
        while starter.is_alive():
            watch.poll()
            elapsed = time.time() - watch.began
            line = f" [dim]{escape(watch.last_line[:80])}[/dim]" if watch.last_line else ""
            status.update(f"booting {escape(vm_id)} [bold]{elapsed:5.1f} s[/bold] "
                          f"{escape(watch.phase)}{line}")
            starter.join(POLL_SECONDS)
    elapsed = time.time() - watch.began
    if "error" in outcome:
        console.print(f"[red]{escape(vm_id)} did not boot[/red] after {elapsed:.1f} s "
                      f"({escape(watch.phase)})")
        raise outcome["error"]
    console.print(f"[green]{escape(vm_id)} booted[/green] in {elapsed:.1f} s")
    return outcome["response"]
