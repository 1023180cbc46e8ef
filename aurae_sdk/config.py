"""Client configuration: where auraed listens and which certificates prove who we are.

Aurae clients read a TOML file ([auth] ca_crt, client_crt, client_key; [system] socket) from
$HOME/.aurae/config, /etc/aurae/config or /var/lib/aurae/config. Every connection is mTLS, and the
client always verifies the server as server.unsafe.aurae.io, whatever the transport.

One file can name several nodes: contexts. The top-level [auth] and [system] are the context
"default" (so an upstream Aurae file is a one-context file); `[contexts.NAME.auth]` and
`[contexts.NAME.system]` add more, each key falling back to the top-level one (a fleet that shares
one PKI gives only sockets). Which context is used: the `context` argument (--context), else
$AURAE_CONTEXT, else the file's top-level `current_context`, else "default".

    current_context = "edge-1"
    [auth]
    ca_crt = "pki/ca.crt"
    client_crt = "pki/admin.crt"
    client_key = "pki/admin.key"
    [contexts.edge-1.system]
    socket = "10.0.0.1:8080"

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
CONTEXT_ENV = "AURAE_CONTEXT"
DEFAULT_CONTEXT = "default"

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
    # The context of the file these values are ("default": the top-level [auth] and [system]).
    context: str = DEFAULT_CONTEXT

    @property
    def target(self) -> Target:
        """The socket, parsed."""
        return parse_target(self.socket)


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    context: str | None = None,
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
    `context` picks a context of the file (see the module's docstring).
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

    chosen = DEFAULT_CONTEXT
    if path is None and context is None and len(overrides) == len(_AUTH_KEYS) + 1:
        values, source = overrides, "arguments"
    else:
        source = _find_config_file(path)
        document = _read_document(source)
        chosen = _chosen_context(document, source, context)
        values = _context_values(document, source, chosen) | overrides
        where = "" if chosen == DEFAULT_CONTEXT else f" of context {chosen!r}"
        for section, key in [("auth", key) for key in _AUTH_KEYS] + [("system", "socket")]:
            if key not in values:
                raise ConfigError(f"{source}: missing {key} in [{section}]{where}")
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
        context=chosen,
    )


@dataclass(frozen=True)
class Contexts:
    """The contexts of one config file, in file order, and the one in use."""

    source: str
    names: tuple[str, ...]
    # "" when none is chosen, or the chosen one does not exist.
    current: str


def read_contexts(path: str | os.PathLike[str] | None = None) -> Contexts:
    """The contexts the config file (found as load_config finds it) defines."""
    source = _find_config_file(path)
    document = _read_document(source)
    names = _context_names(document, source)
    try:
        current = _chosen_context(document, source, None)
    except ConfigError:
        current = ""
    return Contexts(source, names, current)


def load_contexts(path: str | os.PathLike[str] | None = None,
                  names: list[str] | None = None) -> list[ClientConfig]:
    """The configs of the given contexts (None: every context of the file), in that order."""
    found = read_contexts(path)
    chosen = list(found.names) if names is None else names
    return [load_config(found.source, context=name) for name in chosen]


def use_context(name: str, path: str | os.PathLike[str] | None = None) -> str:
    """Make `name` the file's current context (its top-level `current_context`); returns the file.

    The file is edited in place, line by line, so comments and layout stay as they were.
    """
    source = _find_config_file(path)
    document = _read_document(source)
    if name not in _context_names(document, source):
        known = ", ".join(_context_names(document, source))
        raise ConfigError(f"{source}: no context {name!r} (known: {known})")
    with open(source, encoding="utf-8") as file:
        lines = file.read().splitlines(keepends=True)
    line = f"current_context = {_toml_string(name)}\n"
    for index, text in enumerate(lines):
        stripped = text.strip()
        if stripped.startswith("["):
            lines.insert(0, line)  # keys before the first table are top-level
            break
        if stripped.partition("=")[0].strip() == "current_context":
            lines[index] = line
            break
    else:
        lines.insert(0, line)
    temporary = f"{source}.tmp"
    with open(temporary, "w", encoding="utf-8") as file:
        file.writelines(lines)
    os.chmod(temporary, os.stat(source).st_mode & 0o7777)
    os.replace(temporary, source)
    return source


def _toml_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _context_names(document: dict[str, object], path: str) -> tuple[str, ...]:
    names = []
    # A file of contexts only has no "default"; any other file is (or fails as) one.
    if "auth" in document or "system" in document or "contexts" not in document:
        names.append(DEFAULT_CONTEXT)
    contexts = document.get("contexts", {})
    if not isinstance(contexts, dict):
        raise ConfigError(f"{path}: contexts must be tables, [contexts.NAME.system]")
    names.extend(name for name in contexts if name != DEFAULT_CONTEXT)
    return tuple(names)


def _chosen_context(document: dict[str, object], path: str, context: str | None) -> str:
    if context is None:
        context = os.environ.get(CONTEXT_ENV) or None
    if context is None:
        current = document.get("current_context", DEFAULT_CONTEXT)
        if not isinstance(current, str) or not current:
            raise ConfigError(f"{path}: current_context must be a context's name")
        context = current
    names = _context_names(document, path)
    if context not in names:
        known = ", ".join(names) or "none"
        raise ConfigError(f"{path}: no context {context!r} (known: {known})")
    return context


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


def _read_document(path: str) -> dict[str, object]:
    try:
        with open(path, "rb") as file:
            return tomllib.load(file)
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"config file {path} is not valid TOML: {error}") from None


def _context_values(document: dict[str, object], path: str, context: str) -> dict[str, str]:
    """The values of `context`: its own keys over the top-level ones."""
    values = _section_values(document, path, "")
    if context != DEFAULT_CONTEXT:
        contexts = document.get("contexts")
        table = contexts.get(context) if isinstance(contexts, dict) else None
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: contexts.{context} must be a table")
        values |= _section_values(table, path, f"contexts.{context}.")
    return values


def _section_values(document: dict[str, object], path: str, prefix: str) -> dict[str, str]:
    """The values [auth] and [system] of `document` set, certificate paths made absolute;
    missing keys are left out."""
    values: dict[str, str] = {}
    directory = os.path.dirname(os.path.abspath(path))
    for name, keys in (("auth", _AUTH_KEYS), ("system", ("socket",))):
        section = prefix + name
        table = document.get(name, {})
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
            if name == "auth":
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
