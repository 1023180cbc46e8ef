"""Client configuration: where auraed listens and which certificates prove who we are.

Aurae clients read a TOML file ([auth] ca_crt, client_crt, client_key; [system] socket) from
$HOME/.aurae/config, /etc/aurae/config or /var/lib/aurae/config. Every connection is mTLS, and the
client always verifies the server as server.unsafe.aurae.io, whatever the transport.

The SDK imports this module at import time, so it stays on cheap stdlib modules; grpc is imported
only when credentials are actually built.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import grpc

TLS_SERVER_NAME = "server.unsafe.aurae.io"

CONFIG_ENV = "AURAE_CONFIG"
SEARCH_PATHS = ("~/.aurae/config", "/etc/aurae/config", "/var/lib/aurae/config")

_AUTH_KEYS = ("ca_crt", "client_crt", "client_key")

# Linux's sockaddr_un holds 108 bytes, one of them the terminating NUL.
_MAX_UNIX_PATH_BYTES = 107
# Characters that stand for themselves in the path of a grpc target URI; grpc percent-decodes the
# rest, and would take '#' or '?' as the start of a fragment or query.
_URI_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_URI_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_BRACKETED_IPV6 = re.compile(r"\[(?P<address>[^\]]*)\](?::(?P<port>[^%]*))?(?:%(?P<zone>.*))?")
_ZONE = re.compile(r"[A-Za-z0-9._-]+")
_HOSTNAME = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?"
)


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


@dataclass(frozen=True)
class Target:
    """A parsed daemon address."""

    kind: Literal["unix", "tcp"]
    # What grpc.secure_channel takes: unix:/abs/path, ipv4:a.b.c.d:port, ipv6:[addr]:port
    # (a zone as %25<zone>) or dns:///host:port.
    grpc_target: str
    # The address as a person would write it: /abs/path, 10.0.0.1:8080, [fe80::1%eth0]:8080.
    display: str

    def __str__(self) -> str:
        return self.display


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
    """Parse a daemon address as Aurae writes it.

    Accepted: a Unix socket path (absolute, relative to the working directory, `~/...`, or with a
    `unix:` / `unix://` prefix); `ip:port`; `[ipv6]:port`; `[fe80::1%eth0]:port` (a link-local
    address with its zone; upstream Aurae's `[fe80::1]:port%zone` too); `host:port`.
    """
    text = socket.strip()
    if not text:
        raise ConfigError("the socket is empty: give a Unix socket path or host:port")
    if text.startswith("unix:"):
        return _unix_target(_strip_unix_scheme(text))
    if text.startswith(("/", "~", ".")):
        return _unix_target(text)
    if text.startswith("["):
        return _ipv6_target(text)
    if _URI_SCHEME.match(text):
        raise ConfigError(
            f"unsupported socket {socket!r}: give a Unix socket path (or unix:/path) or host:port, "
            "not a URL"
        )
    if _is_ip_address(text):
        if ":" in text:
            raise ConfigError(
                f"socket {socket!r}: write an IPv6 address in brackets, with a port: [ADDRESS]:PORT"
            )
        raise ConfigError(f"socket {socket!r} has no port: write it as ADDRESS:PORT")
    if ":" not in text or "/" in text:
        # A bare word, or a relative path that happens to hold a colon.
        return _unix_target(text)
    host, _, port_text = text.rpartition(":")
    port = _parse_port(port_text, socket)
    if ":" in host:
        raise ConfigError(
            f"socket {socket!r}: write an IPv6 address in brackets, with a port: [ADDRESS]:PORT"
        )
    if re.fullmatch(r"[0-9.]+", host):
        try:
            import ipaddress  # only TCP targets need it; Unix sockets start faster

            address = ipaddress.IPv4Address(host)
        except ValueError:
            raise ConfigError(f"socket {socket!r}: {host!r} is not an IPv4 address") from None
        return Target("tcp", f"ipv4:{address}:{port}", f"{address}:{port}")
    if not _HOSTNAME.fullmatch(host):
        raise ConfigError(f"socket {socket!r}: {host!r} is not a host name or IP address")
    return Target("tcp", f"dns:///{host}:{port}", f"{host}:{port}")


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


def _strip_unix_scheme(text: str) -> str:
    rest = text.removeprefix("unix:")
    if rest.startswith("//"):
        # unix://AUTHORITY/path: only an empty authority (unix:///abs/path) names a local socket.
        authority, slash, path = rest[2:].partition("/")
        if authority or not slash:
            raise ConfigError(
                f"socket {text!r}: write unix:/absolute/path or unix:///absolute/path"
            )
        return "/" + path
    return rest


def _unix_target(path: str) -> Target:
    absolute = os.path.abspath(os.path.expanduser(path))
    encoded = os.fsencode(absolute)
    if len(encoded) > _MAX_UNIX_PATH_BYTES:
        raise ConfigError(
            f"Unix socket path {absolute} is {len(encoded)} bytes long; Linux allows "
            f"{_MAX_UNIX_PATH_BYTES}"
        )
    return Target("unix", "unix:" + _percent_encode(encoded, safe=b"/"), absolute)


def _ipv6_target(text: str) -> Target:
    match = _BRACKETED_IPV6.fullmatch(text)
    if match is None:
        raise ConfigError(f"socket {text!r}: write an IPv6 address as [ADDRESS]:PORT")
    if match["port"] is None:
        raise ConfigError(f"socket {text!r} has no port: write it as [ADDRESS]:PORT")
    port = _parse_port(match["port"], text)
    address, percent, zone = match["address"].partition("%")
    if match["zone"] is not None:
        if percent:
            raise ConfigError(f"socket {text!r} gives two zones")
        # Upstream Aurae writes the zone after the port: [fe80::1]:8080%4.
        zone, percent = match["zone"], "%"
    try:
        import ipaddress

        address = ipaddress.IPv6Address(address).compressed
    except ValueError:
        raise ConfigError(f"socket {text!r}: {address!r} is not an IPv6 address") from None
    if not percent:
        return Target("tcp", f"ipv6:[{address}]:{port}", f"[{address}]:{port}")
    if not _ZONE.fullmatch(zone):
        raise ConfigError(
            f"socket {text!r}: the zone after '%' must be an interface name or index, e.g. "
            "[fe80::1%eth0]:8080"
        )
    # grpc percent-decodes the target URI before it parses the address: the '%' that introduces
    # the zone must itself be encoded, or a zone such as "10" would decode to a control byte.
    grpc_zone = _percent_encode(("%" + zone).encode(), safe=b"")
    return Target("tcp", f"ipv6:[{address}{grpc_zone}]:{port}", f"[{address}%{zone}]:{port}")


def _parse_port(text: str, socket: str) -> int:
    if not text:
        raise ConfigError(f"socket {socket!r} has no port after ':'")
    if not text.isascii() or not text.isdigit():
        raise ConfigError(f"socket {socket!r}: port {text!r} is not a number")
    port = int(text)
    if not 1 <= port <= 65535:
        raise ConfigError(f"socket {socket!r}: port {port} is out of range (1-65535)")
    return port


def _is_ip_address(text: str) -> bool:
    try:
        import ipaddress

        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _percent_encode(data: bytes, *, safe: bytes) -> str:
    return "".join(
        chr(byte) if byte in _URI_UNRESERVED or byte in safe else f"%{byte:02X}" for byte in data
    )
