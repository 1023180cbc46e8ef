"""Observe against a real auraed: output streams (replayed, then live),
batches, the daemon's own log, and the signals feed."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

import aurae_sdk
from aurae_sdk import observe
from tests.support.processes import read_fifo_line


def test_output_written_before_the_subscription_is_replayed(client: aurae_sdk.Client) -> None:
    client.cells.allocate(cell={"name": "echoes"})
    try:
        started = client.cells.start(
            cell_name="echoes",
            executable={"name": "hello", "command": "echo hello; echo oops >&2; exit 3"},
        )
        assert client.cells.wait(cell_name="echoes", executable_name="hello", timeout=10).status.exit_code == 3
        # The process is gone; its output is still there, and the stream ends.
        out = [r.item for r in client.observe.get_sub_process_stream(
            process_id=started.pid, channel_type=observe.LOG_CHANNEL_TYPE_STDOUT, timeout=10)]
        err = [r.item for r in client.observe.get_sub_process_stream(
            process_id=started.pid, channel_type="LOG_CHANNEL_TYPE_STDERR", timeout=10)]
        assert [(i.channel, i.line) for i in out] == [("hello::stdout", "hello")]
        assert [(i.channel, i.line) for i in err] == [("hello::stderr", "oops")]
        assert abs(out[0].timestamp - time.time()) < 60
        both = {(r.item.channel, r.item.line) for r in client.observe.get_sub_process_stream(
            process_id=started.pid, timeout=10)}
        assert both == {("hello::stdout", "hello"), ("hello::stderr", "oops")}
    finally:
        client.cells.free(cell_name="echoes")


def test_live_lines_arrive_as_they_are_written(client: aurae_sdk.Client) -> None:
    client.cells.allocate(cell={"name": "ticker"})
    try:
        started = client.cells.start(
            cell_name="ticker",
            executable={"name": "tick", "command": "echo early; sleep 0.5; for i in 1 2 3; do echo tick $i; sleep 0.2; done"},
        )
        arrivals = []
        for response in client.observe.get_sub_process_stream(
                process_id=started.pid, channel_type="LOG_CHANNEL_TYPE_STDOUT", timeout=15):
            arrivals.append((time.monotonic(), response.item.line))
        assert [line for _, line in arrivals] == ["early", "tick 1", "tick 2", "tick 3"]
        # Live lines came spread out, not all at the end.
        assert arrivals[-1][0] - arrivals[1][0] >= 0.3
    finally:
        client.cells.free(cell_name="ticker")


def test_batched_output_keeps_every_line_in_order(client: aurae_sdk.Client) -> None:
    client.cells.allocate(cell={"name": "chatty"})
    try:
        started = client.cells.start(cell_name="chatty",
                                     executable={"name": "seq", "command": "seq 1 20000"})
        lines = []
        responses = 0
        for response in client.observe.get_sub_process_stream(
                process_id=started.pid, channel_type="LOG_CHANNEL_TYPE_STDOUT",
                max_batch_lines=500, timeout=30):
            responses += 1
            assert not response.HasField("item")
            assert len(response.items) <= 500
            lines.extend(item.line for item in response.items)
        assert lines == [str(n) for n in range(1, 20001)]
        assert responses < 20000 / 10
    finally:
        client.cells.free(cell_name="chatty")


def test_a_stopped_executables_output_is_refused_not_waited_for(client: aurae_sdk.Client) -> None:
    # Stop drops the output with the executable; its record stays for Wait. A replay of it
    # once spun a daemon thread forever on the removed files (the position still said bytes).
    client.cells.allocate(cell={"name": "stopped-out"})
    try:
        client.cells.start(cell_name="stopped-out",
                           executable={"name": "talker", "command": "echo said; exec sleep 600"})
        selector = {"cell_name": "stopped-out", "executable_name": "talker"}
        deadline = time.monotonic() + 30
        while not list(client.observe.get_sub_process_stream(executable=selector,
                                                             replay_only=True, timeout=10)):
            assert time.monotonic() < deadline, "the line never reached the daemon"
            time.sleep(0.05)
        client.cells.stop(cell_name="stopped-out", executable_name="talker")
        for replay_only in (True, False):
            with pytest.raises(aurae_sdk.FailedPrecondition, match="its output was dropped"):
                list(client.observe.get_sub_process_stream(
                    executable=selector, replay_only=replay_only, timeout=10))
        assert client.cells.wait(cell_name="stopped-out", executable_name="talker",
                                 timeout=10).status.HasField("signal")
    finally:
        client.cells.free(cell_name="stopped-out")


def test_a_replay_just_after_a_write_holds_it(client: aurae_sdk.Client, tmp_path: Path) -> None:
    # The spawner reads the pipe and reports its position a moment after the workload writes;
    # a replay_only taken in that moment once missed the line ("what the process has written
    # so far"). The workload writes a line, then says so through a fifo; the replay follows.
    request, ready = tmp_path / "request", tmp_path / "ready"
    os.mkfifo(request)
    os.mkfifo(ready)
    # Held open both ways: the workload's opens never block and the test never sees EOF.
    request_fd = os.open(request, os.O_RDWR)
    ready_fd = os.open(ready, os.O_RDWR)
    selector = {"executable_name": "replay-race"}
    client.cells.start(executable={
        "name": "replay-race",
        "command": f'while read n < {request}; do echo "line $n"; echo "$n" > {ready}; done'})
    try:
        for n in range(50):
            os.write(request_fd, f"{n}\n".encode())
            assert read_fifo_line(ready_fd) == f"{n}\n".encode()
            lines = [r.item.line for r in client.observe.get_sub_process_stream(
                executable=selector, channel_type="LOG_CHANNEL_TYPE_STDOUT", replay_only=True,
                timeout=30)]
            assert lines == [f"line {i}" for i in range(n + 1)], f"replay {n}"
    finally:
        client.cells.stop(executable_name="replay-race")
        os.close(request_fd)
        os.close(ready_fd)


def test_unknown_process_id(client: aurae_sdk.Client) -> None:
    try:
        list(client.observe.get_sub_process_stream(process_id=999_999_999, timeout=5))
    except aurae_sdk.NotFound as error:
        assert error.field == "process_id"
    else:
        raise AssertionError("expected NotFound")


def test_daemon_log_lines_stream(client: aurae_sdk.Client) -> None:
    seen: list[str] = []
    stream = client.observe.get_aurae_daemon_log_stream()

    def follow() -> None:
        for response in stream:
            seen.append(response.item.line)
            if "logcell" in response.item.line and "cell allocated" in response.item.line:
                return

    reader = threading.Thread(target=follow)
    reader.start()
    time.sleep(0.3)  # the subscription is live before the event
    client.cells.allocate(cell={"name": "logcell"})
    reader.join(10)
    stream.cancel()
    client.cells.free(cell_name="logcell")
    assert any("cell=logcell" in line and "cell allocated" in line for line in seen), seen


def test_signals_stream_reports_delivered_and_fatal_signals_by_cell(client: aurae_sdk.Client) -> None:
    client.cells.allocate(cell={"name": "sig-a"})
    client.cells.allocate(cell={"name": "sig-b"})
    events: list[observe.Signal] = []
    stream = client.observe.get_posix_signals_stream(
        workload={"workload_type": "WORKLOAD_TYPE_CELL", "id": "sig-a"})

    def follow() -> None:
        for response in stream:
            events.append(response.signal)

    reader = threading.Thread(target=follow)
    reader.start()
    try:
        time.sleep(0.3)
        a = client.cells.start(cell_name="sig-a", executable={"name": "term", "command": "sleep 300"})
        b = client.cells.start(cell_name="sig-b", executable={"name": "other", "command": "sleep 300"})
        client.cells.stop(cell_name="sig-a", executable_name="term")
        client.cells.stop(cell_name="sig-b", executable_name="other")
        deadline = time.monotonic() + 5
        while len(events) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stream.cancel()
        reader.join(5)
        client.cells.free(cell_name="sig-a")
        client.cells.free(cell_name="sig-b")
    # SIGTERM delivered by Stop, then the same signal reported as what ended it.
    assert [(e.signal, e.process_id, e.cell_name, e.executable_name) for e in events] == [
        (15, a.pid, "sig-a", "term"), (15, a.pid, "sig-a", "term")]
    assert b.pid not in {e.process_id for e in events}
