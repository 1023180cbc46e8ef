"""Aurae's default paths, as upstream Aurae lays a machine out.

The daemon's flags default to these, `aurae-py pki init` writes a client
config pointing at the default socket, and the client looks for its config
in the same places as upstream's.
"""

from __future__ import annotations

# Runtime state (often tmpfs): the socket, captured output.
RUNTIME_DIR = "/var/run/aurae"
# Persistent data: the audit log.
LIBRARY_DIR = "/var/lib/aurae"
# Where the daemon looks for its certificates.
PKI_DIR = "/etc/aurae/pki"

DEFAULT_SOCKET = f"{RUNTIME_DIR}/aurae.sock"

# File names inside a PKI directory.
CA_CRT = "ca.crt"
CA_KEY = "ca.key"
SERVER_CRT = "_signed.server.crt"
SERVER_KEY = "server.key"
CLIENT_CONFIG = "config"

DEFAULT_CA_CRT = f"{PKI_DIR}/{CA_CRT}"
DEFAULT_SERVER_CRT = f"{PKI_DIR}/{SERVER_CRT}"
DEFAULT_SERVER_KEY = f"{PKI_DIR}/{SERVER_KEY}"

# The client config: $AURAE_CONFIG, else the first of these that exists.
CONFIG_ENV = "AURAE_CONFIG"
CONFIG_SEARCH_PATHS = ("~/.aurae/config", "/etc/aurae/config", f"{LIBRARY_DIR}/config")


def client_crt_name(name: str) -> str:
    """The file name of client `name`'s certificate in a PKI directory."""
    return f"_signed.client.{name}.crt"


def client_key_name(name: str) -> str:
    """The file name of client `name`'s private key in a PKI directory."""
    return f"client.{name}.key"
