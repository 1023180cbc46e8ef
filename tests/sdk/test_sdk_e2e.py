"""The SDK against a real auraed: every test runs the same calls through the
sync Client and the asyncio AsyncClient, so the two cannot drift apart."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import grpc.aio
import pytest

import aurae_sdk
from aurae_sdk import cells, logs, observe
from aurae_sdk.config import channel_credentials, channel_options, load_config, parse_target
from tests.support.daemon import DaemonProcess, cgroup_dirs

Step = Callable[[Any], Any]


class SyncApi:
    """Runs steps on a Client; a step returns the call's result."""

    name = "sync"

    def __init__(self, daemon: DaemonProcess) -> None:
        self.client = daemon.client()

    def run(self, step: Step) -> Any:
        return step(self.client)

    def run_on(self, client: Any, step: Step) -> Any:
        return step(client)

    def collect(self, open_stream: Step) -> list[Any]:
        return list(open_stream(self.client))

    def first_then_cancel(self, open_stream: Step) -> tuple[Any, list[Any]]:
        stream = open_stream(self.client)
        first = next(iter(stream))
        stream.cancel()
        return first, list(stream)

    def context_managed(self, client: Any, step: Step) -> None:
        with client:
            step(client)

    def open_channel_client(self, channel_factory: Callable[[bool], Any], **settings: Any) -> Any:
        return aurae_sdk.Client(channel=channel_factory(False), **settings)

    def close_client(self, client: Any) -> None:
        client.close()

    def close(self) -> None:
        self.client.close()


class AsyncApi:
    """Runs the same steps on an AsyncClient, all on one event loop: a step
    returns a coroutine (unary calls) that the loop runs to its end."""

    name = "async"

    def __init__(self, daemon: DaemonProcess) -> None:
        self._runner = asyncio.Runner()
        self.client = self._in_loop(lambda: aurae_sdk.AsyncClient(daemon.config))

    def _in_loop(self, make: Callable[[], Any]) -> Any:
        async def made() -> Any:
            return make()

        return self._runner.run(made())

    def run(self, step: Step) -> Any:
        return self.run_on(self.client, step)

    def run_on(self, client: Any, step: Step) -> Any:
        async def call() -> Any:
            return await step(client)

        return self._runner.run(call())

    def collect(self, open_stream: Step) -> list[Any]:
        async def drain() -> list[Any]:
            return [item async for item in open_stream(self.client)]

        return self._runner.run(drain())  # type: ignore[no-any-return]

    def first_then_cancel(self, open_stream: Step) -> tuple[Any, list[Any]]:
        async def read() -> tuple[Any, list[Any]]:
            stream = open_stream(self.client)
            first = await stream.__anext__()
            stream.cancel()
            return first, [item async for item in stream]

        return self._runner.run(read())  # type: ignore[no-any-return]

    def context_managed(self, client: Any, step: Step) -> None:
        async def use() -> None:
            async with client:
                await step(client)

        self._runner.run(use())

    def open_channel_client(self, channel_factory: Callable[[bool], Any], **settings: Any) -> Any:
        return self._in_loop(
            lambda: aurae_sdk.AsyncClient(channel=channel_factory(True), **settings)
        )

    def close_client(self, client: Any) -> None:
        self._runner.run(client.close())

    def close(self) -> None:
        self.close_client(self.client)
        self._runner.close()


Api = SyncApi | AsyncApi


@pytest.fixture(params=["sync", "async"])
def api(request: pytest.FixtureRequest, daemon: DaemonProcess) -> Iterator[Api]:
    flavour: Api = SyncApi(daemon) if request.param == "sync" else AsyncApi(daemon)
    try:
        yield flavour
    finally:
        flavour.close()


@pytest.fixture
def cell(api: Api, daemon: DaemonProcess) -> Iterator[str]:
    """A fresh cell for one test, freed (with what runs in it) afterwards."""
    name = f"sdk-{api.name}"
    api.run(lambda c: c.cells.allocate(cell={"name": name}))
    try:
        yield name
    finally:
        with daemon.client() as client:
            client.cells.free(cell_name=name)


