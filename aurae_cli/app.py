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

from aurae_cli.generated import GROUPS

# Hand-written commands: name -> (module, attribute, one-line help).
BUILTIN_COMMANDS = {
    "pki": ("aurae_cli.pki_commands", "pki_group", "Create and extend a development PKI."),
    "run": ("aurae_cli.scripts", "run_command", "Run a Python script with a connected client."),
    "repl": ("aurae_cli.repl", "repl_command", "Open the interactive Python REPL (the default)."),
    "describe": ("aurae_cli.describe", "describe_command",
                 "Show services, RPCs and messages from the embedded schema."),
    "doctor": ("aurae_cli.doctor", "doctor_command",
               "Check the config, certificates and daemon, and say what to fix."),
    "events": ("aurae_cli.events", "events_command",
               "Print the node's lifecycle events in order; -f follows them."),
}

# Hand-written commands inside a generated group: group -> name -> (module, attribute).
GROUP_COMMANDS = {
    "cells": {"top": ("aurae_cli.top", "top_command")},
}

# The environment variable click's shell completion answers to.
COMPLETE_VAR = "_AURAE_PY_COMPLETE"


class Session:
    """Connection settings from the root options; the client opens on first use."""

    def __init__(self, config: str | None, socket: str | None,
                 instance: str | None = None, vm: str | None = None) -> None:
        self.config = config
        self.socket = socket
        self.instance = instance
        self.vm = vm
        self._client: Any = None
        self._connection: Any = None

    def client(self) -> Any:
        if self._client is None:
            from aurae_sdk.client import Client
            from aurae_sdk.config import ConfigError
            from aurae_sdk.errors import AuraeError

            try:
                self._connection = Client(self.config, socket=self.socket)
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


def looks_like_script(argument: str) -> bool:
    return argument.endswith(".py") or os.path.isfile(argument)


@click.group(cls=LazyGroup, invoke_without_command=True,
             context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", envvar="AURAE_CONFIG", metavar="PATH",
              help="Client config (TOML). Default: $AURAE_CONFIG, ~/.aurae/config, "
                   "/etc/aurae/config, /var/lib/aurae/config.")
@click.option("--socket", metavar="TARGET",
              help="Daemon address: a Unix socket path, IP:PORT or [IPv6]:PORT.")
@click.option("--instance", metavar="NAME",
              help="Send the command to the spawned instance NAME through the daemon "
                   "(NAME/CHILD for a nested one).")
@click.option("--vm", metavar="ID",
              help="Drive the guest auraed of the daemon's running virtual machine ID.")
@click.version_option(package_name="aurae-py", prog_name="aurae-py")
@click.pass_context
def cli(ctx: click.Context, config: str | None, socket: str | None,
        instance: str | None, vm: str | None) -> None:
    """aurae-py: script, explore and drive an Aurae node.

    Without a command, opens the REPL (or, when stdin is not a terminal, runs
    it as a script). `aurae-py SCRIPT [ARGS]` runs a Python script.
    """
    ctx.obj = Session(config, socket, instance, vm)
    ctx.call_on_close(ctx.obj.close)
    if ctx.invoked_subcommand is None:
        if sys.stdin.isatty():
            from aurae_cli.repl import run_repl

            run_repl(config, socket)
        else:
            from aurae_cli.scripts import run_script
            from aurae_sdk.script import ScriptClients

            ctx.exit(run_script("-", [], ScriptClients(config, socket)))


@cli.command("completion")
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion_command(shell: str) -> None:
    """Print the shell completion script for SHELL.

    \b
    bash:  eval "$(aurae-py completion bash)"     (e.g. in ~/.bashrc)
    zsh:   eval "$(aurae-py completion zsh)"      (e.g. in ~/.zshrc)
    fish:  aurae-py completion fish > ~/.config/fish/completions/aurae-py.fish
    """
    from click.shell_completion import get_completion_class

    completion_class = get_completion_class(shell)
    if completion_class is None:  # click knows every shell the Choice allows
        raise click.UsageError(f"no completion for {shell}")
    click.echo(completion_class(cli, {}, "aurae-py", COMPLETE_VAR).source())
