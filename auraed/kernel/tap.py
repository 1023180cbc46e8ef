"""TAP devices for guests, through netlink (pyroute2): named, addressed and removed by the daemon.

Each VM gets a TAP of its own, `avm` + 8 random hex digits (IFNAMSIZ allows 15), so a name is never
reused after a free and two daemons on one host do not collide; a name already taken is skipped.
The host side is `fe80::1/64` without DAD; the guest answers at `fe80::2` on the same link, so
the address of a guest is `[fe80::2%<tap>]:8080`.
"""

from __future__ import annotations

import errno
import logging
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

PREFIX = "avm"
HOST_ADDRESS = "fe80::1"
GUEST_ADDRESS = "fe80::2"
PREFIX_LENGTH = 64
IFA_F_NODAD = 0x02
# await_listener: a TCP connect every PROBE_INTERVAL, each given up after PROBE_TIMEOUT.
PROBE_INTERVAL = 0.05
PROBE_TIMEOUT = 0.2
# What a connect sent before the guest's link and address are up can meet.
PROBE_RETRIED = frozenset({errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EADDRNOTAVAIL,
                           errno.ENETDOWN, errno.EHOSTDOWN})

log = logging.getLogger("auraed.tap")


class TapError(Exception):
    pass


@dataclass(frozen=True)
class Tap:
    name: str
    index: int


def create_tap() -> Tap:
    with IPRoute() as ip:
        for _ in range(16):
            name = PREFIX + secrets.token_hex(4)
            if ip.link_lookup(ifname=name):
                continue
            try:
                ip.link("add", ifname=name, kind="tuntap", mode="tap")
            except NetlinkError as error:
                raise TapError(f"cannot create TAP {name}: {error}") from None
            except OSError as error:
                raise TapError(f"cannot create TAP {name}: {error}") from None
            index = ip.link_lookup(ifname=name)[0]
            try:
                ip.addr("add", index=index, address=HOST_ADDRESS, prefixlen=PREFIX_LENGTH,
                        flags=IFA_F_NODAD)
                ip.link("set", index=index, state="up")
            except NetlinkError as error:
                ip.link("del", index=index)
                raise TapError(f"cannot address TAP {name}: {error}") from None
            return Tap(name, index)
    raise TapError("no free TAP name after 16 tries")


def remove_tap(name: str) -> None:
    """Remove the TAP if it is there (idempotent)."""
    with IPRoute() as ip:
        for index in ip.link_lookup(ifname=name):
            try:
                ip.link("del", index=index)
            except NetlinkError as error:
                if error.code != 19:  # ENODEV: gone already
                    raise TapError(f"cannot remove TAP {name}: {error}") from None


def tap_exists(name: str) -> bool:
    with IPRoute() as ip:
        return bool(ip.link_lookup(ifname=name))


def await_listener(tap: str, address: str, port: int, deadline: float,
                   alive: Callable[[], bool]) -> bool:
    """Until `[address%tap]:port` takes a TCP connection (True), each try a fresh SYN cut short.

    A client that connects once and waits (gRPC does) loses its SYN when it goes out before the
    guest's eth0 has its address (no neighbour answers), and the kernel resends it only after
    1 s, then 3 s: a guest that listened meanwhile is not reached for that long. False at the
    deadline, once `alive()` is false, or on an error no booting guest explains (logged).
    """
    try:
        target = (address, port, 0, socket.if_nametoindex(tap))
    except OSError as error:
        log.warning("tap not probed", extra={"tap": tap, "error": str(error)})
        return False
    while time.monotonic() < deadline and alive():
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as probe:
            probe.settimeout(PROBE_TIMEOUT)
            try:
                probe.connect(target)
                return True
            except (ConnectionRefusedError, TimeoutError):
                pass  # up but not listening yet, or no answer yet
            except OSError as error:
                if error.errno not in PROBE_RETRIED:
                    log.warning("tap probe failed", extra={"tap": tap, "error": str(error)})
                    return False
        time.sleep(PROBE_INTERVAL)
    return False
