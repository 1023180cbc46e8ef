"""DNS names: the one pattern both ends check, and the names Aurae gives its parties.

A certificate's DNS SAN and the host of a `host:port` socket target are both
checked against `is_dns_name`; a socket target may end in the root's '.'.
"""

from __future__ import annotations

import re

# The domain of Aurae's development PKI; the daemon is server.<domain> and
# client NAME is NAME.<domain>.
AURAE_DOMAIN = "unsafe.aurae.io"
# Every Aurae client verifies the daemon under this name, whatever the transport.
SERVER_NAME = f"server.{AURAE_DOMAIN}"

_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
LABEL = re.compile(_LABEL)
# RFC 1123 host name: labels of 1-63 letters, digits and '-', 253 bytes in all.
NAME = re.compile(rf"(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*")


def is_dns_label(text: str) -> bool:
    return LABEL.fullmatch(text) is not None


def is_dns_name(text: str, *, absolute_allowed: bool = False) -> bool:
    """Whether `text` is a host name; `absolute_allowed` also takes a trailing '.'."""
    if absolute_allowed and text.endswith("."):
        text = text[:-1]
    return NAME.fullmatch(text) is not None
