"""`aurae-py SCRIPT [ARGS]`: run a Python file with a client ready to use.

Aurae drives a node with programs instead of static manifests. A script (and
the REPL) starts with these names:

    client      a sync aurae_sdk.Client, opened on first use
    aclient     an aurae_sdk.AsyncClient, opened on first use inside the event loop
    cells, discovery, observe, vms, health, ...
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
import shlex
import sys
import traceback
import types
from collections.abc import AsyncIterable, Coroutine, Iterable, Sequence
from typing import TYPE_CHECKING, Any, overload

import click

from aurae_cli.rpc_command import INTERRUPTED_EXIT, RPC_EXIT_BASE
from aurae_sdk.script import ScriptClients, bind

if TYPE_CHECKING:
    from google.protobuf.message import Message


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


def run_script(path: str, args: Sequence[str], clients: ScriptClients, *,
               cleanup: bool = False) -> int:
    """Run the Python file at `path` ("-": stdin) with `args` as sys.argv[1:].

    Returns the exit status: 0, 64 + the gRPC status of an uncaught
    AuraeError, 130 after Ctrl-C (143 after SIGTERM with `cleanup`), 1 for any
    other uncaught exception. SystemExit from the script propagates.

    When the script fails, what it allocated is freed (`cleanup`) or listed.
    """
    status: int | None = None
    previous_term = _exit_on_sigterm() if cleanup else None
    try:
        status = _run_script(path, args, clients)
        return status
    except SystemExit as exit_:
        status = 0 if exit_.code is None else exit_.code if isinstance(exit_.code, int) else 1
        raise
    finally:
        if status != 0:
            _after_failure(clients, cleanup)
        if previous_term is not None:
            import signal

            signal.signal(signal.SIGTERM, previous_term)
        clients.close()


def _exit_on_sigterm() -> Any:
    """Make SIGTERM end the script like Ctrl-C does, so --cleanup runs; returns the old handler."""
    import signal

    def terminate(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    return signal.signal(signal.SIGTERM, terminate)


def _after_failure(clients: ScriptClients, cleanup: bool) -> None:
    allocations = clients.allocations
    if not allocations:
        return
    left = allocations.describe()
    if not cleanup:
        click.echo(f"aurae-py: the script left on the node: {left} (run it with --cleanup to "
                   "free what it allocated when it fails)", err=True)
        return
    try:
        errors = clients.free_allocations()
    except Exception as error:  # noqa: BLE001 - the node may be unreachable: say so, keep going
        errors = [str(error)]
    if errors:
        click.echo(f"aurae-py: cleanup after the failure could not free all of {left}: "
                   + "; ".join(errors), err=True)
    else:
        click.echo(f"aurae-py: cleaned up after the failure: freed {left}", err=True)


def _run_script(path: str, args: Sequence[str], clients: ScriptClients) -> int:
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

    bind(clients)  # `from aurae_sdk.script import client` gets the same client
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
        from aurae_cli.hints import with_hint

        click.echo(with_hint(f"aurae-py: {where}{error}", error), err=True)
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


class RunCommand(click.Command):
    """`run` is two commands in one: a script (`run SCRIPT ARGS`) or a command line on the node
    (`run [OPTIONS] -- CMD ARGS`). A leading `--` or any workload option picks the second."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["aurae_cli.run.command"] = bool(args) and args[0] == "--"
        return super().parse_args(ctx, args)


