"""`aurae-py pki`'s files: a development PKI directory with Aurae's names and layout.

One CA, a server certificate, named client certificates and a client config, written so that a
daemon and its clients can be brought up on one machine without openssl. The certificates
themselves are minted by aurae_sdk.wire.pki, which the daemon shares; this module lays them out
on disk. The CA key is kept unencrypted next to the certificates: this is for development and
tests, not for production trust.
"""

from __future__ import annotations

import datetime as dt
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from aurae_sdk.wire import paths, spiffe
from aurae_sdk.wire.paths import CA_CRT, CA_KEY, CLIENT_CONFIG, SERVER_CRT, SERVER_KEY
from aurae_sdk.wire.pki import (
    PUBLIC_FILE_MODE,
    CertificateAuthority,
    PkiError,
    RefusedOverwrite,
    check_client_name,
    check_spiffe_id,
    make_private_directory,
    spiffe_id_for,
    write_credential,
    write_new_file,
)
from aurae_sdk.wire.spiffe import DEFAULT_TRUST_DOMAIN
from aurae_sdk.wire.targets import DEFAULT_SOCKET


@dataclass(frozen=True)
class ClientPaths:
    """Where one client's certificate and key live, and the identity the certificate carries."""

    name: str
    spiffe_id: str
    crt: Path
    key: Path


@dataclass(frozen=True)
class PkiPaths:
    """Every file init_pki wrote; all paths are absolute."""

    directory: Path
    ca_crt: Path
    ca_key: Path
    server_crt: Path
    server_key: Path
    clients: tuple[ClientPaths, ...]
    config: Path


def init_pki(
    directory: str | os.PathLike[str],
    clients: Sequence[str] = ("admin",),
    *,
    trust_domain: str = DEFAULT_TRUST_DOMAIN,
    socket: str = DEFAULT_SOCKET,
    server_names: Iterable[str] = (),
    force: bool = False,
) -> PkiPaths:
    """Create a CA, a server certificate and one certificate per client in `directory`.

    Also writes `<directory>/config`, the client config of the first client. Nothing is written if
    any of these files exists already, unless force=True replaces them.
    """
    if isinstance(clients, str):  # one name, not a sequence of one-letter names
        clients = [clients]
    if not clients:
        raise PkiError("at least one client is needed: the client config is written for the first")
    duplicates = sorted(name for name, count in Counter(clients).items() if count > 1)
    if duplicates:
        raise PkiError(f"client names given more than once: {', '.join(duplicates)}")
    for name in clients:
        check_client_name(name)
    _check_trust_domain(trust_domain)

    root = Path(directory).expanduser().absolute()
    client_paths = tuple(
        _client_paths(root, name, spiffe_id_for(name, trust_domain)) for name in clients
    )
    paths = PkiPaths(
        directory=root,
        ca_crt=root / CA_CRT,
        ca_key=root / CA_KEY,
        server_crt=root / SERVER_CRT,
        server_key=root / SERVER_KEY,
        clients=client_paths,
        config=root / CLIENT_CONFIG,
    )
    if not force:
        # Check before generating anything, so a refusal leaves no half-made PKI behind.
        _refuse_existing(
            [paths.ca_crt, paths.ca_key, paths.server_crt, paths.server_key, paths.config]
            + [path for client in client_paths for path in (client.crt, client.key)]
        )
    make_private_directory(root)

    ca = CertificateAuthority.create()
    write_credential(ca, paths.ca_crt, paths.ca_key, force=force)
    write_credential(
        ca.issue_server(extra_names=server_names), paths.server_crt, paths.server_key, force=force
    )
    for client in client_paths:
        credential = ca.issue_client(client.name, trust_domain=trust_domain)
        write_credential(credential, client.crt, client.key, force=force)
    first = client_paths[0]
    write_client_config(paths.config, paths.ca_crt, first.crt, first.key, socket, force=force)
    return paths


def issue_client(
    directory: str | os.PathLike[str],
    name: str,
    spiffe_id: str | None = None,
    *,
    trust_domain: str = DEFAULT_TRUST_DOMAIN,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    force: bool = False,
) -> ClientPaths:
    """Sign one more client certificate with the CA of an existing PKI directory."""
    check_client_name(name)
    spiffe_id = spiffe_id or spiffe_id_for(name, trust_domain)
    check_spiffe_id(spiffe_id)
    root = Path(directory).expanduser().absolute()
    paths = _client_paths(root, name, spiffe_id)
    if not force:
        _refuse_existing([paths.crt, paths.key])
    ca = CertificateAuthority.load(root)
    credential = ca.issue_client(
        name, spiffe_ids=[spiffe_id], not_before=not_before, not_after=not_after
    )
    write_credential(credential, paths.crt, paths.key, force=force)
    return paths


def client_crt_path(directory: str | os.PathLike[str], name: str) -> Path:
    return Path(directory) / paths.client_crt_name(name)


def client_key_path(directory: str | os.PathLike[str], name: str) -> Path:
    return Path(directory) / paths.client_key_name(name)


def write_client_config(
    path: str | os.PathLike[str],
    ca_crt: str | os.PathLike[str],
    client_crt: str | os.PathLike[str],
    client_key: str | os.PathLike[str],
    socket: str,
    *,
    force: bool = False,
) -> None:
    """Write an Aurae client config: [auth] ca_crt, client_crt, client_key and [system] socket."""
    text = (
        "# Aurae client configuration.\n"
        "[auth]\n"
        f"ca_crt = {toml_string(os.fspath(ca_crt))}\n"
        f"client_crt = {toml_string(os.fspath(client_crt))}\n"
        f"client_key = {toml_string(os.fspath(client_key))}\n"
        "\n"
        "[system]\n"
        f"socket = {toml_string(socket)}\n"
    )
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise PkiError(
            f"cannot write {path}: a path is not valid UTF-8, which TOML requires"
        ) from error
    write_new_file(Path(path), data, PUBLIC_FILE_MODE, force)


def _check_trust_domain(trust_domain: str) -> None:
    try:
        spiffe.check_trust_domain(trust_domain)
    except ValueError as error:
        raise PkiError(str(error)) from None


def _client_paths(root: Path, name: str, spiffe_id: str) -> ClientPaths:
    return ClientPaths(name, spiffe_id, client_crt_path(root, name), client_key_path(root, name))


def _refuse_existing(paths: Iterable[Path]) -> None:
    existing = [path for path in paths if os.path.lexists(path)]
    if existing:
        raise RefusedOverwrite(existing)


_TOML_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}


def toml_string(value: str) -> str:
    """value as a TOML basic string: quotes, backslashes and control characters escaped."""
    escaped = []
    for char in value:
        if char in _TOML_ESCAPES:
            escaped.append(_TOML_ESCAPES[char])
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            escaped.append(f"\\u{ord(char):04X}")
        else:
            escaped.append(char)
    return '"' + "".join(escaped) + '"'


__all__ = [
    "ClientPaths",
    "PkiError",
    "PkiPaths",
    "RefusedOverwrite",
    "client_crt_path",
    "client_key_path",
    "init_pki",
    "issue_client",
    "toml_string",
    "write_client_config",
]