def test_allocated_limits_show_in_list_and_in_the_cgroup_tree(
    api: Api, daemon: DaemonProcess
) -> None:
    name = f"limits-{api.name}"
    limits = cells.Cell(
        name=name, cpu=cells.CpuController(weight=200), memory=cells.MemoryController(max=64 << 20)
    )
    allocated = api.run(lambda c: c.cells.allocate(cell=limits))
    try:
        assert allocated.cell_name == name
        assert cgroup_dirs(f"{daemon.cgroup_root}/{name}")
        listed = api.run(lambda c: c.cells.list())
        [node] = [node for node in listed.cells if node.cell.name == name]
        assert node.cell.cpu.weight == 200
        assert node.cell.memory.max == 64 << 20
    finally:
        api.run(lambda c: c.cells.free(cell_name=name))
    assert not cgroup_dirs(f"{daemon.cgroup_root}/{name}")


def test_start_then_wait_reports_the_exit_code(api: Api, cell: str) -> None:
    started = api.run(
        lambda c: c.cells.start(
            cell_name=cell, executable=cells.Executable(name="three", command="exit 3")
        )
    )
    assert started.pid > 0
    waited = api.run(lambda c: c.cells.wait(cell_name=cell, executable_name="three", timeout=10))
    assert waited.status.exit_code == 3
    assert waited.status.state == cells.EXECUTABLE_STATE_EXITED


def test_output_streams_line_by_line_and_in_batches(api: Api, cell: str) -> None:
    started = api.run(
        lambda c: c.cells.start(
            cell_name=cell,
            executable={"name": "talk", "command": "echo hello; echo oops >&2; seq 1 1000"},
        )
    )
    api.run(lambda c: c.cells.wait(cell_name=cell, executable_name="talk", timeout=10))

    stdout = api.collect(
        lambda c: c.observe.get_sub_process_stream(
            process_id=started.pid, channel_type=observe.LOG_CHANNEL_TYPE_STDOUT, timeout=10
        )
    )
    assert [r.item.line for r in stdout] == ["hello", *map(str, range(1, 1001))]

    # logs.follow / afollow ask for batches and hand out single lines.
    def follow(c: Any) -> Any:
        if api.name == "sync":
            return logs.follow(c, started.pid, "stderr", batch=100, timeout=10)
        return logs.afollow(c, started.pid, "stderr", batch=100, timeout=10)

    assert [(item.channel, item.line) for item in api.collect(follow)] == [("talk::stderr", "oops")]
    both = api.collect(
        lambda c: (logs.follow if api.name == "sync" else logs.afollow)(
            c, started.pid, batch=100, timeout=10
        )
    )
    assert len(both) == 1002
    assert [item.line for item in both if item.channel == "talk::stdout"][-1] == "1000"


@pytest.mark.parametrize(
    ("step", "error", "field"),
    [
        (lambda c: c.cells.free(cell_name="no-such-cell"), aurae_sdk.NotFound, "cell_name"),
        (
            lambda c: c.cells.allocate(cell={"name": "Not A Name"}),
            aurae_sdk.InvalidArgument,
            "cell.name",
        ),
    ],
    ids=["not-found", "invalid-argument"],
)
def test_failures_raise_the_status_exception_naming_the_field(
    api: Api, step: Step, error: type[aurae_sdk.AuraeError], field: str
) -> None:
    with pytest.raises(error) as raised:
        api.run(step)
    assert raised.value.field == field
    assert raised.value.status == error.status


def test_a_failing_stream_raises_when_iterated(api: Api) -> None:
    with pytest.raises(aurae_sdk.NotFound) as raised:
        api.collect(lambda c: c.observe.get_sub_process_stream(process_id=999_999_999, timeout=5))
    assert raised.value.field == "process_id"


def test_allocating_twice_raises_already_exists(api: Api, cell: str) -> None:
    with pytest.raises(aurae_sdk.AlreadyExists) as raised:
        api.run(lambda c: c.cells.allocate(cell={"name": cell}))
    assert raised.value.field == "cell.name"


