"""The `aurae-py` command: scripts, the REPL, and a command per RPC.

    aurae-py                      open the REPL
    aurae-py script.py [ARGS]     run a script with a connected client
    aurae-py cells allocate web   call one RPC
    aurae-py cells top            a live table of what each cell uses
    aurae-py describe cells       show the API from the embedded schema
    aurae-py doctor               check config, certificates and the daemon
    aurae-py events -f            follow the node's lifecycle events
    aurae-py pki init DIR         make a development PKI

Command groups load on first use, so `aurae-py discovery discover` imports
only what that one call needs.
"""

from __future__ import annotations

import os
import sys
from importlib import import_module
from typing import Any

import click

from aurae_cli.contexts import complete_contexts
from aurae_cli.generated import GROUPS

# Hand-written commands: name -> (module, attribute, one-line help).
BUILTIN_COMMANDS = {
    "pki": ("aurae_cli.pki_commands", "pki_group", "Create and extend a development PKI."),
    "run": ("aurae_cli.scripts", "run_command",
            "Run a Python script, or a command on the node (run -- CMD)."),
    "logs": ("aurae_cli.logs", "logs_command",
             "Print an executable's output by cell and name (-f follows)."),
    "repl": ("aurae_cli.repl", "repl_command", "Open the interactive Python REPL (the default)."),
    "describe": ("aurae_cli.describe", "describe_command",
                 "Show services, RPCs and messages from the embedded schema."),
    "doctor": ("aurae_cli.doctor", "doctor_command",
               "Check the config, certificates and daemon, and say what to fix."),
    "events": ("aurae_cli.events", "events_command",
               "Print the node's lifecycle events in order; -f follows them."),
    "config": ("aurae_cli.contexts", "config_group",
               "Show and switch the contexts (nodes) of the client config."),
    "apply": ("aurae_cli.declared", "apply_command",
              "Make the node run what a manifest declares."),
    "diff": ("aurae_cli.declared", "diff_command",
             "Show what `apply` would change (exit 2 when it would)."),
    "delete": ("aurae_cli.declared", "delete_command",
               "Free the cells a manifest declares."),
}

# Hand-written commands inside a generated group: group -> name -> (module, attribute).
GROUP_COMMANDS = {
    "cells": {"top": ("aurae_cli.top", "top_command")},
}

# The environment variable click's shell completion answers to.
COMPLETE_VAR = "_AURAE_PY_COMPLETE"


class Session:
    """Connection settings from the root options; the client opens on first use.

    `fleet` holds the contexts a command runs on when it runs on several nodes
    (--context a,b or --all-contexts); then `context` is None.
    """

    def __init__(self, config: str | None, socket: str | None, *, cleanup: bool = False,
                 context: str | None = None, fleet: list[str] | None = None,
                 timeout: float | None = None, parallel: int = 16,
                 instance: str | None = None, vm: str | None = None) -> None:
        self.config = config
        self.socket = socket
        self.cleanup = cleanup
        self.context = context
        self.fleet = fleet
        self.timeout = timeout
        self.parallel = parallel
        self.instance = instance
        self.vm = vm
        self._client: Any = None
        self._connection: Any = None

    def script_clients(self) -> Any:
        from aurae_sdk.script import ScriptClients

        return ScriptClients(self.config, self.socket, context=self.context,
                             timeout=self.timeout)

    def client(self) -> Any:
        if self._client is None:
            from aurae_sdk.client import Client
            from aurae_sdk.config import ConfigError, load_config
            from aurae_sdk.errors import AuraeError

            try:
                config = load_config(self.config, context=self.context, socket=self.socket)
                settings: dict[str, Any] = {} if self.timeout is None else {"timeout": self.timeout}
                self._connection = Client(config, **settings)
                if self.vm is not None:
                    host, self._connection = self._connection, None
                    with host:
                        self._connection = host.vm(self.vm)
            except (ConfigError, AuraeError) as error:
                raise click.ClickException(str(error)) from None
            try:
                self._client = (self._connection.instance(self.instance) if self.instance
                                else self._connection)
            except ValueError as error:
                raise click.BadParameter(str(error), param_hint="--instance") from None
        return self._client

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *GROUPS, *BUILTIN_COMMANDS})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in GROUPS:
            group: click.Group = import_module(GROUPS[name][0]).group
            for command, (module, attribute) in GROUP_COMMANDS.get(name, {}).items():
                if command not in group.commands:
                    group.add_command(getattr(import_module(module), attribute), command)
            return group
        if name in BUILTIN_COMMANDS:
            module, attribute, _ = BUILTIN_COMMANDS[name]
            return getattr(import_module(module), attribute)  # type: ignore[no-any-return]
        return super().get_command(ctx, name)

    def resolve_command(self, ctx: click.Context,
                        args: list[str]) -> tuple[str | None, click.Command | None, list[str]]:
        # `aurae-py script.py ARGS` (and so a `#!/usr/bin/env aurae-py` line)
        # means `aurae-py run script.py ARGS`; a command name always wins.
        if args and looks_like_script(args[0]) and args[0] not in self.list_commands(ctx):
            return "run", self.get_command(ctx, "run"), args
        return super().resolve_command(ctx, args)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Listing must not import every group just to show its help line.
        rows = [(name, help_) for name, (_, help_) in GROUPS.items()]
        rows += [(name, help_) for name, (_, _, help_) in BUILTIN_COMMANDS.items()]
        rows += [(name, cmd.get_short_help_str()) for name, cmd in self.commands.items()]
        with formatter.section("Commands"):
            formatter.write_dl(sorted(rows))


