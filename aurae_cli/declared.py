"""`aurae-py apply | diff | delete -f MANIFEST`: declared state from YAML, applied.

The commands are thin: `aurae_sdk.manifest` reads the file, `aurae_sdk.declared` plans and
executes. Exit statuses follow `terraform plan -detailed-exitcode` for diff (0: the node matches,
2: changes), 1 for a manifest error, 64 + the gRPC status for a failed call.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import click

from aurae_cli.rpc_command import RPC_EXIT_BASE

if TYPE_CHECKING:
    from aurae_sdk.client import Client
    from aurae_sdk.declared import Node, Step

T = TypeVar("T")
DIFF_CHANGES_EXIT = 2

_file_option = click.option(
    "-f", "--filename", "manifest", required=True, metavar="FILE",
    help="The manifest (YAML); '-' reads stdin.",
)
_verbose_option = click.option(
    "-v", "--verbose", is_flag=True, help="List unchanged cells and executables too.",
)


def _load(manifest: str) -> Node:
    from aurae_sdk.manifest import load

    return load(manifest)


def _run(action: Callable[[], T]) -> T:
    """Run a declared-state call; turn its failures into the CLI's one error style."""
    from aurae_sdk.declared import DeclaredStateError
    from aurae_sdk.errors import AuraeError

    try:
        return action()
    except DeclaredStateError as error:
        click.echo(f"aurae-py: {error}", err=True)
        sys.exit(1)
    except AuraeError as error:
        from aurae_cli.hints import with_hint

        click.echo(with_hint(f"aurae-py: {error}", error), err=True)
        sys.exit(RPC_EXIT_BASE + error.status)


@click.command("apply")
@_file_option
@click.option("--prune", is_flag=True,
              help="Also delete cells this manifest's owner made that it no longer declares.")
@click.option("--dry-run", is_flag=True, help="Print the plan; change nothing.")
@_verbose_option
@click.pass_context
def apply_command(ctx: click.Context, manifest: str, prune: bool, dry_run: bool,
                  verbose: bool) -> None:
    """Make the node run what the manifest declares.

    Creates what is missing, updates limits and labels in place, replaces what cannot change in
    place (isolation, a command), and with --prune deletes cells the manifest's owner made that
    it no longer lists. Applying the same manifest twice changes nothing.

    \b
    Examples:
      aurae-py apply -f node.yaml
      aurae-py apply -f node.yaml --prune
      aurae-py apply -f node.yaml --dry-run
    """
    import aurae_sdk
    from aurae_cli.progress import steps
    from aurae_sdk.declared import execute

    node = _run(lambda: _load(manifest))
    client = ctx.find_root().obj.client()
    plan = _run(lambda: aurae_sdk.plan(client, node, prune=prune))
    if not dry_run:
        # On a terminal: a bar over the steps, and a clock on the long ones (a VM boots for
        # seconds, about a minute under TCG; an instance's daemon takes seconds to answer).
        with steps(len(plan.changes)) as shown:
            def begin(step: Step) -> None:
                shown.begin(_describe(step), long=_is_long(step),
                            detail=_boot_detail(client, step))

            def done(step: Step) -> None:
                if step.action != "no-op":
                    shown.done(f"{step.action} {step.kind} {step.name}")

            _run(lambda: execute(client, plan, on_step=done, on_begin=begin))
    click.echo(plan.render(verbose=verbose))
    if dry_run:
        click.echo("Dry run: nothing was changed.")


def _boot_detail(client: Client, step: Step) -> Callable[[], str] | None:
    """For a step that boots a VM: its phase and console line, as `vms start` shows them."""
    if not _describe(step).startswith("booting vm "):
        return None
    from aurae_cli.vm_boot import BootWatch

    watch = BootWatch(client, step.name)

    def detail() -> str:
        watch.poll()
        return watch.describe()

    return detail


def _is_long(step: Step) -> bool:
    return ((step.kind == "vm" and step.action != "delete")
            or (step.kind == "instance" and step.action in ("create", "replace")))


def _describe(step: Step) -> str:
    """What a step is doing, as the progress line says it."""
    if step.kind == "vm" and step.action in ("create", "replace"):
        running = any(c.field == "running" and c.after is False for c in step.changes)
        return f"allocating vm {step.name}" if running else f"booting vm {step.name}"
    if step.kind == "vm" and step.action == "update":
        starting = any(c.field == "running" and c.after is True for c in step.changes)
        return f"{'booting' if starting else 'stopping'} vm {step.name}"
    if step.kind == "instance" and step.action in ("create", "replace"):
        return f"spawning instance {step.name}"
    where = f"[{step.instance}] " if step.instance else ""
    return f"{step.action} {step.kind} {where}{step.name}"


@click.command("diff")
@_file_option
@click.option("--prune", is_flag=True, help="Show what `apply --prune` would delete too.")
@_verbose_option
@click.pass_context
def diff_command(ctx: click.Context, manifest: str, prune: bool, verbose: bool) -> None:
    """Show what `apply` would change. Exit 0 when the node matches, 2 when it does not.

    \b
    Examples:
      aurae-py diff -f node.yaml
      aurae-py diff -f node.yaml --prune || aurae-py apply -f node.yaml --prune
    """
    import aurae_sdk

    node = _run(lambda: _load(manifest))
    client = ctx.find_root().obj.client()
    plan = _run(lambda: aurae_sdk.plan(client, node, prune=prune))
    click.echo(plan.render(verbose=verbose))
    ctx.exit(DIFF_CHANGES_EXIT if plan.changed else 0)


@click.command("delete")
@_file_option
@click.option("--dry-run", is_flag=True, help="Print what would be deleted; change nothing.")
@click.pass_context
def delete_command(ctx: click.Context, manifest: str, dry_run: bool) -> None:
    """Free every cell the manifest declares that its owner made (nested cells with them).

    Cells of the same names that another owner made are left alone, and said so.

    \b
    Examples:
      aurae-py delete -f node.yaml
      aurae-py delete -f node.yaml --dry-run
    """
    import aurae_sdk

    node = _run(lambda: _load(manifest))
    client = ctx.find_root().obj.client()
    plan = _run(lambda: aurae_sdk.delete(client, node, dry_run=dry_run))
    click.echo(plan.render(verbose=True) if plan.steps else "Nothing to delete.")
    if dry_run:
        click.echo("Dry run: nothing was changed.")
