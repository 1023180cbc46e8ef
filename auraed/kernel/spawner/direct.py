"""Starting a workload with no Python between fork and exec: CPython's own fork_exec.

The fork server forks itself and runs the child steps in Python (auraed.kernel.spawner.child)
only for what needs it: namespaces to join, a container's root filesystem. Everything else a
workload asks for is a fork_exec argument: stdio, close every other fd, a new session, umask,
working directory, environment, groups, gid and uid. The child is then C code from fork to
exec, and a vfork (no copy of the spawner's page tables, no copy-on-write faults afterwards)
when no ids change. Measured on the test machines (a small process, root cpu cgroup, loaded):
0.13 ms from fork_exec to a running `sh` against 0.2 ms for posix_spawn through ctypes; the
spawner's Python fork and its steps cost 1.5-3 ms more per start (bench/spawn.py).

fork_exec is private to subprocess, so its argument list is pinned here for the versions it is
known for (3.11-3.13 take the same 23); on any other one `available()` is False and the fork
server keeps to its Python fork. Standard library only: the fork server imports this.
"""

import errno
import os
import sys

try:
    import _posixsubprocess
except ImportError:  # another interpreter than CPython
    _posixsubprocess = None  # type: ignore[assignment]

_KNOWN_VERSIONS = ((3, 11), (3, 12), (3, 13))
UMASK = 0o022


def available() -> bool:
    """Whether this interpreter's fork_exec takes the arguments start() gives it."""
    return _posixsubprocess is not None and sys.version_info[:2] in _KNOWN_VERSIONS


class StartFailed(Exception):
    """The child could not get to exec; nothing of it is left (it was reaped).

    stage is "chdir", "exec" or "setup" (the groups, gid or uid, or the working directory
    when ids change too: fork_exec does not say which)."""

    def __init__(self, stage: str, error: int) -> None:
        super().__init__(stage, error)
        self.stage = stage
        self.errno = error


def start(executables: list[str], argv: list[str], env: dict[str, str],
          stdio: tuple[int, int, int], *, cwd: str, ids: tuple[int, int] | None) -> int:
    """Exec the first of `executables` that runs (execvp's rule: the first error other than
    a missing file is the one reported) as the leader of a new session with `stdio` as fds
    0-2 and no other fd, umask 022, in `cwd` with exactly `env`; as `ids` (uid, gid) with no
    supplementary groups, or with the caller's own ids and groups if None. Returns the pid
    once it runs the program; StartFailed if it could not (the child was reaped).

    Signals need no work: the caller has none ignored or blocked, and exec resets caught ones.
    """
    if not executables:
        raise StartFailed("exec", errno.ENOENT)
    # None, not -1: fork_exec treats any id given, even -1, as a change, and then will not vfork.
    uid, gid = ids if ids is not None else (None, None)
    groups: list[int] | None = [] if ids is not None else None
    report_r, report_w = os.pipe2(os.O_CLOEXEC)
    try:
        pid = _posixsubprocess.fork_exec(
            [os.fsencode(arg) for arg in argv], [os.fsencode(e) for e in executables],
            True, (report_w,), cwd, [os.fsencode(f"{key}={value}") for key, value in env.items()],
            stdio[0], -1, -1, stdio[1], -1, stdio[2], report_r, report_w,
            # No preexec_fn (typeshed wants one; None is what subprocess passes for none).
            True, True, -1, gid, groups, uid, UMASK, None, True,  # type: ignore[arg-type]
        )
        os.close(report_w)
        report_w = -1
        report = read_to_end(report_r)
    finally:
        for fd in (report_r, report_w):
            if fd >= 0:
                os.close(fd)
    if not report:
        return pid
    os.waitpid(pid, 0)
    raise _failure(report, ids_change=ids is not None)


def _failure(report: bytes, ids_change: bool) -> StartFailed:
    """What the child wrote before it exited: b"OSError:<hex errno>:<where>", where is
    "noexec" for a step before exec (some versions say "noexec:chdir" for that one) or empty
    for exec itself. Of the steps before exec only chdir and the id changes can fail."""
    _, hex_errno, where = (report.split(b":", 2) + [b"", b""])[:3]
    try:
        error = int(hex_errno, 16)
    except ValueError:
        error = 0
    if not where.startswith(b"noexec"):
        return StartFailed("exec", error)
    if where == b"noexec:chdir" or not ids_change:
        return StartFailed("chdir", error)
    return StartFailed("setup", error)


def read_to_end(fd: int) -> bytes:
    """Everything a pipe or small file gives until end of file (a child's report, a /proc
    file), with plain reads."""
    data = b""
    while chunk := os.read(fd, 4096):
        data += chunk
    return data
