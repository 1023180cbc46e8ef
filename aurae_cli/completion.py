"""Shell completion of the names on the node: cells, executables and VMs, asked of the daemon.

Completion must never hang a shell or print errors into it: calls get a short deadline and any
failure completes nothing.
"""

from __future__ import annotations

from typing import Any

import click

COMPLETION_TIMEOUT = 2.0


def _client(ctx: click.Context) -> Any:
    from aurae_sdk.client import Client
    from aurae_sdk.config import load_config

    params = ctx.find_root().params
    contexts = (params.get("contexts") or "").split(",")
    config = load_config(params.get("config"), context=contexts[0] or None,
                         socket=params.get("socket"))
    return Client(config, timeout=COMPLETION_TIMEOUT)


def _tree(ctx: click.Context) -> list[Any]:
    try:
        with _client(ctx) as client:
            nodes: list[Any] = []

            def walk(level: Any) -> None:
                for node in level:
                    nodes.append(node)
                    walk(node.children)

            from aurae_sdk.cell_tree import list_cells

            walk(list_cells(client))
            return nodes
    except Exception:  # noqa: BLE001 - completion offers nothing rather than an error
        return []


def cell_names(ctx: click.Context, incomplete: str) -> list[Any]:
    from click.shell_completion import CompletionItem

    return [CompletionItem(node.cell.name) for node in _tree(ctx)
            if node.cell.name.startswith(incomplete)]


def executable_names(ctx: click.Context, cell: str, incomplete: str) -> list[Any]:
    from click.shell_completion import CompletionItem

    return [CompletionItem(status.name) for node in _tree(ctx) if node.cell.name == cell
            for status in node.executables if status.name.startswith(incomplete)]


def complete_cell_name(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[Any]:
    """For a cell-name argument or flag."""
    return cell_names(ctx, incomplete)


def complete_executable_name(ctx: click.Context, param: click.Parameter,
                             incomplete: str) -> list[Any]:
    """For an executable-name argument or flag: the executables of the cell given before it."""
    return executable_names(ctx, ctx.params.get("cell_name") or "", incomplete)


def complete_vm_id(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[Any]:
    """For a VM id argument: the machines the daemon knows."""
    from click.shell_completion import CompletionItem

    try:
        with _client(ctx) as client:
            machines = client.vms.list().machines
    except Exception:  # noqa: BLE001 - completion offers nothing rather than an error
        return []
    return [CompletionItem(m.id) for m in machines if m.id.startswith(incomplete)]
