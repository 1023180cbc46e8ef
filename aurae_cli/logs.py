"""`aurae-py logs CELL EXECUTABLE`: an executable's output by name, as `kubectl logs` shows it.

stdout goes to stdout and stderr to stderr; what was written before the call replays with the two
merged in the order they were written (the daemon merges them by timestamp), then `-f` follows.
"""

from __future__ import annotations

import re
import sys
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

import click

from aurae_cli.rpc_command import INTERRUPTED_EXIT, RPC_EXIT_BASE

_DURATION = re.compile(r"(?P<number>\d+(?:\.\d+)?)(?P<unit>s|m|h|d)")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(text: str, now: float | None = None) -> float:
    """Unix seconds from "10s", "5m", "2h", "1d" ago, or an ISO 8601 time."""
    now = time.time() if now is None else now
    match = _DURATION.fullmatch(text.strip())
    if match:
        return now - float(match["number"]) * _UNITS[match["unit"]]
    from datetime import datetime

    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise click.BadParameter(
            f"{text!r} is neither a duration (30s, 5m, 2h, 1d) nor an ISO time "
            "(2026-12-02T10:00:00)", param_hint="--since") from None


def find_executable(client: Any, cell: str, name: str) -> Any:
    """The ExecutableStatus of `name` in `cell` ("" for host level), from List."""
    from aurae_sdk.errors import NotFound

    if not cell:
        raise click.UsageError("give the executable's cell; host-level executables are not "
                               "listed (use `aurae-py observe get-sub-process-stream PID`)")

    def walk(nodes: Any) -> Any:
        for node in nodes:
            if node.cell.name == cell:
                return node
            found = walk(node.children)
            if found is not None:
                return found
        return None

    from aurae_sdk.cell_tree import list_cells

    node = walk(list_cells(client))
    if node is None:
        raise NotFound(f"cell {cell} does not exist", field="cell_name")
    for status in node.executables:
        if status.name == name:
            return status
    known = ", ".join(e.name for e in node.executables) or "none"
    raise NotFound(f"no executable {name} in cell {cell} (it has: {known})",
                   field="executable_name")


def _complete_cells(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[Any]:
    from aurae_cli.completion import cell_names

    return cell_names(ctx, incomplete)


def _complete_executables(ctx: click.Context, param: click.Parameter,
                          incomplete: str) -> list[Any]:
    from aurae_cli.completion import executable_names

    return executable_names(ctx, ctx.params.get("cell") or "", incomplete)


def print_item(item: Any, timestamps: bool) -> None:
    line = f"{item.timestamp} {item.line}" if timestamps else item.line
    stream = sys.stderr if item.channel.endswith("stderr") else sys.stdout
    print(line, file=stream, flush=True)


def _items(stream: Iterator[Any]) -> Iterator[Any]:
    for response in stream:
        if response.HasField("item"):
            yield response.item
        yield from response.items


@click.command("logs")
@click.argument("cell", shell_complete=_complete_cells)
@click.argument("executable", shell_complete=_complete_executables)
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines until it exits.")
@click.option("--tail", type=click.IntRange(min=0), metavar="N",
              help="Only the last N lines written so far (then new ones, with -f).")
@click.option("--since", metavar="T",
              help="Only lines from this long ago (30s, 5m, 2h, 1d) or since an ISO time.")
@click.option("--timestamps", is_flag=True,
              help="Start each line with its timestamp (Unix seconds).")
@click.pass_context
def logs_command(ctx: click.Context, cell: str, executable: str, follow: bool, tail: int | None,
                 since: str | None, timestamps: bool) -> None:
    """Print the output of EXECUTABLE in CELL: stdout to stdout, stderr to stderr.

    Lines written before the call come in the order they were written, stdout and stderr
    interleaved; with -f, new lines follow as they are written, until the executable exits.

    \b
    Examples:
      aurae-py logs web app
      aurae-py logs web app -f --tail 20
      aurae-py logs web app --since 5m --timestamps
    """
    from aurae_cli.hints import with_hint
    from aurae_sdk.errors import AuraeError

    start = None if since is None else parse_since(since)
    client = ctx.find_root().obj.client()
    try:
        status = find_executable(client, cell, executable)
        request = {"process_id": status.host_pid, "max_batch_lines": 1000}
        # Lines already printed, which a follow that comes after replays again.
        printed_before = 0
        if tail is not None or not follow:
            kept: deque[Any] = deque(maxlen=tail)
            replay = client.observe.get_sub_process_stream({**request, "replay_only": True})
            for item in _items(replay):
                if start is None or item.timestamp >= int(start):
                    kept.append(item)
                    printed_before += 1
            for item in kept:
                print_item(item, timestamps)
        if follow:
            stream = client.observe.get_sub_process_stream(request)
            try:
                for item in _items(stream):
                    if start is not None and item.timestamp < int(start):
                        continue
                    if printed_before:
                        printed_before -= 1
                        continue
                    print_item(item, timestamps)
            except KeyboardInterrupt:
                stream.cancel()
                sys.exit(INTERRUPTED_EXIT)
    except AuraeError as error:
        click.echo(with_hint(f"aurae-py: {error}", error), err=True)
        sys.exit(RPC_EXIT_BASE + error.status)
