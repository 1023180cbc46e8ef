"""`aurae-py SCRIPT [ARGS]`: run a Python file with a client ready to use.

Aurae drives a node with programs instead of static manifests. A script (and
the REPL) starts with these names:

    client      a sync aurae_sdk.Client, opened on first use
    aclient     an aurae_sdk.AsyncClient, opened on first use inside the event loop
    cells, discovery, observe, vms, health
                the service modules, with their messages and enums
    aurae_sdk   the SDK; `logs` its log-stream helpers (logs.follow, ...)
    show        print a stream live until it ends or Ctrl-C

Top-level `await` works: such a script runs as one coroutine under one event
loop, the loop `aclient` belongs to. With `#!/usr/bin/env aurae-py` a script
is a command of its own. An uncaught AuraeError prints one line and exits
with 64 + its gRPC status, like the CLI.
"""

from __future__ import annotations

import ast
import builtins
import inspect
import os
import sys
import traceback
import types
from collections.abc import AsyncIterable, Callable, Coroutine, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Generic, TypeVar, overload

import click

from aurae_cli.rpc_command import INTERRUPTED_EXIT, RPC_EXIT_BASE

if TYPE_CHECKING:
    from google.protobuf.message import Message

    from aurae_sdk.client import AsyncClient, Client
    from aurae_sdk.config import ClientConfig

C = TypeVar("C")


class LazyClient(Generic[C]):
    """Stands in for a client and opens it when an attribute is first used.

    A script that never calls the daemon must run without a config, and an
    AsyncClient must be created inside the event loop that will use it; both
    follow from opening on first use rather than at start.
    """

    def __init__(self, open_client: Callable[[], C], kind: str) -> None:
        self._open_client = open_client
        self._kind = kind
        self.opened: C | None = None

    def resolve(self) -> C:
        """The client, opened now if it was not yet."""
        if self.opened is None:
            self.opened = self._open_client()
        return self.opened

    def __getattr__(self, name: str) -> Any:
        # Only reached for names the proxy itself lacks; dunders are left alone
        # so that copy, pickle and introspection do not open a connection.
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.resolve(), name)

    def __dir__(self) -> list[str]:
        return dir(self.resolve())

    def __repr__(self) -> str:
        if self.opened is None:
            return f"<{self._kind}, opened on first use>"
        return repr(self.opened)


class ScriptClients:
    """The `client` and `aclient` of one script or REPL session."""

    def __init__(self, config: str | None = None, socket: str | None = None) -> None:
        self._config_path = config
        self._socket = socket
        self._config: ClientConfig | None = None
        self.client: LazyClient[Client] = LazyClient(self._open, "aurae_sdk.Client")
        self.aclient: LazyClient[AsyncClient] = LazyClient(
            self._open_async, "aurae_sdk.AsyncClient"
        )

    def config(self) -> ClientConfig:
        """The client config, read once; raises ConfigError."""
        if self._config is None:
            from aurae_sdk.config import load_config

            self._config = load_config(self._config_path, socket=self._socket)
        return self._config

    def _open(self) -> Client:
        from aurae_sdk.client import Client

        return Client(self.config())

    def _open_async(self) -> AsyncClient:
        import asyncio

        from aurae_sdk.client import AsyncClient

        try:
            asyncio.get_running_loop()
        except RuntimeError:
            # grpc.aio binds a channel to the loop it is made in; made outside
            # one, it would fail later and far from here.
            raise RuntimeError(
                "aclient is the asyncio client: use it inside a coroutine (top-level await "
                "in a script, or asyncio.run(main())), or use the sync `client`"
            ) from None
        return AsyncClient(self.config())

    def close(self) -> None:
        if self.client.opened is not None:
            self.client.opened.close()

    async def aclose(self) -> None:
        if self.aclient.opened is not None:
            await self.aclient.opened.close()


def preloaded_names(clients: ScriptClients) -> dict[str, object]:
    """The names scripts and the REPL start with."""
    import aurae_sdk
    import aurae_sdk.logs
    from aurae_cli.generated.namespace import service_modules

    return {
        "client": clients.client,
        "aclient": clients.aclient,
        **service_modules(),
        "aurae_sdk": aurae_sdk,
        "logs": aurae_sdk.logs,
        "show": show,
    }


@overload
def show(items: AsyncIterable[Any]) -> Coroutine[Any, Any, None]: ...
@overload
def show(items: Iterable[Any] | Message) -> None: ...
def show(items: AsyncIterable[Any] | Iterable[Any] | Message) -> Coroutine[Any, Any, None] | None:
    """Print a stream's responses as they arrive, until it ends or Ctrl-C.

    Log lines print as their text, other messages on one line each. Ctrl-C
    cancels the call and returns quietly. An async stream is awaited:
    `await show(aclient.observe.get_aurae_daemon_log_stream())`.
    """
    from google.protobuf.message import Message

    if isinstance(items, Message):
        _print_item(items)
        return None
    if isinstance(items, AsyncIterable):
        return _show_async(items)
    try:
        for item in items:
            _print_item(item)
    except KeyboardInterrupt:
        pass
    finally:
        _stop(items)
    return None


