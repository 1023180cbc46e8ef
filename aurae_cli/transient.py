"""`aurae-py run [--cell C] [--rm] [limits] -- CMD [ARGS]`: a command run on the node, attached.

Like `systemd-run --wait --pipe` or `docker run --rm`: the command starts as an executable (in
cell C, or in a new cell `run-XXXX` holding the limits given), its stdout and stderr stream to
ours, and aurae-py exits with its exit status (128 + the signal's number if a signal ended it).
Ctrl-C stops it. With --rm, the executable, and the cell if this command made it, are removed
afterwards, whatever happened.
"""

from __future__ import annotations

import secrets
import shlex
from dataclasses import dataclass
from typing import Any

import click

from aurae_cli.rpc_command import INTERRUPTED_EXIT, RPC_EXIT_BASE


@dataclass(frozen=True)
class TransientSpec:
    command: tuple[str, ...]
    cell: str | None
    name: str | None
    remove: bool
    cpu_max: int | None
    cpu_weight: int | None
    memory_max: int | None
    isolate_process: bool
    uid: int | None
    gid: int | None

    @property
    def limits_given(self) -> bool:
        return any(v is not None for v in (self.cpu_max, self.cpu_weight, self.memory_max)) or \
            self.isolate_process


def run_transient(client: Any, spec: TransientSpec) -> int:
    """Run `spec` attached; returns the exit status to exit with."""
    from aurae_cli.hints import with_hint
    from aurae_sdk.errors import AuraeError

    if not spec.command:
        raise click.UsageError("give the command to run after --, e.g. aurae-py run -- echo hi")
    if spec.cell is not None and spec.limits_given:
        raise click.UsageError("limits and --isolate-process shape a new cell; with --cell the "
                               "cell's own limits apply")
    suffix = secrets.token_hex(3)
    cell = spec.cell or f"run-{suffix}"
    name = spec.name or f"run-{suffix}"
    made_cell = False
    started = False
    try:
        if spec.cell is None:
            allocated: dict[str, Any] = {"name": cell, "isolate_process": spec.isolate_process}
            if spec.cpu_max is not None:
                allocated["cpu"] = {"max": spec.cpu_max}
            if spec.cpu_weight is not None:
                allocated.setdefault("cpu", {})["weight"] = spec.cpu_weight
            if spec.memory_max is not None:
                allocated["memory"] = {"max": spec.memory_max}
            client.cells.allocate(cell=allocated)
            made_cell = True
        response = client.cells.start(
            cell_name=cell, executable={"name": name, "command": shlex.join(spec.command)},
            uid=spec.uid, gid=spec.gid)
        started = True
        click.echo(f"aurae-py: running {cell}:{name} (pid {response.host_pid})", err=True)
        try:
            _stream_output(client, response.host_pid)
            # The stream ends once it exited and its output is all sent; Wait tells how.
            status = client.cells.wait(cell_name=cell, executable_name=name,
                                       timeout=24 * 3600).status
        except KeyboardInterrupt:
            client.cells.stop(cell_name=cell, executable_name=name)
            started = False
            return INTERRUPTED_EXIT
        if status.HasField("signal"):
            return 128 + int(status.signal)
        return int(status.exit_code)
    except AuraeError as error:
        click.echo(with_hint(f"aurae-py: {error}", error), err=True)
        return RPC_EXIT_BASE + error.status
    finally:
        if spec.remove:
            _remove(client, cell if made_cell else None, (cell, name) if started else None)
        elif made_cell:
            click.echo(f"aurae-py: kept cell {cell} (see `aurae-py logs {cell} {name}`; "
                       f"`aurae-py cells free {cell}` removes it)", err=True)


def _stream_output(client: Any, pid: int) -> None:
    from aurae_cli.logs import print_item

    stream = client.observe.get_sub_process_stream(process_id=pid, max_batch_lines=1000)
    try:
        for response in stream:
            if response.HasField("item"):
                print_item(response.item, False)
            for item in response.items:
                print_item(item, False)
    except BaseException:
        stream.cancel()
        raise


def _remove(client: Any, cell: str | None, executable: tuple[str, str] | None) -> None:
    from aurae_sdk.errors import AuraeError

    try:
        if cell is not None:
            client.cells.free(cell_name=cell)  # takes its executables with it
        elif executable is not None:
            client.cells.stop(cell_name=executable[0], executable_name=executable[1])
    except AuraeError as error:
        click.echo(f"aurae-py: --rm could not remove {cell or executable}: {error}", err=True)