def test_a_per_call_timeout_raises_deadline_exceeded(api: Api, cell: str) -> None:
    api.run(
        lambda c: c.cells.start(cell_name=cell, executable={"name": "nap", "command": "sleep 30"})
    )
    with pytest.raises(aurae_sdk.DeadlineExceeded):
        api.run(lambda c: c.cells.wait(cell_name=cell, executable_name="nap", timeout=0.3))


def test_a_cancelled_stream_ends_quietly(api: Api, cell: str) -> None:
    started = api.run(
        lambda c: c.cells.start(
            cell_name=cell,
            executable={"name": "tick", "command": "while :; do echo tick; sleep 0.1; done"},
        )
    )
    first, rest = api.first_then_cancel(
        lambda c: c.observe.get_sub_process_stream(process_id=started.pid)
    )
    assert first.item.line == "tick"
    assert all(response.item.line == "tick" for response in rest)


def test_leaving_the_context_manager_closes_the_channel(api: Api, daemon: DaemonProcess) -> None:
    config = load_config(daemon.config)
    client = api.open_channel_client(lambda aio: _channel(config.socket, config, aio))
    api.context_managed(client, lambda c: c.discovery.discover())
    with pytest.raises(Exception, match="(?i)closed"):
        api.run_on(client, lambda c: c.discovery.discover())


# --------------------------------------------------------------------------
# Retries: a daemon socket that appears only after the call began.


class CountingInterceptor(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Counts the attempts that reach the channel."""

    def __init__(self) -> None:
        self.attempts = 0

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        self.attempts += 1
        return continuation(details, request)


class AsyncCountingInterceptor(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    def __init__(self) -> None:
        self.attempts = 0

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        self.attempts += 1
        return await continuation(details, request)


def _channel(socket: str, config: aurae_sdk.ClientConfig, aio: bool, counter: Any = None) -> Any:
    target = parse_target(socket)
    credentials = channel_credentials(config)
    if aio:
        return grpc.aio.secure_channel(
            target.grpc_target,
            credentials,
            channel_options(target),
            interceptors=[counter] if counter else None,
        )
    channel = grpc.secure_channel(target.grpc_target, credentials, channel_options(target))
    return grpc.intercept_channel(channel, counter) if counter else channel


@pytest.fixture
def late_socket(daemon: DaemonProcess) -> Iterator[str]:
    """A socket path where the daemon appears (as a symlink) only when told."""
    directory = tempfile.mkdtemp(prefix="aurae-late-", dir="/tmp")
    try:
        yield os.path.join(directory, "late.sock")
    finally:
        shutil.rmtree(directory)


PATIENT = aurae_sdk.RetryPolicy(attempts=60, initial_backoff=0.05, max_backoff=0.3)


def _counting_client(api: Api, daemon: DaemonProcess, socket: str) -> tuple[Any, Any]:
    config = load_config(daemon.config)
    counter: Any = AsyncCountingInterceptor() if api.name == "async" else CountingInterceptor()
    client = api.open_channel_client(
        lambda aio: _channel(socket, config, aio, counter), retry=PATIENT, timeout=20
    )
    return client, counter


def test_an_idempotent_read_retries_until_the_daemon_appears(
    api: Api, daemon: DaemonProcess, late_socket: str
) -> None:
    client, counter = _counting_client(api, daemon, late_socket)
    appear = threading.Timer(0.5, os.symlink, (daemon.socket, late_socket))
    appear.start()
    try:
        listed = api.run_on(client, lambda c: c.cells.list())
    finally:
        appear.cancel()
        appear.join()
        api.close_client(client)
    assert isinstance(listed, cells.CellServiceListResponse)
    assert counter.attempts > 1


def test_allocate_is_not_retried(api: Api, daemon: DaemonProcess, late_socket: str) -> None:
    client, counter = _counting_client(api, daemon, late_socket)
    name = f"never-{api.name}"
    try:
        with pytest.raises(aurae_sdk.Unavailable):
            api.run_on(client, lambda c: c.cells.allocate(cell={"name": name}))
    finally:
        api.close_client(client)
    assert counter.attempts == 1
    assert name not in {node.cell.name for node in api.run(lambda c: c.cells.list()).cells}
