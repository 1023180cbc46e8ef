"""Socket targets: where auraed listens, as Aurae writes it and as grpc dials it.

Both ends parse the same text: the daemon to listen (`--socket`), clients to
dial (`[system] socket` in the client config). Only stdlib modules here, so a
client that reads its config starts fast.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Literal

from aurae_sdk.wire.dns import is_dns_name
from aurae_sdk.wire.paths import DEFAULT_SOCKET

# Linux's sockaddr_un holds 108 bytes, one of them the terminating NUL.
_MAX_UNIX_PATH_BYTES = 107
# Characters that stand for themselves in the path of a grpc target URI; grpc percent-decodes the
# rest, and would take '#' or '?' as the start of a fragment or query.
_URI_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_URI_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_BRACKETED_IPV6 = re.compile(r"\[(?P<address>[^\]]*)\](?::(?P<port>[^%]*))?(?:%(?P<zone>.*))?")
_ZONE = re.compile(r"[A-Za-z0-9._-]+")



class TargetError(ValueError):
    """A socket target that cannot be parsed; the message says what is wrong."""


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


def parse_target(socket: str) -> Target:
    """Parse a daemon address as Aurae writes it.

    Accepted: a Unix socket path (absolute, relative to the working directory, `~/...`, or with a
    `unix:` / `unix://` prefix); `ip:port`; `[ipv6]:port`; `[fe80::1%eth0]:port` (a link-local
    address with its zone; upstream Aurae's `[fe80::1]:port%zone` too); `host:port`.
    """
    text = socket.strip()
    if not text:
        raise TargetError("the socket is empty: give a Unix socket path or host:port")
    if text.startswith("unix:"):
        return _unix_target(_strip_unix_scheme(text))
    if text.startswith(("/", "~", ".")):
        return _unix_target(text)
    if text.startswith("["):
        return _ipv6_target(text)
    if _URI_SCHEME.match(text):
        raise TargetError(
            f"unsupported socket {socket!r}: give a Unix socket path (or unix:/path) or host:port, "
            "not a URL"
        )
    if _is_ip_address(text):
        if ":" in text:
            raise TargetError(
                f"socket {socket!r}: write an IPv6 address in brackets, with a port: [ADDRESS]:PORT"
            )
        raise TargetError(f"socket {socket!r} has no port: write it as ADDRESS:PORT")
    if ":" not in text or "/" in text:
        # A bare word, or a relative path that happens to hold a colon.
        return _unix_target(text)
    host, _, port_text = text.rpartition(":")
    port = _parse_port(port_text, socket)
    if ":" in host:
        raise TargetError(
            f"socket {socket!r}: write an IPv6 address in brackets, with a port: [ADDRESS]:PORT"
        )
    if re.fullmatch(r"[0-9.]+", host):
        try:
            import ipaddress  # only TCP targets need it; Unix sockets start faster

            address = ipaddress.IPv4Address(host)
        except ValueError:
            raise TargetError(f"socket {socket!r}: {host!r} is not an IPv4 address") from None
        return Target("tcp", f"ipv4:{address}:{port}", f"{address}:{port}")
    if not is_dns_name(host, absolute_allowed=True):
        raise TargetError(f"socket {socket!r}: {host!r} is not a host name or IP address")
    return Target("tcp", f"dns:///{host}:{port}", f"{host}:{port}")


def _strip_unix_scheme(text: str) -> str:
    rest = text.removeprefix("unix:")
    if rest.startswith("//"):
        # unix://AUTHORITY/path: only an empty authority (unix:///abs/path) names a local socket.
        authority, slash, path = rest[2:].partition("/")
        if authority or not slash:
            raise TargetError(
                f"socket {text!r}: write unix:/absolute/path or unix:///absolute/path"
            )
        return "/" + path
    return rest


def _unix_target(path: str) -> Target:
    absolute = os.path.abspath(os.path.expanduser(path))
    encoded = os.fsencode(absolute)
    if len(encoded) > _MAX_UNIX_PATH_BYTES:
        raise TargetError(
            f"Unix socket path {absolute} is {len(encoded)} bytes long; Linux allows "
            f"{_MAX_UNIX_PATH_BYTES}"
        )
    return Target("unix", "unix:" + _percent_encode(encoded, safe=b"/"), absolute)


def _ipv6_target(text: str) -> Target:
    match = _BRACKETED_IPV6.fullmatch(text)
    if match is None:
        raise TargetError(f"socket {text!r}: write an IPv6 address as [ADDRESS]:PORT")
    if match["port"] is None:
        raise TargetError(f"socket {text!r} has no port: write it as [ADDRESS]:PORT")
    port = _parse_port(match["port"], text)
    address, percent, zone = match["address"].partition("%")
    if match["zone"] is not None:
        if percent:
            raise TargetError(f"socket {text!r} gives two zones")
        # Upstream Aurae writes the zone after the port: [fe80::1]:8080%4.
        zone, percent = match["zone"], "%"
    try:
        import ipaddress

        address = ipaddress.IPv6Address(address).compressed
    except ValueError:
        raise TargetError(f"socket {text!r}: {address!r} is not an IPv6 address") from None
    if not percent:
        return Target("tcp", f"ipv6:[{address}]:{port}", f"[{address}]:{port}")
    if not _ZONE.fullmatch(zone):
        raise TargetError(
            f"socket {text!r}: the zone after '%' must be an interface name or index, e.g. "
            "[fe80::1%eth0]:8080"
        )
    # grpc percent-decodes the target URI before it parses the address: the '%' that introduces
    # the zone must itself be encoded, or a zone such as "10" would decode to a control byte.
    grpc_zone = _percent_encode(("%" + zone).encode(), safe=b"")
    return Target("tcp", f"ipv6:[{address}{grpc_zone}]:{port}", f"[{address}%{zone}]:{port}")


def _parse_port(text: str, socket: str) -> int:
    if not text:
        raise TargetError(f"socket {socket!r} has no port after ':'")
    if not text.isascii() or not text.isdigit():
        raise TargetError(f"socket {socket!r}: port {text!r} is not a number")
    port = int(text)
    if not 1 <= port <= 65535:
        raise TargetError(f"socket {socket!r}: port {port} is out of range (1-65535)")
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


__all__ = ["DEFAULT_SOCKET", "Target", "TargetError", "parse_target"]
