"""`aurae-py cells top`: a live table of what each cell uses, refreshed every few seconds.

Built on CellService.Metrics (the raw call is `aurae-py cells metrics`); CPU % is the CPU time
a cell used between two reads over the wall time between them (100 % = one CPU).
"""

from __future__ import annotations

import time
from typing import Any

import click

from aurae_cli.rpc_command import INTERRUPTED_EXIT, RPC_EXIT_BASE, finish

SORT_KEYS = ("cpu", "memory", "pids", "name")


def _bytes(value: int | None) -> str:
    if value is None:
        return "-"
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _optional(cell: Any, field: str) -> int | None:
    return getattr(cell, field) if cell.HasField(field) else None


def cpu_percent(previous: Any | None, current: Any) -> dict[str, float]:
    """CPU % per cell between two Metrics responses (none for the first)."""
    if previous is None or current.timestamp <= previous.timestamp:
        return {}
    before = {c.cell_name: c.cpu_usage_usec for c in previous.cells}
    elapsed = current.timestamp - previous.timestamp
    return {c.cell_name: max(0.0, (c.cpu_usage_usec - before[c.cell_name]) / 1e6 / elapsed * 100)
            for c in current.cells if c.cell_name in before}


def render(response: Any, percent: dict[str, float], sort: str) -> Any:
    from rich.table import Table

    when = time.strftime("%H:%M:%S", time.localtime(response.timestamp))
    table = Table(title=f"cells at {when} (cgroup v{2 if response.cgroup_v2 else 1})",
                  title_justify="left")
    for header in ("CELL", "EXES", "CPU %", "CPU TIME", "THROTTLED", "MEMORY", "PEAK", "LIMIT",
                   "PIDS", "OOM"):
        table.add_column(header, justify="left" if header == "CELL" else "right")
    cells = list(response.cells)
    keys = {
        "cpu": lambda c: -percent.get(c.cell_name, c.cpu_usage_usec / 1e6),
        "memory": lambda c: -(_optional(c, "memory_current_bytes") or 0),
        "pids": lambda c: -(_optional(c, "pids_current") or 0),
        "name": lambda c: c.cell_name,
    }
    for cell in sorted(cells, key=keys[sort]):
        share = percent.get(cell.cell_name)
        throttled = _optional(cell, "cpu_throttled_periods")
        periods = _optional(cell, "cpu_periods")
        throttled_text = "-" if throttled is None else (
            f"{throttled}/{periods} ({(_optional(cell, 'cpu_throttled_usec') or 0) / 1e6:.1f}s)")
        pids = _optional(cell, "pids_current")
        oom = _optional(cell, "oom_kills")
        table.add_row(
            cell.cell_name,
            str(cell.executables_running),
            "-" if share is None else f"{share:.1f}",
            f"{cell.cpu_usage_usec / 1e6:.2f}s",
            throttled_text,
            _bytes(_optional(cell, "memory_current_bytes")),
            _bytes(_optional(cell, "memory_peak_bytes")),
            _bytes(_optional(cell, "memory_max_bytes")),
            "-" if pids is None else str(pids),
            "-" if oom is None else str(oom),
        )
    if not cells:
        table.caption = "no cells"
    return table


@click.command("top")
@click.argument("cell", required=False, default="")
@click.option("-n", "--interval", type=click.FloatRange(min=0.1), default=2.0, show_default=True,
              metavar="SECONDS", help="Time between refreshes.")
@click.option("--sort", type=click.Choice(SORT_KEYS), default="cpu", show_default=True,
              help="Order of the rows.")
@click.option("--once", is_flag=True,
              help="Read twice, INTERVAL apart (so CPU % is known), print the table and exit.")
@click.pass_context
def top_command(ctx: click.Context, cell: str, interval: float, sort: str, once: bool) -> None:
    """Show what each cell uses (CELL and the cells in it, or every cell), refreshed live.

    CPU % is over the last interval (100 = one CPU); THROTTLED counts the periods in
    which a cell ran out of its cpu.max quota, and the time it spent throttled.

    \b
    Examples:
      aurae-py cells top
      aurae-py cells top web
    """
    from rich.console import Console
    from rich.live import Live

    from aurae_sdk.errors import AuraeError

    console = Console()
    if not console.is_terminal:
        console = Console(width=200)  # piped or captured: no wrapping at 80 columns
    try:
        client = ctx.find_root().obj.client()

        def read() -> Any:
            return client.cells.metrics(cell_name=cell)

        previous = read()
        if once:
            time.sleep(interval)
            current = read()
            console.print(render(current, cpu_percent(previous, current), sort))
            finish(0)
        with Live(render(previous, {}, sort), console=console, auto_refresh=False) as live:
            while True:
                time.sleep(interval)
                current = read()
                live.update(render(current, cpu_percent(previous, current), sort), refresh=True)
                previous = current
    except AuraeError as error:
        click.echo(f"aurae-py: {error}", err=True)
        finish(RPC_EXIT_BASE + error.status)
    except KeyboardInterrupt:
        finish(INTERRUPTED_EXIT)
