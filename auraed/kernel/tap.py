"""TAP devices for guests, through netlink (pyroute2): named, addressed and removed by the daemon.

Each VM gets a TAP of its own, `avm` + 8 random hex digits (IFNAMSIZ allows 15), so a name is never
reused after a free and two daemons on one host do not collide; a name already taken is skipped.
The host side is `fe80::1/64` without DAD; the guest answers at `fe80::2` on the same link, so
the address of a guest is `[fe80::2%<tap>]:8080`.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

PREFIX = "avm"
HOST_ADDRESS = "fe80::1"
GUEST_ADDRESS = "fe80::2"
PREFIX_LENGTH = 64
IFA_F_NODAD = 0x02


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
