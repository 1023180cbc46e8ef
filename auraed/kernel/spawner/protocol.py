"""The spawner's wire protocol: the messages the daemon and the fork server exchange.

Both sides import these classes; nothing else spells a message. Each message is one JSON object on
an AF_UNIX SOCK_SEQPACKET socket (one sendmsg, one message), tagged by its `kind`:

  daemon -> spawner  SpawnRequest   start a workload; SCM_RIGHTS [stdout fd, stderr fd], or
                                    none with `capture`: the spawner makes the pipes and
                                    writes the output to files itself
                     HolderRequest  start a cell's namespace holder; the same fds
                     Keep, Forget   hold (or drop) a record of the daemon's under a key
                     Release        the daemon is done with a process's entry (it exited)
                     Adopt          write the state file; answered by Adopted
                     Flush          read what the named processes' capture pipes hold now;
                                    answered by Output (if any was read), then Flushed
                     Stop           kill every workload and exit
  spawner -> daemon  Ready          first on every connection: pid, PROTOCOL_VERSION, and
                                    whether another daemon is attached already
                     Spawned        a request's process runs its argv
                     Failed         a request left nothing running; carries a SpawnError
                     Exited         a spawned process ended (raw wait status)
                     Output         how far captured output files are written
                     Adopted        where the state file is, and its digest
                     Flushed        a Flush is done: its Output went before

A reply (Spawned or Failed) always precedes the Exited and Output of its pid.

The first daemon hands the spawner one end of a socketpair. With a listening socket
(`--listen PATH`, in the daemon's runtime directory) the spawner outlives its daemon: end of
file on the connection only detaches it. Processes run on, their exits are kept with their
labels, output still lands in the files, and the next daemon connects to PATH and adopts
everything through the state file (see auraed.kernel.spawner.state). Without one, end of
file means the daemon is gone for good: every workload is killed, then the spawner exits.

Extending it: a new field gets a default and an older peer ignores fields it does not know
(decode drops them), so a field can be added without a version change. A new message kind the
daemon sends is announced by the spawner as a capability in Ready (a flag that defaults to False,
as `flushes_output` does for Flush): the daemon sends it only to a spawner that said so, and an
older spawner, which says nothing, is still adopted and served as before. A change an older peer
could not be told apart from (a field whose absence would mislead, a message it would take for
another) bumps PROTOCOL_VERSION; a peer that speaks another version is refused at Ready with both
versions named (see check_version).

Standard library only: the fork server imports this and must start fast.
"""

import errno as errno_codes
import json
import mmap
import os
from dataclasses import dataclass, field, fields
from typing import ClassVar

PROTOCOL_VERSION = 1
# Room for the longest command exec takes (MAX_ARG_STRLEN, 128 KiB) even when JSON spells each
# of its bytes as a six-byte \u escape (control characters), with its environment.
MAX_MESSAGE_BYTES = 1024 * 1024


def message_buffer() -> mmap.mmap:
    """One receive buffer for every message, as large as the largest. Anonymous memory, so a
    page is written only once a message reaches it: a bytearray of that size is zeroed at
    once, 1 MiB written in each process that reads messages (measured in a spawned instance,
    whose daemon and spawner each had one)."""
    return mmap.mmap(-1, MAX_MESSAGE_BYTES)


@dataclass
class SpawnError(Exception):
    """A spawn that left nothing running; nothing of it is left to clean up.

    stage is the step that failed: request, namespace, unshare, setns, fork, cgroup, holder,
    setsid, setgroups, setgid, setuid, chdir, stdio, mount, sethostname, loopback, exec, or
    setup for anything else in the child. message is for people (strerror and the subject).
    """

    stage: str
    errno: int
    message: str

    def __str__(self) -> str:
        return f"spawn failed at {self.stage}: {self.message}"

    @classmethod
    def at(cls, stage: str, errno: int, subject: str = "") -> "SpawnError":
        """The error of a step on `subject` (a path, a name) that failed with `errno`."""
        reason = os.strerror(errno) if errno else "failed"
        return cls(stage, errno, f"{subject}: {reason}" if subject else reason)

    @classmethod
    def malformed(cls, what: str) -> "SpawnError":
        return cls.at("request", errno_codes.EINVAL, what)


