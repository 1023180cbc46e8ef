"""`aurae-py config get-contexts | current-context | use-context NAME`: the nodes of the client
config, and which one commands talk to; plus shell completion of context names."""

from __future__ import annotations

from typing import Any

import click


def complete_contexts(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[Any]:
    """Context names of the client config, for shell completion of --context (a,b,...)."""
    from click.shell_completion import CompletionItem

    from aurae_sdk.config import ConfigError, read_contexts

    try:
        names = read_contexts(ctx.find_root().params.get("config")).names
    except ConfigError:
        return []
    done, _, last = incomplete.rpartition(",")
    prefix = f"{done}," if done else ""
    return [CompletionItem(prefix + name) for name in names if name.startswith(last)]


def _complete_one(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[Any]:
    return [item for item in complete_contexts(ctx, param, incomplete) if "," not in item.value]


def _config_path(ctx: click.Context) -> str | None:
    path: str | None = ctx.find_root().obj.config
    return path


@click.group("config")
def config_group() -> None:
    """Show and switch the contexts (nodes) of the client config.

    A context is one node: `[contexts.NAME.system] socket = ...` in the config file, with
    `[contexts.NAME.auth]` when it needs its own certificates (else the top-level [auth] is
    used). The top-level [auth] and [system] are the context "default".

    \b
    Examples:
      aurae-py config get-contexts
      aurae-py config use-context edge-1
      AURAE_CONTEXT=edge-2 aurae-py cells list
    """


@config_group.command("get-contexts")
@click.option("-o", "--output", type=click.Choice(["table", "name", "json", "yaml"]),
              default="table", show_default=True, help="How to print the contexts.")
@click.pass_context
def get_contexts_command(ctx: click.Context, output: str) -> None:
    """List the contexts of the client config; '*' marks the current one.

    \b
    Examples:
      aurae-py config get-contexts
      aurae-py config get-contexts -o name
    """
    from aurae_cli.tables import print_rows
    from aurae_sdk.config import ConfigError, load_config, read_contexts

    try:
        found = read_contexts(_config_path(ctx))
        configs = [load_config(found.source, context=name) for name in found.names]
    except ConfigError as error:
        raise click.ClickException(str(error)) from None
    rows = [{"current": "*" if c.context == found.current else "", "name": c.context,
             "socket": c.socket, "client_crt": c.client_crt} for c in configs]
    if output == "name":
        for row in rows:
            click.echo(row["name"])
        return
    print_rows(rows, output, columns=("current", "name", "socket"),
               wide=("client_crt",), empty="no contexts in " + found.source)


@config_group.command("current-context")
@click.pass_context
def current_context_command(ctx: click.Context) -> None:
    """Print the context commands use (after --context and $AURAE_CONTEXT).

    \b
    Examples:
      aurae-py config current-context
    """
    from aurae_sdk.config import ConfigError, load_config

    session = ctx.find_root().obj
    try:
        config = load_config(session.config, context=session.context)
    except ConfigError as error:
        raise click.ClickException(str(error)) from None
    click.echo(config.context)


@config_group.command("use-context")
@click.argument("name", shell_complete=_complete_one)
@click.pass_context
def use_context_command(ctx: click.Context, name: str) -> None:
    """Make NAME the config file's current context (its `current_context`).

    $AURAE_CONTEXT and --context still win over it.

    \b
    Examples:
      aurae-py config use-context edge-1
    """
    from aurae_sdk.config import ConfigError, use_context

    try:
        source = use_context(name, _config_path(ctx))
    except ConfigError as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"Switched to context {name!r} in {source}.")
