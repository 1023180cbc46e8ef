"""Client configuration: where auraed listens and which certificates prove who we are.

Aurae clients read a TOML file ([auth] ca_crt, client_crt, client_key; [system] socket) from
$HOME/.aurae/config, /etc/aurae/config or /var/lib/aurae/config. Every connection is mTLS, and the
client always verifies the server as server.unsafe.aurae.io, whatever the transport.

The SDK imports this module at import time, so it stays on cheap stdlib modules; grpc is imported
only when credentials are actually built.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aurae_sdk.wire import dns, paths, targets

if TYPE_CHECKING:
    import grpc

TLS_SERVER_NAME = dns.SERVER_NAME
CONFIG_ENV = paths.CONFIG_ENV
SEARCH_PATHS = paths.CONFIG_SEARCH_PATHS
Target = targets.Target

_AUTH_KEYS = ("ca_crt", "client_crt", "client_key")

class ConfigError(ValueError):
    """The client configuration is missing, unreadable or invalid; the message says where."""


@dataclass(frozen=True)
class ClientConfig:
    """What a client needs to reach auraed: its mTLS material and the daemon's socket."""

    ca_crt: str
    client_crt: str
    client_key: str
    # The daemon's address as written: a Unix socket path or host:port; see parse_target.
    socket: str
    # The config file these values came from, or a note that they were given as arguments.
    source: str

    @property
    def target(self) -> Target:
        """The socket, parsed."""
        return parse_target(self.socket)


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    socket: str | None = None,
    ca_crt: str | None = None,
    client_crt: str | None = None,
    client_key: str | None = None,
) -> ClientConfig:
    """Load the client config; explicit arguments win over the file.

    The file is `path` if given, else $AURAE_CONFIG, else the first of ~/.aurae/config,
    /etc/aurae/config and /var/lib/aurae/config that exists; no file is read when every value is
    an argument and no path is given. `~` is expanded in every path. A relative certificate path
    in a file is relative to the file's directory (so a PKI directory can be moved whole); a
    relative socket path, like a relative argument, is relative to the working directory.
    """
    overrides: dict[str, str] = {}
    for key, value in (
        ("ca_crt", ca_crt),
        ("client_crt", client_crt),
        ("client_key", client_key),
        ("socket", socket),
    ):
        if value is not None:
            if not value:
                raise ConfigError(f"the {key} argument is empty")
            overrides[key] = value if key == "socket" else os.path.expanduser(value)

    if path is None and len(overrides) == len(_AUTH_KEYS) + 1:
        values, source = overrides, "arguments"
    else:
        source = _find_config_file(path)
        values = _read_config_file(source) | overrides
        for section, key in [("auth", key) for key in _AUTH_KEYS] + [("system", "socket")]:
            if key not in values:
                raise ConfigError(f"{source}: missing {key} in [{section}]")
    try:
        parse_target(values["socket"])
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from None
    return ClientConfig(
        ca_crt=values["ca_crt"],
        client_crt=values["client_crt"],
        client_key=values["client_key"],
        socket=values["socket"],
        source=source,
    )


def parse_target(socket: str) -> Target:
    """Parse a daemon address (see aurae_sdk.wire.targets.parse_target); raises ConfigError."""
    try:
        return targets.parse_target(socket)
    except targets.TargetError as error:
        raise ConfigError(str(error)) from None


def channel_options(target: Target) -> list[tuple[str, str]]:
    """Channel options that make grpc verify and address the daemon as server.unsafe.aurae.io.

    Over a Unix socket there is no host name to check, so the name is set explicitly; on TCP the
    same override keeps verification independent of the address dialled. The options are the same
    for every kind of target today; taking the target keeps callers free of that knowledge.
    """
    return [
        ("grpc.ssl_target_name_override", TLS_SERVER_NAME),
        ("grpc.default_authority", TLS_SERVER_NAME),
    ]


def channel_credentials(config: ClientConfig) -> grpc.ChannelCredentials:
    """mTLS credentials from the config's CA certificate, client certificate and client key."""
    # Imported here, not at the top: importing grpc takes over 100 ms, and most users of this
    # module only read configuration.
    import grpc

    return grpc.ssl_channel_credentials(
        root_certificates=_read_pem(config, "ca_crt", config.ca_crt),
        private_key=_read_pem(config, "client_key", config.client_key),
        certificate_chain=_read_pem(config, "client_crt", config.client_crt),
    )


def _find_config_file(path: str | os.PathLike[str] | None) -> str:
    if path is not None:
        return _existing_config(os.path.expanduser(os.fspath(path)), "")
    from_env = os.environ.get(CONFIG_ENV)
    if from_env:
        return _existing_config(os.path.expanduser(from_env), f" (from ${CONFIG_ENV})")
    tried = [os.path.expanduser(candidate) for candidate in SEARCH_PATHS]
    for candidate in tried:
        if os.path.exists(candidate):
            return candidate
    raise ConfigError(
        f"no Aurae client config found: ${CONFIG_ENV} is not set and none of "
        f"{', '.join(tried)} exists (`aurae-py pki init DIR` writes DIR/config; then "
        f"export {CONFIG_ENV}=DIR/config)"
    )


def _existing_config(path: str, origin: str) -> str:
    if not os.path.exists(path):
        raise ConfigError(f"config file {path}{origin} does not exist")
    return path


def _read_config_file(path: str) -> dict[str, str]:
    """The values the file sets, certificate paths made absolute; missing keys are left out."""
    try:
        with open(path, "rb") as file:
            document = tomllib.load(file)
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"config file {path} is not valid TOML: {error}") from None

    values: dict[str, str] = {}
    directory = os.path.dirname(os.path.abspath(path))
    for section, keys in (("auth", _AUTH_KEYS), ("system", ("socket",))):
        table = document.get(section, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: {section} must be a table, [{section}]")
        for key in keys:
            if key not in table:
                continue
            value = table[key]
            if not isinstance(value, str):
                raise ConfigError(
                    f"{path}: {key} in [{section}] must be a string, not {type(value).__name__}"
                )
            if not value:
                raise ConfigError(f"{path}: {key} in [{section}] is empty")
            if section == "auth":
                value = os.path.join(directory, os.path.expanduser(value))
            values[key] = value
    return values


def _read_pem(config: ClientConfig, key: str, path: str) -> bytes:
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as error:
        raise ConfigError(
            f"cannot read {key} {path} (from {config.source}): {error.strerror}"
        ) from None
    if b"-----BEGIN " not in data:
        raise ConfigError(f"{key} {path} (from {config.source}) is not a PEM file")
    return data
