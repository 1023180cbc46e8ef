"""Per-cell metrics against a real auraed: CPU time that grows while a cell burns CPU, memory
above a known allocation, the process count, throttling under cpu.max, OOM kills (also as
events), `aurae-py cells top`, and the Prometheus endpoint scraped over HTTP."""

from __future__ import annotations

import http.client
import re
import socket
import time
from collections.abc import Callable
from typing import Any

import pytest

import aurae_sdk
from aurae_sdk.wire.generated.pb.observe import observe_pb2 as observe_pb
from tests.support.daemon import DaemonProcess, running_daemon

DEADLINE = 60.0
# Allocates and touches 64 MiB, then stays.
HOLD_64_MIB = "exec python3 -c 'import time; b = bytes(range(256)) * (1 << 18); time.sleep(600)'"


def metrics_of(client: aurae_sdk.Client, cell: str) -> Any:
    (found,) = [c for c in client.cells.metrics(cell_name=cell).cells if c.cell_name == cell]
    return found


def wait_for(client: aurae_sdk.Client, cell: str, condition: Callable[[Any], bool]) -> Any:
    deadline = time.monotonic() + DEADLINE
    while True:
        metrics = metrics_of(client, cell)
        if condition(metrics):
            return metrics
        assert time.monotonic() < deadline, f"{cell}: condition never held; last {metrics}"
        time.sleep(0.1)


def test_cpu_time_grows_while_a_cell_burns_cpu(client: aurae_sdk.Client) -> None:
    client.cells.allocate(cell={"name": "m-burn"})
    try:
        client.cells.start(cell_name="m-burn",
                           executable={"name": "spin", "command": "while :; do :; done"})
        first = metrics_of(client, "m-burn")
        later = wait_for(client, "m-burn",
                         lambda m: m.cpu_usage_usec >= first.cpu_usage_usec + 300_000)
        assert later.cpu_user_usec > first.cpu_user_usec
        assert later.executables_running == 1
        assert later.pids_current == 1
    finally:
        client.cells.free(cell_name="m-burn")


def test_memory_and_pids_show_what_runs(client: aurae_sdk.Client) -> None:
    client.cells.allocate(cell={"name": "m-mem", "memory": {"max": 512 << 20}})
    try:
        client.cells.start(cell_name="m-mem", executable={"name": "hold", "command": HOLD_64_MIB})
        client.cells.start(cell_name="m-mem", executable={
            "name": "three", "command": "sleep 600 & sleep 600 & sleep 600 & wait"})
        metrics = wait_for(client, "m-mem", lambda m: m.memory_current_bytes > 64 << 20
                           and m.pids_current == 5)
        assert metrics.memory_peak_bytes >= metrics.memory_current_bytes
        assert metrics.memory_max_bytes == 512 << 20
        assert metrics.executables_running == 2
        assert metrics.oom_kills == 0
    finally:
        client.cells.free(cell_name="m-mem")


def test_throttling_under_cpu_max_is_counted(client: aurae_sdk.Client) -> None:
    # 5 % of one CPU for a process that wants all of one.
    client.cells.allocate(cell={"name": "m-slow", "cpu": {"max": 5_000, "period": 100_000}})
    try:
        client.cells.start(cell_name="m-slow",
                           executable={"name": "spin", "command": "while :; do :; done"})
        first = wait_for(client, "m-slow", lambda m: m.cpu_throttled_periods > 0)
        later = wait_for(client, "m-slow",
                         lambda m: m.cpu_throttled_periods >= first.cpu_throttled_periods + 5)
        assert later.cpu_throttled_usec > first.cpu_throttled_usec
        assert later.cpu_periods >= later.cpu_throttled_periods
    finally:
        client.cells.free(cell_name="m-slow")


def test_oom_kills_are_counted_and_reported_as_events(client: aurae_sdk.Client) -> None:
    before = 0
    for response in client.observe.get_event_stream(timeout=30):
        before = response.events[-1].sequence if response.events else before
    client.cells.allocate(cell={"name": "m-oom", "memory": {"max": 32 << 20}})
    try:
        client.cells.start(cell_name="m-oom", executable={
            "name": "hog", "command": "exec python3 -c \"x = 'x' * (256 << 20)\""})
        status = client.cells.wait(cell_name="m-oom", executable_name="hog", timeout=60).status
        assert status.oom_killed
        assert metrics_of(client, "m-oom").oom_kills >= 1
        kinds = {}
        stream = client.observe.get_event_stream(after_sequence=before, follow=True, timeout=60)
        for response in stream:
            for event in response.events:
                if event.cell_name == "m-oom":
                    kinds[observe_pb.EventKind.Name(event.kind)] = event
            if "EVENT_KIND_EXECUTABLE_EXITED" in kinds:
                stream.cancel()
                break
        assert kinds["EVENT_KIND_CELL_OOM_KILL"].oom_kills >= 1
        assert kinds["EVENT_KIND_CELL_OOM_KILL"].sequence < kinds["EVENT_KIND_EXECUTABLE_EXITED"].sequence
        assert kinds["EVENT_KIND_EXECUTABLE_EXITED"].oom_killed
    finally:
        client.cells.free(cell_name="m-oom")


