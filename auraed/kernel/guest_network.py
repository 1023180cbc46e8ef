"""A guest's network as its pid 1 sets it up: lo, and eth0 at fe80::2/64 facing the host's TAP.

Through iproute2's `ip` (the host's /usr, shared into the guest): a few short execs cost the boot
less than importing a netlink library under TCG. DAD is off on eth0 (the only other address on
the link is the host's), and readiness is waited for — the link up and the address usable in
/proc/net/if_inet6 — never slept for.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

IFA_F_TENTATIVE = 0x40
IFA_F_DADFAILED = 0x08


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise OSError(f"ip {' '.join(args)}: {done.stderr.strip()}")


def configure(interface: str | None, address: str, deadline: float) -> None:
    """Bring lo up and, when `interface` is given, give it `address` and wait until usable."""
    _ip("link", "set", "lo", "up")
    if interface is None:
        return
    if not Path(f"/sys/class/net/{interface}").exists():
        raise OSError(f"no interface {interface}")
    Path(f"/proc/sys/net/ipv6/conf/{interface}/accept_dad").write_text("0\n")
    _ip("address", "add", address, "dev", interface, "nodad")
    _ip("link", "set", interface, "up")
    plain = address.split("/")[0]
    end = time.monotonic() + deadline
    delay = 0.002
    while not (_carrier(interface) and address_ready(interface, plain)):
        if time.monotonic() > end:
            raise OSError(f"{interface} not ready with {address} after {deadline} s")
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def _carrier(interface: str) -> bool:
    try:
        return Path(f"/sys/class/net/{interface}/carrier").read_text().strip() == "1"
    except OSError:  # EINVAL while the link is down
        return False


def address_ready(interface: str, address: str) -> bool:
    """Whether `address` is on `interface` and neither tentative nor failed."""
    import ipaddress

    wanted = ipaddress.IPv6Address(address).exploded.replace(":", "")
    for line in Path("/proc/net/if_inet6").read_text().splitlines():
        fields = line.split()
        if len(fields) == 6 and fields[5] == interface and fields[0] == wanted:
            return not int(fields[4], 16) & (IFA_F_TENTATIVE | IFA_F_DADFAILED)
    return False