class ProtocolMismatch(Exception):
    """The peer speaks a protocol version this side cannot."""


class Message:
    """Base of every message: `kind` on the wire is the class's KIND."""

    KIND: ClassVar[str]
    _FIELDS: ClassVar[frozenset[str]]

    def encode(self) -> bytes:
        # Not ensure_ascii: non-ASCII goes as UTF-8, not as six-byte escapes.
        return json.dumps({"kind": self.KIND, **vars(self)}, ensure_ascii=False).encode()


_KINDS: dict[str, type[Message]] = {}


def _message(cls: type[Message]) -> type[Message]:
    """Register a message dataclass under its KIND."""
    cls._FIELDS = frozenset(f.name for f in fields(cls))  # type: ignore[arg-type]
    _KINDS[cls.KIND] = cls
    return cls


def decode(data: bytes | bytearray) -> Message:
    """The message in `data`; SpawnError (stage "request") if it is none."""
    try:
        raw = json.loads(data)
        cls = _KINDS[raw.pop("kind")]
        return cls(**{name: value for name, value in raw.items() if name in cls._FIELDS})
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        raise SpawnError.malformed(f"malformed message ({error!r})") from None


def check_version(theirs: int, who: str) -> None:
    """Refuse a peer of another protocol version, naming both."""
    if theirs != PROTOCOL_VERSION:
        raise ProtocolMismatch(f"{who} speaks spawner protocol version {theirs}; this side "
                               f"speaks {PROTOCOL_VERSION}")


@_message
@dataclass(kw_only=True)
class Ready(Message):
    """busy: another daemon is attached; this connection is closed after Ready.
    continues_output: the spawner understands Capture.continues (an older one would ignore it
    and write over the earlier run's first segment).
    flushes_output: the spawner answers Flush (an older one would answer Failed)."""

    KIND = "ready"
    pid: int
    version: int = PROTOCOL_VERSION
    busy: bool = False
    continues_output: bool = False
    flushes_output: bool = False


@dataclass(kw_only=True)
class Capture:
    """Output capture done by the spawner: lines of stdout and stderr, timestamped, to
    size-rotated segment files in `directory` (the format of auraed.output.log). The
    directory is new (named for this start) and made with the first line."""

    directory: str
    segment_bytes: int
    max_segments: int
    # {channel: [first, next]}: go on from a finished log in `directory` (see
    # OutputLog's `continues`); a channel not named starts a new log.
    continues: dict[str, list[int]] | None = None


@_message
@dataclass(kw_only=True)
class SpawnRequest(Message):
    """Start argv as uid:gid in cwd with env, after joining `cgroup_join` (files to write "0"
    to) or being born in `cgroup_birth` (a cgroup2 directory), and `namespaces` ({kind: path})."""

    KIND = "spawn"
    id: int
    argv: list[str]
    uid: int
    gid: int
    env: dict[str, str]
    cwd: str = "/"
    cgroup_join: list[str] = field(default_factory=list)
    cgroup_birth: str | None = None
    # The cgroups limit memory: not visited by the spawner (see SpawnSpec.memory_limited).
    # A spawner that predates the field ignores it.
    memory_limited: bool = False
    namespaces: dict[str, str] = field(default_factory=dict)
    # A container's root filesystem, made and entered by the child (auraed.kernel.rootfs);
    # cwd and argv are then the container's.
    rootfs: dict[str, object] | None = None
    # What the daemon wants back on adoption (names, command, ...); opaque here.
    label: dict[str, object] | None = None
    # {"directory", "segment_bytes", "max_segments"} of a Capture; then no fds are passed.
    capture: dict[str, object] | None = None