def test_nested_cells_and_bad_requests(client: aurae_sdk.Client) -> None:
    client.cells.allocate(cell={"name": "m-tree"})
    client.cells.allocate(cell={"name": "m-tree/leaf"})
    try:
        names = [c.cell_name for c in client.cells.metrics(cell_name="m-tree").cells]
        assert names == ["m-tree", "m-tree/leaf"]
        alone = client.cells.metrics(cell_name="m-tree", exclude_children=True).cells
        assert [c.cell_name for c in alone] == ["m-tree"]
        everything = [c.cell_name for c in client.cells.metrics().cells]
        assert {"m-tree", "m-tree/leaf"} <= set(everything)
        assert everything.index("m-tree") < everything.index("m-tree/leaf")
    finally:
        client.cells.free(cell_name="m-tree")
    with pytest.raises(aurae_sdk.NotFound):
        client.cells.metrics(cell_name="m-tree")
    with pytest.raises(aurae_sdk.InvalidArgument) as error:
        client.cells.metrics(cell_name="Not A Name")
    assert error.value.field == "cell_name"
    with pytest.raises(aurae_sdk.InvalidArgument) as error:
        client.cells.metrics(exclude_children=True)
    assert error.value.field == "exclude_children"


def test_cells_top_prints_a_table(client: aurae_sdk.Client, daemon: DaemonProcess) -> None:
    client.cells.allocate(cell={"name": "m-top", "memory": {"max": 256 << 20}})
    try:
        client.cells.start(cell_name="m-top",
                           executable={"name": "spin", "command": "while :; do :; done"})
        result = daemon.cli("cells", "top", "--once", "--interval", "1")
        assert result.returncode == 0, result.stderr
        (row,) = [line for line in result.stdout.splitlines() if "m-top" in line]
        cells = [c.strip() for c in row.strip("│┃| ").split("│")]
        assert cells[0] == "m-top" and cells[1] == "1"
        assert float(cells[2]) > 10  # a spinning shell takes a good share of a CPU
        assert cells[7] == "256.0 MiB"
        missing = daemon.cli("cells", "top", "nope", "--once", "--interval", "0.1")
        assert missing.returncode == 64 + 5  # NOT_FOUND
    finally:
        client.cells.free(cell_name="m-top")


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=30)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(self.path)


def _scrape(connection: http.client.HTTPConnection) -> str:
    connection.request("GET", "/metrics")
    response = connection.getresponse()
    assert response.status == 200
    assert response.getheader("Content-Type", "").startswith("text/plain")
    return response.read().decode()


def _sample(text: str, name: str, cell: str) -> float:
    match = re.search(rf'^{name}{{cell="{re.escape(cell)}"}} (\S+)$', text, re.MULTILINE)
    assert match, f"no {name} for {cell} in:\n{text}"
    return float(match.group(1))


@pytest.mark.slow
def test_prometheus_endpoint_on_a_unix_socket_and_on_loopback_tcp() -> None:
    import tempfile
    from pathlib import Path

    scratch = Path(tempfile.mkdtemp(prefix="aurae-metrics-", dir="/tmp"))
    socket_path = scratch / "metrics.sock"
    with running_daemon("--metrics-address", str(socket_path)) as daemon, daemon.client() as client:
        assert oct(socket_path.stat().st_mode & 0o777) == "0o600"
        client.cells.allocate(cell={"name": "scraped", "memory": {"max": 512 << 20}})
        client.cells.start(cell_name="scraped", executable={"name": "hold", "command": HOLD_64_MIB})
        wait_for(client, "scraped", lambda m: m.memory_current_bytes > 64 << 20)
        text = _scrape(UnixHTTPConnection(str(socket_path)))
        assert _sample(text, "aurae_cell_memory_bytes", "scraped") > 64 << 20
        assert _sample(text, "aurae_cell_memory_limit_bytes", "scraped") == 512 << 20
        assert _sample(text, "aurae_cell_pids", "scraped") == 1
        assert _sample(text, "aurae_cell_executables_running", "scraped") == 1
        assert _sample(text, "aurae_cell_cpu_usage_seconds_total", "scraped") > 0
        assert "# TYPE aurae_cell_oom_kills_total counter" in text
        assert re.search(r"^aurae_cells \d+", text, re.MULTILINE)
        assert re.search(r"^aurae_events_total [1-9]", text, re.MULTILINE)
        assert "auraed_process_resident_memory_bytes" in text
        client.cells.free(cell_name="scraped")
        assert 'cell="scraped"' not in _scrape(UnixHTTPConnection(str(socket_path)))
    assert not socket_path.exists()  # removed at shutdown
    scratch.rmdir()

    for attempt in range(5):
        # A port free a moment ago; if someone took it meanwhile, the daemon says so: retry.
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        try:
            with running_daemon("--metrics-address", f"127.0.0.1:{port}") as daemon:
                assert re.search(rf"metrics endpoint listening.*port={port}", daemon.log())
                text = _scrape(http.client.HTTPConnection("127.0.0.1", port, timeout=30))
                assert re.search(r"^aurae_cells 0", text, re.MULTILINE)
            break
        except RuntimeError as error:
            if "cannot listen" not in str(error) or attempt == 4:
                raise


def test_the_endpoint_refuses_a_public_address_unless_told() -> None:
    with pytest.raises(RuntimeError, match="not a loopback address"), \
            running_daemon("--metrics-address", "0.0.0.0:9464"):
        pass
    with pytest.raises(RuntimeError, match="metrics-address"), \
            running_daemon("--metrics-address", "127.0.0.1:notaport"):
        pass
