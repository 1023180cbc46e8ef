"""The `aurae-py` command: scripts, the REPL, and a command per RPC.

    aurae-py                      open the REPL
    aurae-py script.py [ARGS]     run a script with a connected client
    aurae-py cells allocate web   call one RPC
    aurae-py pki init DIR         make a development PKI

Command groups load on first use, so `aurae-py discovery discover` imports
only what that one call needs.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

import click

from aurae_cli.generated import GROUPS

# Hand-written commands: name -> (module, attribute, one-line help).
BUILTIN_COMMANDS = {
    "pki": ("aurae_cli.pki_commands", "pki_group", "Create and extend a development PKI."),
}


class Session:
    """Connection settings from the root options; the client opens on first use."""

    def __init__(self, config: str | None, socket: str | None) -> None:
        self.config = config
        self.socket = socket
        self._client: Any = None

    def client(self) -> Any:
        if self._client is None:
            from aurae_sdk.client import Client
            from aurae_sdk.config import ConfigError

            try:
                self._client = Client(self.config, socket=self.socket)
            except ConfigError as error:
                raise click.ClickException(str(error)) from None
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *GROUPS, *BUILTIN_COMMANDS})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in GROUPS:
            return import_module(GROUPS[name][0]).group  # type: ignore[no-any-return]
        if name in BUILTIN_COMMANDS:
            module, attribute, _ = BUILTIN_COMMANDS[name]
            return getattr(import_module(module), attribute)  # type: ignore[no-any-return]
        return super().get_command(ctx, name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Listing must not import every group just to show its help line.
        rows = [(name, help_) for name, (_, help_) in GROUPS.items()]
        rows += [(name, help_) for name, (_, _, help_) in BUILTIN_COMMANDS.items()]
        rows += [(name, cmd.get_short_help_str()) for name, cmd in self.commands.items()]
        with formatter.section("Commands"):
            formatter.write_dl(sorted(rows))


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", envvar="AURAE_CONFIG", metavar="PATH",
              help="Client config (TOML). Default: $AURAE_CONFIG, ~/.aurae/config, "
                   "/etc/aurae/config, /var/lib/aurae/config.")
@click.option("--socket", metavar="TARGET",
              help="Daemon address: a Unix socket path, IP:PORT or [IPv6]:PORT.")
@click.version_option(package_name="aurae-py", prog_name="aurae-py")
@click.pass_context
def cli(ctx: click.Context, config: str | None, socket: str | None) -> None:
    """aurae-py: script, explore and drive an Aurae node."""
    ctx.obj = Session(config, socket)
    ctx.call_on_close(ctx.obj.close)