def _fleet_contexts(config: str | None, names: list[str] | None) -> list[str]:
    from aurae_sdk.config import ConfigError, read_contexts

    try:
        known = read_contexts(config)
    except ConfigError as error:
        raise click.ClickException(str(error)) from None
    if names is None:
        return list(known.names)
    unknown = [name for name in names if name not in known.names]
    if unknown:
        raise click.BadParameter(
            f"no context {', '.join(unknown)} in {known.source} (known: "
            f"{', '.join(known.names)})", param_hint="--context")
    return names


# Root options that take a value, and those of them a node's own command line leaves out.
_VALUED_ROOT_OPTIONS = ("--config", "--socket", "--context", "--parallel", "--timeout")
_FLEET_OPTIONS = ("--context", "--parallel", "--all-contexts")


def _args_without_fleet_options(args: list[str]) -> list[str]:
    """The command line for one node: the root options but the fleet's, then the command."""
    kept: list[str] = []
    index = 0
    while index < len(args) and args[index].startswith("-"):
        arg = args[index]
        name = arg.partition("=")[0]
        takes_value = name in _VALUED_ROOT_OPTIONS and "=" not in arg
        if name not in _FLEET_OPTIONS:
            kept.extend(args[index:index + 1 + takes_value])
        index += 1 + takes_value
    return kept + args[index:]


def looks_like_script(argument: str) -> bool:
    return argument.endswith(".py") or os.path.isfile(argument)


@click.group(cls=LazyGroup, invoke_without_command=True,
             context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", envvar="AURAE_CONFIG", metavar="PATH",
              help="Client config (TOML). Default: $AURAE_CONFIG, ~/.aurae/config, "
                   "/etc/aurae/config, /var/lib/aurae/config.")
@click.option("--socket", metavar="TARGET",
              help="Daemon address: a Unix socket path, IP:PORT or [IPv6]:PORT.")
@click.option("--context", "contexts", envvar="AURAE_CONTEXT", metavar="NAME[,NAME...]",
              shell_complete=complete_contexts,
              help="Which node(s) of the client config to talk to; several run the command on "
                   "each, concurrently. Default: $AURAE_CONTEXT, then the file's "
                   "current_context.")
@click.option("--all-contexts", is_flag=True,
              help="Run the command (or script) on every context of the client config.")
@click.option("--parallel", type=click.IntRange(1, 256), default=16, show_default=True,
              metavar="N", help="With several contexts: how many nodes are worked on at once.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), metavar="SECONDS",
              help="Default deadline of every call (30 s unless set; streams have none).")
@click.option("--instance", metavar="NAME",
              help="Send the command to the spawned instance NAME through the daemon "
                   "(NAME/CHILD for a nested one).")
@click.option("--vm", metavar="ID",
              help="Drive the guest auraed of the daemon's running virtual machine ID.")
@click.option("--cleanup", is_flag=True,
              help="Scripts: free what the script allocated if it fails or is interrupted.")
@click.version_option(package_name="aurae-py", prog_name="aurae-py")
@click.pass_context
def cli(ctx: click.Context, config: str | None, socket: str | None, contexts: str | None,
        all_contexts: bool, parallel: int, timeout: float | None, instance: str | None,
        vm: str | None, cleanup: bool) -> None:
    """aurae-py: script, explore and drive an Aurae node.

    Without a command, opens the REPL (or, when stdin is not a terminal, runs
    it as a script). `aurae-py SCRIPT [ARGS]` runs a Python script.

    \b
    Examples:
      aurae-py cells list
      aurae-py --context edge-1 cells allocate web --memory-max 256M
      aurae-py --context edge-1,edge-2 discovery discover
      aurae-py --all-contexts deploy.py
      aurae-py apply -f node.yaml
    """
    fleet = None
    names = [name for name in (contexts or "").split(",") if name]
    if all_contexts or len(names) > 1:
        fleet = _fleet_contexts(config, None if all_contexts else names)
    ctx.obj = Session(config, socket, cleanup=cleanup, timeout=timeout, parallel=parallel,
                      instance=instance, vm=vm,
                      context=names[0] if fleet is None and names else None, fleet=fleet)
    ctx.call_on_close(ctx.obj.close)
    if fleet is not None and ctx.invoked_subcommand not in GROUPS:
        # Anything but a single RPC (a script, apply, the REPL's stdin): one aurae-py per node.
        from aurae_cli.fleet import run_per_node

        ctx.exit(run_per_node(ctx.obj, _args_without_fleet_options(sys.argv[1:])))
    if ctx.invoked_subcommand is None:
        if sys.stdin.isatty():
            from aurae_cli.repl import run_repl

            run_repl(config, socket, context=ctx.obj.context, timeout=timeout)
        else:
            from aurae_cli.scripts import run_script

            ctx.exit(run_script("-", [], ctx.obj.script_clients(), cleanup=cleanup))


@cli.command("completion")
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion_command(shell: str) -> None:
    """Print the shell completion script for SHELL.

    \b
    bash:  eval "$(aurae-py completion bash)"     (e.g. in ~/.bashrc)
    zsh:   eval "$(aurae-py completion zsh)"      (e.g. in ~/.zshrc)
    fish:  aurae-py completion fish > ~/.config/fish/completions/aurae-py.fish

    Cell, executable and context names complete from the node and the client config.

    \b
    Examples:
      eval "$(aurae-py completion bash)"
      aurae-py cells free <TAB>
    """
    from click.shell_completion import get_completion_class

    completion_class = get_completion_class(shell)
    if completion_class is None:  # click knows every shell the Choice allows
        raise click.UsageError(f"no completion for {shell}")
    click.echo(completion_class(cli, {}, "aurae-py", COMPLETE_VAR).source())