async def _show_async(items: AsyncIterable[Any]) -> None:
    import asyncio

    try:
        async for item in items:
            _print_item(item)
    except (KeyboardInterrupt, asyncio.CancelledError):
        # The REPL turns Ctrl-C into a cancellation of the running input;
        # ending the stream is what show() promises, so it ends normally.
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()
    finally:
        cancel = getattr(items, "cancel", None)
        if cancel is not None:
            cancel()
        elif isinstance(items, types.AsyncGeneratorType):
            await items.aclose()


def _stop(items: object) -> None:
    # Streams cancel their call; generators (aurae_sdk.logs) run their
    # cleanup, which cancels theirs.
    stop = getattr(items, "cancel", None) or getattr(items, "close", None)
    if stop is not None:
        stop()


def _print_item(item: object) -> None:
    from google.protobuf.message import Message

    from aurae_cli.output import log_lines
    from aurae_sdk.messages import compact

    if isinstance(item, Message):
        lines = log_lines(item) or [compact(item, width=sys.maxsize)]
    else:
        lines = [str(item)]
    for line in lines:
        print(line, flush=True)


def run_script(path: str, args: Sequence[str], clients: ScriptClients) -> int:
    """Run the Python file at `path` ("-": stdin) with `args` as sys.argv[1:].

    Returns the exit status: 0, 64 + the gRPC status of an uncaught
    AuraeError, 130 after Ctrl-C, 1 for any other uncaught exception.
    SystemExit from the script propagates.
    """
    if path == "-":
        source, filename = sys.stdin.read(), "<stdin>"
    else:
        with open(path, "rb") as file:
            source_bytes = file.read()
        source, filename = source_bytes.decode("utf-8"), os.path.abspath(path)
    try:
        code = compile(
            source, filename, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT, dont_inherit=True
        )
    except SyntaxError as error:
        sys.stderr.writelines(traceback.format_exception_only(error))
        return 1

    main = _main_module(filename, clients)
    saved_main, saved_argv = sys.modules.get("__main__"), sys.argv
    sys.modules["__main__"] = main
    sys.argv = [path, *args]
    sys.path.insert(0, "" if path == "-" else os.path.dirname(filename))
    try:
        result = eval(code, main.__dict__)
        if code.co_flags & inspect.CO_COROUTINE:
            import asyncio

            asyncio.run(_run_to_end(result, clients))
    except KeyboardInterrupt:
        return INTERRUPTED_EXIT
    except Exception as error:  # noqa: BLE001 - every failure gets its exit status
        return _report(error, filename, display=path if path != "-" else filename)
    finally:
        clients.close()
        sys.argv = saved_argv
        if saved_main is not None:
            sys.modules["__main__"] = saved_main
    return 0


def _main_module(filename: str, clients: ScriptClients) -> types.ModuleType:
    # A real module in sys.modules["__main__"], as `python script.py` makes:
    # pickle, dataclasses and typing look classes up through it.
    main = types.ModuleType("__main__")
    main.__dict__.update(preloaded_names(clients), __builtins__=builtins)
    if filename != "<stdin>":
        main.__file__ = filename
    return main


async def _run_to_end(script: Coroutine[Any, Any, object], clients: ScriptClients) -> None:
    try:
        await script
    finally:
        await clients.aclose()


def _report(error: Exception, filename: str, display: str) -> int:
    """Print an uncaught exception the way it deserves; return the exit status."""
    from aurae_sdk.config import ConfigError
    from aurae_sdk.errors import AuraeError

    frames = _script_frames(error.__traceback__, filename)
    if isinstance(error, (AuraeError, ConfigError)):
        # An expected failure of the node or its config: one line that says
        # what and where, not a traceback through the SDK.
        where = f"{display}:{_last_line(frames)}: " if frames is not None else ""
        click.echo(f"aurae-py: {where}{error}", err=True)
        return RPC_EXIT_BASE + error.status if isinstance(error, AuraeError) else 1
    traceback.print_exception(type(error), error, frames)
    return 1


def _script_frames(tb: types.TracebackType | None, filename: str) -> types.TracebackType | None:
    """The traceback from the script's first frame on, without the runner's."""
    while tb is not None and tb.tb_frame.f_code.co_filename != filename:
        tb = tb.tb_next
    return tb


def _last_line(tb: types.TracebackType) -> int:
    """The line of the script's innermost frame: where the script made the call."""
    line = tb.tb_lineno
    filename = tb.tb_frame.f_code.co_filename
    while tb.tb_next is not None:
        tb = tb.tb_next
        if tb.tb_frame.f_code.co_filename == filename:
            line = tb.tb_lineno
    return line


@click.command(
    "run",
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
    short_help="Run a Python script with a connected client.",
)
@click.argument("script", type=click.Path(exists=True, dir_okay=False, allow_dash=True))
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def run_command(ctx: click.Context, script: str, args: tuple[str, ...]) -> None:
    """Run SCRIPT, a Python file ('-' reads stdin), with ARGS as sys.argv[1:].

    The script starts with `client` (a connected aurae_sdk.Client), `aclient`
    (its asyncio twin), the service modules `cells`, `discovery`, `observe`,
    `vms` and `health`, `aurae_sdk`, `logs` and `show`. Top-level `await`
    works. `aurae-py SCRIPT` and a `#!/usr/bin/env aurae-py` line do the same.

    An uncaught AuraeError prints one line and exits with 64 + its gRPC status.
    """
    session = ctx.find_root().obj
    ctx.exit(run_script(script, args, ScriptClients(session.config, session.socket)))