def _size(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    if value is None:
        return None
    from aurae_sdk.units import parse_bytes

    try:
        return parse_bytes(value)
    except (TypeError, ValueError) as error:
        raise click.BadParameter(str(error)) from None


@click.command(
    "run",
    cls=RunCommand,
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
    short_help="Run a Python script with a connected client, or a command on the node.",
)
@click.option("--cleanup", is_flag=True,
              help="Scripts: if the script fails or is interrupted (Ctrl-C, SIGTERM), free the "
                   "cells and stop the host-level executables it allocated.")
@click.option("--cell", metavar="CELL", help="Commands: run in this existing cell.")
@click.option("--name", metavar="NAME", help="Commands: the executable's name (default run-XXXX).")
@click.option("--rm", "remove", is_flag=True,
              help="Commands: remove the executable (and the cell run made) when it ends.")
@click.option("--cpu-max", type=click.IntRange(1000, 2**44 - 1), metavar="MICROSECONDS",
              help="Commands: CPU time per 100 ms period in the new cell (50000 = half a CPU).")
@click.option("--cpu-weight", type=click.IntRange(1, 10000), metavar="WEIGHT",
              help="Commands: relative CPU share in the new cell, 1 to 10000 (default 100).")
@click.option("--memory-max", callback=_size, metavar="SIZE",
              help="Commands: hard memory limit of the new cell: bytes or 512K, 256M, 1G.")
@click.option("--isolate-process", is_flag=True,
              help="Commands: give the new cell its own pid, mount, ipc and uts namespaces.")
@click.option("--uid", type=click.IntRange(0, 2**32 - 1), help="Commands: user id to run as.")
@click.option("--gid", type=click.IntRange(0, 2**32 - 1), help="Commands: group id to run as.")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def run_command(ctx: click.Context, cleanup: bool, cell: str | None, name: str | None,
                remove: bool, cpu_max: int | None, cpu_weight: int | None,
                memory_max: int | None, isolate_process: bool, uid: int | None, gid: int | None,
                args: tuple[str, ...]) -> None:
    """Run a Python SCRIPT with ARGS, or run a command line on the node: run [OPTIONS] -- CMD.

    \b
    aurae-py run SCRIPT [ARGS]            a Python file ('-' reads stdin)
    aurae-py run [OPTIONS] -- CMD [ARGS]  a command on the node, attached

    A script starts with `client` (a connected aurae_sdk.Client), `aclient`
    (its asyncio twin), the service modules `cells`, `discovery`, `observe`,
    `vms` and `health`, `aurae_sdk`, `logs` and `show`. Top-level `await`
    works. `aurae-py SCRIPT` and a `#!/usr/bin/env aurae-py` line do the same.
    An uncaught AuraeError prints one line and exits with 64 + its gRPC status.
    When the script fails, what it allocated is listed, or freed with --cleanup
    (also `aurae-py --cleanup SCRIPT`).

    A command runs as an executable in --cell, or in a new cell run-XXXX with
    the limits given; its stdout and stderr stream here, and aurae-py exits
    with its exit status (128 + N if signal N ended it). Ctrl-C stops it.

    \b
    Examples:
      aurae-py run deploy.py --replicas 3
      aurae-py run --cleanup smoke-test.py
      echo 'print(client.cells.list())' | aurae-py run -
      aurae-py run --rm -- sh -c 'echo hello; exit 3'
      aurae-py run --rm --cpu-max 50000 --memory-max 256M -- python3 -c 'print(1)'
      aurae-py run --cell web --name migrate -- ./manage.py migrate
    """
    session = ctx.find_root().obj
    workload = (cell, name, cpu_max, cpu_weight, memory_max, uid, gid)
    if ctx.meta.get("aurae_cli.run.command") or remove or isolate_process or any(
            value is not None for value in workload):
        from aurae_cli.transient import TransientSpec, run_transient

        spec = TransientSpec(args, cell, name, remove, cpu_max, cpu_weight, memory_max,
                             isolate_process, uid, gid)
        ctx.exit(run_transient(session.client(), spec))
    if not args:
        raise click.UsageError("give a script to run, or -- and a command")
    script, *script_args = args
    if script != "-" and not os.path.isfile(script):
        raise click.BadParameter(f"{script!r} is not a file; to run a command on the node, "
                                 f"put -- before it: aurae-py run -- {shlex.join(args)}",
                                 param_hint="SCRIPT")
    ctx.exit(run_script(script, script_args, session.script_clients(),
                        cleanup=cleanup or session.cleanup))
