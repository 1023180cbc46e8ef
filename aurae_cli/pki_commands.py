"""`aurae-py pki`: make a development PKI for auraed and its clients.

cryptography is imported inside the commands, not here: it takes about 0.1 s to import, and this
module is loaded whenever the CLI starts, for `aurae-py --help` too.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import click

# Cheap modules, unlike pki itself (cryptography), which --help must not import.
from aurae_sdk.wire.dns import SERVER_NAME
from aurae_sdk.wire.paths import DEFAULT_SOCKET
from aurae_sdk.wire.spiffe import DEFAULT_TRUST_DOMAIN


@click.group("pki")
def pki_group() -> None:
    """Create the CA, server and client certificates auraed's mTLS needs (development only)."""


@pki_group.command("init")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--client",
    "clients",
    metavar="NAME",
    multiple=True,
    default=("admin",),
    show_default=True,
    help="Issue a client certificate for NAME (repeatable); DIR/config uses the first.",
)
@click.option(
    "--trust-domain",
    default=DEFAULT_TRUST_DOMAIN,
    show_default=True,
    help="SPIFFE trust domain of the clients' IDs (spiffe://TRUST-DOMAIN/NAME).",
)
@click.option(
    "--socket",
    default=DEFAULT_SOCKET,
    show_default=True,
    help="Daemon address written to DIR/config: a Unix socket path or HOST:PORT.",
)
@click.option(
    "--server-name",
    "server_names",
    metavar="NAME|IP",
    multiple=True,
    help="Extra DNS name or IP address for the server certificate (repeatable), for TLS clients "
    "that verify the address they dial.",
)
@click.option("--force", is_flag=True, help="Replace existing files.")
def init_command(
    directory: Path,
    clients: tuple[str, ...],
    trust_domain: str,
    socket: str,
    server_names: tuple[str, ...],
    force: bool,
) -> None:
    """Create a CA, server and client certificates, and a client config in DIRECTORY.

    DIRECTORY/config is the client config of the first client. The CA key is stored unencrypted
    next to the certificates: use this for development and tests only.

    \b
    Examples:
      aurae-py pki init ./pki
      aurae-py pki init ./pki --socket 10.0.0.5:8080
      export AURAE_CONFIG=$PWD/pki/config
    """
    from aurae_cli import pki

    try:
        paths = pki.init_pki(
            directory,
            clients,
            trust_domain=trust_domain,
            socket=socket,
            server_names=server_names,
            force=force,
        )
    except pki.RefusedOverwrite as error:
        raise click.ClickException(f"{error} (use --force to replace them)") from None
    except pki.PkiError as error:
        raise click.ClickException(str(error)) from None

    click.echo(f"Wrote a development PKI to {paths.directory}:")
    _echo_file("CA certificate", paths.ca_crt)
    _echo_file("CA key", paths.ca_key, "(mode 0600)")
    _echo_file("server certificate", paths.server_crt, f"({SERVER_NAME})")
    _echo_file("server key", paths.server_key, "(mode 0600)")
    for client in paths.clients:
        _echo_file(f"client {client.name}", client.crt, f"({client.spiffe_id})")
        _echo_file(f"client {client.name} key", client.key, "(mode 0600)")
    _echo_file("client config", paths.config, f"(client {paths.clients[0].name})")

    daemon_command = [
        "auraed",
        "--ca-crt",
        str(paths.ca_crt),
        "--server-crt",
        str(paths.server_crt),
        "--server-key",
        str(paths.server_key),
    ]
    if socket != DEFAULT_SOCKET:
        daemon_command += ["--socket", socket]
    click.echo("\nStart the daemon with:")
    click.echo(f"  {shlex.join(daemon_command)}")
    click.echo("Point clients at it with:")
    click.echo(f"  export AURAE_CONFIG={shlex.quote(str(paths.config))}")


@pki_group.command("issue")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.argument("name")
@click.option(
    "--spiffe-id",
    metavar="URI",
    help="SPIFFE ID of the client. [default: spiffe://TRUST-DOMAIN/NAME]",
)
@click.option(
    "--trust-domain",
    default=DEFAULT_TRUST_DOMAIN,
    show_default=True,
    help="Trust domain of the default SPIFFE ID.",
)
@click.option(
    "--days",
    type=click.IntRange(min=1),
    default=365,
    show_default=True,
    help="Days the certificate stays valid.",
)
@click.option("--force", is_flag=True, help="Replace an existing certificate and key for NAME.")
def issue_command(
    directory: Path,
    name: str,
    spiffe_id: str | None,
    trust_domain: str,
    days: int,
    force: bool,
) -> None:
    """Issue a client certificate for NAME, signed by the CA in DIRECTORY.

    \b
    Examples:
      aurae-py pki issue ./pki ci-runner
    """
    import datetime as dt

    from aurae_cli import pki

    try:
        client = pki.issue_client(
            directory,
            name,
            spiffe_id,
            trust_domain=trust_domain,
            not_after=dt.datetime.now(dt.UTC) + dt.timedelta(days=days),
            force=force,
        )
    except pki.RefusedOverwrite as error:
        raise click.ClickException(f"{error} (use --force to replace them)") from None
    except pki.PkiError as error:
        raise click.ClickException(str(error)) from None

    click.echo(f"Issued a client certificate for {client.name} ({client.spiffe_id}):")
    _echo_file("certificate", client.crt)
    _echo_file("key", client.key, "(mode 0600)")
    click.echo("\nTo connect as this client, set in a client config (see $AURAE_CONFIG):")
    click.echo("  [auth]")
    click.echo(f"  client_crt = {pki.toml_string(str(client.crt))}")
    click.echo(f"  client_key = {pki.toml_string(str(client.key))}")


def _echo_file(label: str, path: Path, note: str = "") -> None:
    click.echo(f"  {label + ':':<22} {path} {note}".rstrip())
