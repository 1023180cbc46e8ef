"""The spawner's protocol, and its lifetime beyond its daemon, on the real kernel: a client
detaches, the workloads run on and their output still lands in the files, and the next
client adopts them with their labels, records and exit statuses."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from auraed.kernel.processes import ExitStatus, SpawnedProcess, SpawnSpec
from auraed.kernel.spawner.client import Adoption, Spawner, SpawnerRefused
from auraed.kernel.spawner.protocol import (
    PROTOCOL_VERSION,
    Adopt,
    Adopted,
    Flush,
    Flushed,
    Keep,
    ProtocolMismatch,
    Ready,
    SpawnError,
    SpawnRequest,
    check_version,
    decode,
)
from auraed.kernel.spawner.state import write_state
from auraed.output.log import OutputLog, follow_all
from tests.support.processes import alive, read_fifo_line

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


def wait_until(condition: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_messages_round_trip_and_unknown_fields_are_ignored() -> None:
    request = SpawnRequest(id=3, argv=["true"], uid=0, gid=0, env={"PATH": "/bin"},
                           label={"name": "x"})
    assert decode(request.encode()) == request
    # A newer peer's extra field is dropped, not an error: fields can be added freely.
    newer = request.encode().replace(b'{"kind": "spawn"', b'{"kind": "spawn", "future": 1')
    assert decode(newer) == request
    with pytest.raises(SpawnError, match="malformed"):
        decode(b'{"kind": "teleport"}')
    with pytest.raises(SpawnError, match="malformed"):
        decode(b"not json")
    assert decode(Keep(key="cell a", value={"n": 1}).encode()) == Keep(key="cell a",
                                                                        value={"n": 1})
    flush = Flush(id=4, processes=[[123, 456]])
    assert decode(flush.encode()) == flush and decode(Flushed(id=4).encode()) == Flushed(id=4)
    # What a spawner from before Flush says first: no flushes_output, read as "cannot".
    older = decode(b'{"kind": "ready", "pid": 9, "version": 1, "continues_output": true}')
    assert isinstance(older, Ready) and not older.flushes_output
    check_version(PROTOCOL_VERSION, "peer")
    with pytest.raises(ProtocolMismatch, match="version 0; this side speaks"):
        check_version(0, "the spawner")


@pytest.fixture
def runtime(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path
    # Whatever a failed test left: the spawner that listens there, stopped with its workloads.
    leftover = Spawner(lambda pid, start_time, status: None, listen=str(tmp_path / "spawner.sock"))
    try:
        if leftover.attach(timeout=5) is not None:
            leftover.close()
    except SpawnerRefused:
        pass


def captured(directory: Path) -> tuple[OutputLog, OutputLog]:
    return tuple(OutputLog.mirror(directory, channel, segment_bytes=1 << 20, max_segments=4)
                 for channel in ("stdout", "stderr"))  # type: ignore[return-value]


def lines_on_disk(directory: Path, channel: str = "stdout") -> list[bytes]:
    lines = []
    for segment in sorted(directory.glob(f"{channel}.*.log")):
        lines += [record.partition(b" ")[2] for record in segment.read_bytes().splitlines()]
    return lines


def test_a_detached_spawner_keeps_everything_and_the_next_client_adopts_it(runtime: Path) -> None:
    socket_path = str(runtime / "spawner.sock")
    exits: list[tuple[int, ExitStatus]] = []
    first = Spawner(lambda pid, start_time, status: exits.append((pid, status)), listen=socket_path)
    first.start()
    spawner_pid = first.pid
    counter_logs = captured(runtime / "counter")
    counter = first.spawn(SpawnSpec(
        command="i=0; while :; do echo $i; i=$((i+1)); sleep 0.01; done", uid=0, gid=0,
        capture=counter_logs, label={"name": "counter"}))
    short = first.spawn(SpawnSpec(command="sleep 0.5; exit 5", uid=0, gid=0,
                                  capture=captured(runtime / "short"), label={"name": "short"}))
    first.keep("cell a", {"limits": {"cpu_weight": 50}})
    first.keep("cell gone", {})
    first.forget("cell gone")
    wait_until(lambda: counter_logs[0].position()[2] > 0)  # the mirror follows the writer
    first.detach()

    # No client: the workloads run on, output still lands in the files, exits are kept.
    # Reaped (not only a zombie): the spawner has its status.
    wait_until(lambda: not Path(f"/proc/{short.host_pid}").exists())
    written = len(lines_on_disk(runtime / "counter"))
    wait_until(lambda: len(lines_on_disk(runtime / "counter")) > written + 5)
    assert alive(counter.host_pid) and alive(spawner_pid)
    assert exits == []

    second_exits: list[tuple[int, ExitStatus]] = []
    second = Spawner(lambda pid, start_time, status: second_exits.append((pid, status)), listen=socket_path)
    adoption = second.attach()
    try:
        assert isinstance(adoption, Adoption) and adoption.spawner_pid == spawner_pid
        assert adoption.records == {"cell a": {"limits": {"cpu_weight": 50}}}
        by_name = {p.label["name"]: p for p in adoption.processes if p.label}
        assert by_name["counter"].process == counter and by_name["counter"].status is None
        assert by_name["short"].status == ExitStatus(5, None)
        # A second client is refused while this one is attached.
        with pytest.raises(SpawnerRefused, match="serves another auraed"):
            Spawner(lambda pid, start_time, status: None, listen=socket_path).attach()
        # The adopted log goes on being followed, and its exit comes to the new client.
        stdout = by_name["counter"].outputs["stdout"]
        at_adoption = stdout.position()
        wait_until(lambda: stdout.position() != at_adoption)
        os.kill(counter.host_pid, signal.SIGTERM)
        wait_until(lambda: stdout.complete and any(p == counter.host_pid for p, _ in second_exits))
        numbers = [int(line) for line in lines_on_disk(runtime / "counter")]
        assert numbers == list(range(len(numbers)))  # each once, none lost across the detach
    finally:
        second.close()
    assert not alive(spawner_pid)
    os.waitpid(spawner_pid, 0)  # our child still (the first client started it): reap it
    assert not Path(socket_path).exists() or Spawner(
        lambda pid, start_time, status: None, listen=socket_path).attach() is None


def test_a_flush_brings_the_followed_log_up_to_what_was_written(runtime: Path) -> None:
    # The workload writes a line, then says so through a fifo; once flush_output returns, the
    # log the daemon follows holds the line (without it, the spawner's report of the line may
    # still be on its way).
    request, ready = runtime / "request", runtime / "ready"
    os.mkfifo(request)
    os.mkfifo(ready)
    request_fd, ready_fd = os.open(request, os.O_RDWR), os.open(ready, os.O_RDWR)
    spawner = Spawner(lambda pid, start_time, status: None)
    spawner.start()
    try:
        assert spawner.flushes_output
        logs = captured(runtime / "writer")
        writer = spawner.spawn(SpawnSpec(
            command=f'while read n < {request}; do echo "line $n"; echo "$n" > {ready}; done',
            uid=0, gid=0, capture=logs))
        for n in range(50):
            os.write(request_fd, f"{n}\n".encode())
            assert read_fifo_line(ready_fd) == f"{n}\n".encode()
            assert spawner.flush_output([writer])
            replayed = [line for _, lines in follow_all([logs[0]], lambda: False,
                                                        replay_only=True) for _, line in lines]
            assert replayed == [f"line {i}".encode() for i in range(n + 1)], f"flush {n}"
    finally:
        spawner.close()
        os.close(request_fd)
        os.close(ready_fd)


def test_a_spawner_that_cannot_flush_is_adopted_and_never_asked_to(runtime: Path) -> None:
    # What a spawner from before Flush says: no flushes_output in its Ready. The daemon adopts
    # it as before and replays what was reported, sending it nothing it would not understand.
    path = runtime / "spawner.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(str(path))
    listener.listen(1)
    received: list[object] = []

    def older_spawner() -> None:
        connection, _ = listener.accept()
        connection.send(json.dumps({"kind": "ready", "pid": os.getpid(), "version": 1,
                                    "busy": False, "continues_output": True}).encode())
        received.append(decode(connection.recv(1 << 20)))
        state_path = str(runtime / "spawner.state")
        digest = write_state(state_path, PROTOCOL_VERSION, {"records": {}, "processes": []})
        connection.send(Adopted(path=state_path, digest=digest).encode())
        while data := connection.recv(1 << 20):  # until the client lets go
            received.append(decode(data))
        connection.close()

    thread = threading.Thread(target=older_spawner, daemon=True)
    thread.start()
    client = Spawner(lambda pid, start_time, status: None, listen=str(path))
    try:
        adoption = client.attach(timeout=10)
        assert adoption is not None and adoption.processes == []
        assert not client.flushes_output
        assert not client.flush_output([SpawnedProcess(host_pid=1, ns_pid=1, pgid=1,
                                                       start_time=1)])
    finally:
        client.detach()  # not close(): its Stop would wait for the "spawner", this process
        listener.close()
        thread.join(10)
    assert received == [Adopt()]  # no Flush, nor anything else it would not know
