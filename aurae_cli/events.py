"""`aurae-py events`: the node's lifecycle events, one line each, optionally followed.

A friendly face on ObserveService.GetEventStream (the raw call is
`aurae-py observe get-event-stream`): text lines for people, JSON Lines for programs,
and a note on stderr when the daemon no longer keeps events the caller asked for.
"""

from __future__ import annotations

import datetime
import os
import sys
from typing import Any

import click

from aurae_cli.rpc_command import BROKEN_PIPE_EXIT, INTERRUPTED_EXIT, RPC_EXIT_BASE, finish


def event_line(event: Any) -> str:
    """One event as `SEQ TIME KIND WHO DETAILS`."""
    from aurae_sdk.wire.generated.pb.observe import observe_pb2 as pb

    when = datetime.datetime.fromtimestamp(event.timestamp, datetime.UTC)
    kind = pb.EventKind.Name(event.kind).removeprefix("EVENT_KIND_").lower().replace("_", "-")
    who = event.cell_name
    if event.executable_name:
        who = f"{who}/{event.executable_name}" if who else event.executable_name
    details = []
    if event.host_pid:
        details.append(f"pid={event.pid}" if event.pid == event.host_pid
                       else f"pid={event.pid} host_pid={event.host_pid}")
    if event.HasField("exit_code"):
        details.append(f"exit_code={event.exit_code}")
    if event.HasField("signal"):
        details.append(f"signal={event.signal}")
    if event.oom_killed:
        details.append("oom_killed")
    if event.restart_count:
        details.append(f"restarts={event.restart_count}")
    if event.restart_delay_ms:
        details.append(f"delay_ms={event.restart_delay_ms}")
    if event.oom_kills:
        details.append(f"oom_kills={event.oom_kills}")
    if event.cleaned_up:
        details.append("cleaned_up")
    if event.HasField("daemon"):
        daemon = event.daemon
        details.append(f"version={daemon.version}")
        if event.kind == pb.EVENT_KIND_DAEMON_RESTARTED:
            details.append(f"previous_stopped_cleanly={str(daemon.previous_stopped_cleanly).lower()}")
        for name in ("cleaned_cells", "cleaned_executables", "adopted_cells", "adopted_executables",
                     "cleaned_containers"):
            values = list(getattr(daemon, name))
            if values:
                details.append(f"{name}={','.join(values)}")
    stamp = when.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    return " ".join([str(event.sequence), stamp, kind, who or "-", *details])


@click.command("events")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new events as they happen.")
@click.option("--since", "since", type=click.IntRange(min=0), default=0, show_default=True,
              metavar="SEQ", help="Print the events after sequence number SEQ (the last one "
                                  "you saw, to resume); 0 prints every event the daemon keeps.")
@click.option("--cell", metavar="CELL", help="Only events of this cell and the cells in it.")
@click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text",
              show_default=True, help="Text lines, or one JSON object per event.")
@click.pass_context
def events_command(ctx: click.Context, follow: bool, since: int, cell: str | None,
                   output: str) -> None:
    """Print the node's lifecycle events in order, each with its sequence number.

    \b
    Examples:
    aurae-py events               every event the daemon still keeps
    aurae-py events -f            ... then new ones as they happen
    aurae-py events --since 4711  only those after 4711 (resume)
    """
    from aurae_sdk.errors import AuraeError
    from aurae_sdk.messages import to_json

    request: dict[str, Any] = {"after_sequence": since, "follow": follow}
    if cell:
        request["workload"] = {"workload_type": "WORKLOAD_TYPE_CELL", "id": cell}
    stream = None
    try:
        client = ctx.find_root().obj.client()
        stream = client.observe.get_event_stream(request)
        for response in stream:
            if response.lost:
                click.echo(f"aurae-py: {response.lost} events before "
                           f"{response.events[0].sequence if response.events else 'this'} "
                           "are no longer kept by the daemon", err=True)
            for event in response.events:
                click.echo(to_json(event, indent=None) if output == "json" else event_line(event))
            sys.stdout.flush()
    except AuraeError as error:
        click.echo(f"aurae-py: {error}", err=True)
        finish(RPC_EXIT_BASE + error.status)
    except KeyboardInterrupt:
        if stream is not None:
            stream.cancel()
        finish(INTERRUPTED_EXIT)
    except BrokenPipeError:
        # The final flush must not fail on the closed pipe again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        finish(BROKEN_PIPE_EXIT)
    finish(0)
