"""One command on many nodes: `aurae-py --context a,b,c ...` and `--all-contexts`.

An RPC command runs in this process, on aurae_sdk.Fleet (asyncio, one AsyncClient per node, at
most --parallel at once). Anything else — a script, `apply -f`, a piped REPL — runs as one
`aurae-py --context NODE ...` child per node, at most --parallel at once. Either way each node's
output is printed under its name, in the order the contexts were given, then a summary table;
the exit status is 0 when every node succeeded and 1 when any failed.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from aurae_cli.app import Session
    from aurae_sdk.config import ClientConfig

FLEET_FAILED_EXIT = 1


@dataclass(frozen=True)
class NodeOutcome:
    """How the command went on one node, for the summary table."""

    context: str
    target: str
    ok: bool
    seconds: float
    detail: str


def _configs(session: Session) -> list[ClientConfig]:
    from aurae_sdk.config import ConfigError, load_contexts

    if session.socket is not None:
        raise click.UsageError("--socket names one node; with several contexts, leave it out")
    try:
        return load_contexts(session.config, session.fleet)
    except ConfigError as error:
        raise click.ClickException(str(error)) from None


def run_rpc(session: Session, attribute: str, method: str, request: dict[str, Any],
            timeout: float | None, output: str, *, paged: bool = False) -> int:
    """One unary RPC on every node of the session's fleet; returns the exit status.

    `paged`: follow next_page_token on each node and print its pages as one response."""
    from aurae_cli.hints import with_hint
    from aurae_cli.output import print_message
    from aurae_cli.rpc_command import merge_pages, next_page
    from aurae_sdk.errors import AuraeError
    from aurae_sdk.fleet import Fleet
    from aurae_sdk.rpc import DEFAULT_TIMEOUT

    if session.vm is not None:
        raise click.UsageError("--vm names one node's guest; with several contexts, leave it out")
    if session.instance is not None:
        from aurae_sdk.client import instance_path

        try:
            instance_path((), session.instance)
        except ValueError as error:
            raise click.BadParameter(str(error), param_hint="--instance") from None
    fleet = Fleet(configs=_configs(session), concurrency=session.parallel,
                  timeout=session.timeout or DEFAULT_TIMEOUT)

    async def call(client: Any) -> Any:
        # --instance addresses the same spawned instance on every node, as it does on one.
        target = client.instance(session.instance) if session.instance else client
        rpc = getattr(getattr(target, attribute), method)
        if not paged:
            return await rpc(request, timeout=timeout)
        pages, seen = [], set[str]()
        following: dict[str, Any] | None = request
        while following is not None:
            pages.append(await rpc(following, timeout=timeout))
            following = next_page(following, pages[-1], seen)
        return merge_pages(attribute, method, pages)

    results = fleet.run(call)
    outcomes = []
    for result in results:
        _header(result.context, result.target)
        detail = ""
        if result.value is not None:
            print_message(result.value, output, streaming=False)
        if result.error is not None:
            detail = str(result.error) if isinstance(result.error, AuraeError) else repr(
                result.error)
            click.echo(with_hint(f"aurae-py: {result.context}: {detail}", result.error), err=True)
        outcomes.append(NodeOutcome(result.context, result.target, result.ok, result.seconds,
                                    detail))
    return _summarize(outcomes)


def run_per_node(session: Session, args: list[str]) -> int:
    """`aurae-py --context NODE ARGS` for every node of the fleet; returns the exit status."""
    configs = _configs(session)
    if not args:
        raise click.UsageError("with several contexts, give a command or a script to run")
    stdin = None if sys.stdin.isatty() else sys.stdin.buffer.read()
    from aurae_cli.progress import progress

    with progress("nodes", len(configs)) as advance:
        outcomes = asyncio.run(_run_children(configs, args, session.parallel, stdin, advance))
    _print_outputs(outcomes)
    return _summarize([outcome for outcome, _, _ in outcomes])


async def _run_children(configs: list[ClientConfig], args: list[str], parallel: int,
                        stdin: bytes | None, advance: Callable[[str], None]
                        ) -> list[tuple[NodeOutcome, bytes, bytes]]:
    gate = asyncio.Semaphore(parallel)

    async def one(config: ClientConfig) -> tuple[NodeOutcome, bytes, bytes]:
        async with gate:
            started = time.monotonic()
            child = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "aurae_cli", "--config", config.source,
                "--context", config.context, *args,
                stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                env={**os.environ, "AURAE_CONTEXT": config.context},
            )
            out, err = await child.communicate(stdin)
            status = child.returncode
            seconds = time.monotonic() - started
        last = err.decode(errors="replace").strip().splitlines()
        detail = "" if status == 0 else f"exit {status}" + (f": {last[-1]}" if last else "")
        advance(config.context)
        return NodeOutcome(config.context, config.socket, status == 0, seconds, detail), out, err

    return list(await asyncio.gather(*(one(config) for config in configs)))


def _print_outputs(finished: list[tuple[NodeOutcome, bytes, bytes]]) -> None:
    for outcome, out, err in finished:
        _header(outcome.context, outcome.target)
        sys.stdout.buffer.write(out)
        sys.stdout.flush()
        sys.stderr.buffer.write(err)
        sys.stderr.flush()


def _header(context: str, target: str) -> None:
    click.echo(f"=== {context} ({target})")


def _summarize(outcomes: list[NodeOutcome]) -> int:
    from aurae_cli.tables import format_table

    rows = [{"context": o.context, "target": o.target, "result": "ok" if o.ok else "FAILED",
             "time": f"{o.seconds:.2f}s", "detail": o.detail.splitlines()[0] if o.detail else ""}
            for o in outcomes]
    failed = sum(not o.ok for o in outcomes)
    click.echo("")
    click.echo(format_table(rows, ("context", "target", "result", "time", "detail")))
    click.echo(f"{len(outcomes) - failed} of {len(outcomes)} nodes succeeded"
               + (f", {failed} failed." if failed else "."))
    return FLEET_FAILED_EXIT if failed else 0
