"""An executable: one shell command line the daemon started, and how it ended."""

from __future__ import annotations

import grp
import pwd
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from auraed.errors import InvalidArgument, Subject
from auraed.kernel.processes import ExitStatus, SpawnedProcess, default_env, exec_refusal
from auraed.output import OutputLog
from auraed.runtime.names import CellName
from auraed.runtime.restarts import RestartState


@dataclass(frozen=True)
class ExecutableKey:
    """Executables are named uniquely per cell; host-level ones have cell None."""

    cell: CellName | None
    name: str

    def __str__(self) -> str:
        return f"{self.cell}/{self.name}" if self.cell else self.name


@dataclass(eq=False)
class Executable:
    key: ExecutableKey
    command: str
    description: str
    uid: int
    gid: int
    process: SpawnedProcess
    stdout: OutputLog
    stderr: OutputLog
    log_dir: Path
    started_at: float = field(default_factory=time.time)
    exit_status: ExitStatus | None = None
    exited_at: float = 0.0
    oom_killed: bool = False
    # Host level: the executable's own cgroup (a scope, see CgroupBackend.create_scope).
    scope: str | None = None
    # The OOM kill counter of its cgroup (its cell's, or its scope's) when it started, and how
    # many OOM kills that counter gained while it ran (its own death among them, or not).
    oom_kills_at_start: int = 0
    cell_oom_kills: int = 0
    # Whether the daemon sent it SIGKILL (Stop after the grace period): then its SIGKILL
    # death is not the OOM killer's.
    killed_by_daemon: bool = False
    # Called once the executable is forgotten: a container releases its filesystem.
    release: Callable[[], None] = field(default=lambda: None, repr=False)
    restart: RestartState = field(default_factory=RestartState)
    # What the caller recorded with it (Executable.labels), sorted by key.
    labels: tuple[tuple[str, str], ...] = ()
    _exited: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def name(self) -> str:
        return self.key.name

    @property
    def cell(self) -> CellName | None:
        return self.key.cell

    @property
    def running(self) -> bool:
        return not self._exited.is_set()

    def mark_exited(self, status: ExitStatus, when: float | None = None) -> None:
        self.exit_status = status
        self.exited_at = time.time() if when is None else when
        self._exited.set()

    def wait(self, timeout: float | None) -> bool:
        """Block until the process has exited; False if `timeout` passed first."""
        return self._exited.wait(timeout)

    def channel_name(self, stream: str) -> str:
        """The LogItem channel for this executable's `stream` ("stdout"/"stderr")."""
        return f"{self.name}::{stream}"


def check_command(command: str) -> None:
    """A shell command line Start can run: not blank, no NUL, and exactly what exec takes as
    `sh -c COMMAND` (E2BIG counted as the kernel counts)."""
    if not command.strip():
        raise InvalidArgument("a command is required", subject=Subject.COMMAND)
    if "\0" in command:
        raise InvalidArgument("the command must not contain NUL bytes", subject=Subject.COMMAND)
    refusal = exec_refusal(["/bin/sh", "-c", command], default_env())
    if refusal is not None:
        raise InvalidArgument(f"the command is too long for exec: {refusal}",
                              subject=Subject.COMMAND)


def check_identity(uid: int, gid: int) -> None:
    """A uid and gid this host knows."""
    try:
        pwd.getpwuid(uid)
    except KeyError:
        raise InvalidArgument(f"no user with uid {uid} on this host",
                              subject=Subject.USER) from None
    try:
        grp.getgrgid(gid)
    except KeyError:
        raise InvalidArgument(f"no group with gid {gid} on this host",
                              subject=Subject.GROUP) from None
