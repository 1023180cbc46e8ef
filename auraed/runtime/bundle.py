"""`auraed spawn -o DIR`: an OCI runtime bundle whose init is a nested auraed.

The bundle is what `runc run` (or any OCI runtime) boots into a working daemon, the way
upstream Aurae's `auraed spawn` prepares one:

- `config.json`: auraed as pid 1, in new pid, mount, network, uts, ipc and cgroup
  namespaces, with the capabilities a node runtime needs and cgroupfs mounted read-write
  (so the nested daemon makes its cells inside the container's cgroup).
- `rootfs/`: a read-only skeleton. The host's /usr (and the usual merged-/usr links), the
  Python interpreter and the project's environment are bind-mounted read-only at their own
  paths, so nothing is copied; /run/aurae is the bundle's `run/` directory, so the daemon's
  socket appears on the host at `DIR/run/aurae.sock`; /tmp and the library dir are tmpfs.
- `rootfs/etc/aurae/pki`: the CA certificate clients already trust and a server identity
  minted for this bundle (a SPIFFE ID `<parent>/<name>`, plus the server name every Aurae
  client verifies). Minting needs the CA's key (`--pki DIR` from `aurae-py pki init`); the key
  itself and the host daemon's own key never go into the bundle.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from aurae_sdk.wire import dns
from aurae_sdk.wire.pki import CertificateAuthority, PkiError, write_credential
from aurae_sdk.wire.spiffe import SpiffeId

_SOURCE_ROOT = Path(__file__).resolve().parents[2]
SOCKET_IN_CONTAINER = "/run/aurae/aurae.sock"
PKI_IN_CONTAINER = "/etc/aurae/pki"
# What a daemon owning cgroups, namespaces, mounts and processes may use: CAP_CHOWN (0) to
# CAP_AUDIT_READ (37), in the kernel's order, less what our own bounding set lacks.
CAPABILITIES = [
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID",
    "CAP_KILL", "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE", "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW",
    "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE", "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE", "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE",
    "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL", "CAP_SETFCAP", "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN", "CAP_SYSLOG", "CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ",
]


def _grantable(names: list[str]) -> list[str]:
    """The capabilities we hold ourselves: runc refuses to grant one we lack."""
    try:
        status = Path("/proc/self/status").read_text()
        bounding = int(next(line.split()[1] for line in status.splitlines()
                            if line.startswith("CapBnd:")), 16)
    except (OSError, StopIteration, ValueError):
        return names
    return [name for bit, name in enumerate(names) if bounding & (1 << bit)]


class BundleError(Exception):
    """The bundle cannot be written; the message says why."""


def _read_only_binds() -> list[str]:
    """Host directories the daemon runs from, outermost only."""
    wanted = {"/usr", sys.base_prefix, sys.prefix, str(_SOURCE_ROOT)}
    ordered = sorted(os.path.realpath(path) for path in wanted)
    kept: list[str] = []
    for path in ordered:
        if not any(path == top or path.startswith(top + "/") for top in kept):
            kept.append(path)
    return kept


def write_bundle(directory: Path, pki_directory: Path, *, name: str = "bundle",
                 parent: str = "spiffe://unsafe.aurae.io/auraed") -> Path:
    """Write the bundle into `directory` (created; must be empty if it exists)."""
    if directory.exists() and any(directory.iterdir()):
        raise BundleError(f"{directory} exists and is not empty")
    if not dns.is_dns_label(name):
        raise BundleError(f"invalid name {name!r}: a DNS label (letters, digits, '-')")
    try:
        authority = CertificateAuthority.load(pki_directory)
        identity = authority.issue_child(SpiffeId.parse(parent), name,
                                         dns_names=[dns.SERVER_NAME])
    except (PkiError, ValueError) as error:
        raise BundleError(f"--pki {pki_directory}: {error}") from None

    rootfs = directory / "rootfs"
    for sub in ("proc", "dev", "sys", "tmp", "run/aurae", "var/lib/aurae", "etc/aurae/pki",
                "usr", "root"):
        (rootfs / sub).mkdir(parents=True, exist_ok=True)
    for link in ("bin", "sbin", "lib", "lib64"):
        target = os.readlink(f"/{link}") if os.path.islink(f"/{link}") else None
        if target is not None:
            (rootfs / link).symlink_to(target)
    (rootfs / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (rootfs / "etc" / "group").write_text("root:x:0:\n")
    (rootfs / "etc" / "hostname").write_text(f"{name}\n")
    pki = rootfs / PKI_IN_CONTAINER.lstrip("/")
    (pki / "ca.crt").write_bytes(authority.certificate_pem())
    write_credential(identity, pki / "server.crt", pki / "server.key")
    (directory / "run").mkdir(mode=0o700)

    binds = _read_only_binds()
    for path in binds:
        (rootfs / path.lstrip("/")).mkdir(parents=True, exist_ok=True)
    config = _config(name, binds, directory / "run")
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return directory


def _config(name: str, binds: list[str], run_directory: Path) -> dict[str, Any]:
    python = str(Path(sys.prefix) / "bin" / "python")
    args = [
        python, "-m", "auraed",
        "--socket", SOCKET_IN_CONTAINER,
        "--ca-crt", f"{PKI_IN_CONTAINER}/ca.crt",
        "--server-crt", f"{PKI_IN_CONTAINER}/server.crt",
        "--server-key", f"{PKI_IN_CONTAINER}/server.key",
        "--runtime-dir", "/run/aurae/runtime",
        "--library-dir", "/var/lib/aurae",
    ]
    mounts: list[dict[str, Any]] = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
         "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
         "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs",
         "options": ["nosuid", "noexec", "nodev", "ro"]},
        # Read-write: the nested daemon makes its cells' cgroups below the container's.
        {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
         "options": ["nosuid", "noexec", "nodev", "relatime", "rw"]},
        {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "nodev", "mode=1777"]},
        {"destination": "/var/lib/aurae", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "nodev", "mode=700"]},
        {"destination": "/run/aurae", "type": "bind", "source": str(run_directory.resolve()),
         "options": ["rbind", "rw"]},
    ]
    mounts += [{"destination": path, "type": "bind", "source": path,
                "options": ["rbind", "ro", "nosuid", "nodev"]} for path in binds]
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": ["PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
                    "PYTHONDONTWRITEBYTECODE=1", "HOME=/root"],
            "cwd": "/",
            "capabilities": {kind: _grantable(CAPABILITIES) for kind in
                             ("bounding", "effective", "permitted", "inheritable")},
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs", "readonly": True},
        "hostname": name,
        "mounts": mounts,
        "linux": {
            "namespaces": [{"type": kind} for kind in
                           ("pid", "network", "ipc", "uts", "mount", "cgroup")],
            "resources": {"devices": [{"allow": False, "access": "rwm"}]},
            "maskedPaths": ["/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                            "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug",
                            "/proc/scsi", "/sys/firmware"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sysrq-trigger"],
        },
    }