@_message
@dataclass(kw_only=True)
class HolderRequest(SpawnRequest):
    """Start a cell's namespace holder: like a spawn, then unshare the kinds in `unshare` and
    run argv as pid 1 of the new pid namespace, named `hostname`."""

    KIND = "holder"
    unshare: list[str]
    hostname: str = ""


@_message
@dataclass(kw_only=True)
class Spawned(Message):
    """The request's process runs: its pid here, in its own pid namespace, and its start time
    (clock ticks since boot, /proc/<pid>/stat field 22)."""

    KIND = "spawned"
    id: int
    pid: int
    ns_pid: int
    start_time: int


@_message
@dataclass(kw_only=True)
class Failed(Message):
    KIND = "failed"
    id: int | None
    stage: str
    errno: int
    message: str

    @classmethod
    def of(cls, request_id: int | None, error: SpawnError) -> "Failed":
        return cls(id=request_id, stage=error.stage, errno=error.errno, message=error.message)

    def error(self) -> SpawnError:
        return SpawnError(self.stage, self.errno, self.message)


@_message
@dataclass(kw_only=True)
class Exited(Message):
    """A spawned process ended; status is the raw wait status. start_time (the process's, as
    in Spawned) tells it from a later process given the same pid: 0 from an older spawner."""

    KIND = "exited"
    pid: int
    status: int
    start_time: int = 0



@_message
@dataclass(kw_only=True)
class Output(Message):
    """Captured output written since the last Output: per channel [pid, channel, first
    segment, last segment, bytes of whole records in the last, complete]."""

    KIND = "output"
    logs: list[list[object]]


@_message
@dataclass(kw_only=True)
class Flush(Message):
    """Read what the capture pipes of these processes ([pid, start time] each) hold right now
    into their logs, and report it (Output), before Flushed: a daemon that then reads up to the
    position it was told holds everything the processes wrote before the Flush. Only what is in
    the pipes when it comes is read, so a process that writes on without pause cannot hold the
    spawner up."""

    KIND = "flush"
    id: int
    processes: list[list[int]]


@_message
@dataclass(kw_only=True)
class Flushed(Message):
    KIND = "flushed"
    id: int


@_message
@dataclass(kw_only=True)
class Join(Message):
    """Join the cgroups of these files (writing "0" to each, as `--join` does at the start)
    and come back to them after every visit: for a spawner started before its daemon knew
    where its cgroups are (a spare daemon's, before its claim). Answered: Joined, or Failed:
    then the spawner is back in its own cgroups if it had any; one that had none may be left
    in some of the new ones (its daemon's start fails then, and its host frees its cell)."""

    KIND = "join"
    id: int
    files: list[str]


@_message
@dataclass(kw_only=True)
class Joined(Message):
    KIND = "joined"
    id: int


@_message
@dataclass(kw_only=True)
class Keep(Message):
    """Hold `value` under `key` until Forget: state of the daemon's that must outlive it
    (a cell's name and limits, say). Not answered."""

    KIND = "keep"
    key: str
    value: dict[str, object]


@_message
@dataclass(kw_only=True)
class Forget(Message):
    KIND = "forget"
    key: str


@_message
@dataclass(kw_only=True)
class Release(Message):
    """The daemon no longer needs the entry of this exited (or holder) process. Not answered."""

    KIND = "release"
    pid: int
    start_time: int


@_message
@dataclass(kw_only=True)
class Adopt(Message):
    KIND = "adopt"


@_message
@dataclass(kw_only=True)
class Adopted(Message):
    """The spawner's state is in `path` (see auraed.kernel.spawner.state), `digest` its
    SHA-256; from now on this connection is the attached daemon's."""

    KIND = "adopted"
    path: str
    digest: str


@_message
@dataclass(kw_only=True)
class Stop(Message):
    KIND = "stop"
