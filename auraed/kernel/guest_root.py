"""A guest root image: an ext4 disk a VM boots from instead of the host's /usr over 9p.

`build()` makes it from Debian packages only: `mmdebstrap --variant=essential` of the host's
release with python3 (which brings the shared libraries any CPython needs) and libstdc++6 (which
grpcio needs), without documentation, manuals or locales, into a directory; then `mkfs.ext4 -d`
turns that directory into `root.ext4`. The image is cached under a directory keyed by a hash of
its inputs (release, packages, exclusions, this builder's format) and rebuilt only when one
changes. Building needs Debian's archive (mmdebstrap fetches the packages); ~25 s and ~150 MB on
an idle machine.

The initramfs (auraed.kernel.guest_image) mounts the image as the guest's `/`: read-only under a
tmpfs overlay when the drive is attached read-only, so one cached image serves every guest. The
project's environment (interpreter, virtualenv, checkout) still comes over 9p at its host path.

Nothing here knows of gRPC; `auraed vm-image --root-image` calls build().
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

# Bumped whenever what build() writes changes.
FORMAT = 1
# iproute2: pid 1 configures eth0 with `ip` (auraed.kernel.guest_network).
PACKAGES = ("python3", "libstdc++6", "iproute2")
# Nothing in the guest reads them; they are a third of an essential system.
EXCLUDED = ("/usr/share/doc/*", "/usr/share/man/*", "/usr/share/locale/*", "/usr/share/info/*")
IMAGE_NAME = "root.ext4"
# Room beyond the files, so that a read-write attachment has space to write.
SPARE_BYTES = 128 << 20
# Directories the initramfs mounts onto before it switches to the image.
MOUNT_POINTS = ("aurae", "proc", "sys", "dev", "run", "tmp")

Progress = Callable[[str], None]


class RootImageError(Exception):
    """The image could not be built; the message says which step failed and why."""


def release() -> str:
    """The host's Debian release (its codename): the guest gets the same libraries."""
    for line in Path("/etc/os-release").read_text().splitlines():
        key, _, value = line.partition("=")
        if key == "VERSION_CODENAME" and value:
            return value.strip('"')
    raise RootImageError("/etc/os-release names no VERSION_CODENAME: not a Debian host?")


def image_path(cache_dir: Path) -> Path:
    """Where the image for the current inputs is (or will be once built)."""
    key = hashlib.sha256(json.dumps({
        "format": FORMAT, "release": release(), "packages": PACKAGES, "excluded": EXCLUDED,
        "mount_points": MOUNT_POINTS,
    }, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir / "roots" / key / IMAGE_NAME


def build(cache_dir: Path, progress: Progress = lambda line: None) -> Path:
    """The cached image for the current inputs, built first if it is missing."""
    target = image_path(cache_dir)
    if target.exists():
        return target
    roots = target.parent.parent
    roots.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.parent.name}.", dir=roots))
    try:
        tree = work / "tree"
        suite = release()
        progress(f"mmdebstrap {suite} ({', '.join(PACKAGES)}) into {tree}")
        _run(["mmdebstrap", "--quiet", "--variant=essential", f"--include={','.join(PACKAGES)}",
              *(f"--dpkgopt=path-exclude={pattern}" for pattern in EXCLUDED),
              suite, str(tree)])
        for name in MOUNT_POINTS:
            (tree / name).mkdir(exist_ok=True)
        size = _tree_bytes(tree) * 5 // 4 + SPARE_BYTES
        progress(f"mkfs.ext4 -d: {size >> 20} MiB image")
        _run(["mkfs.ext4", "-q", "-L", "aurae-root", "-d", str(tree), str(work / IMAGE_NAME),
              f"{size >> 10}k"])
        shutil.rmtree(tree)
        (work / "inputs.json").write_text(json.dumps(
            {"release": suite, "packages": PACKAGES, "excluded": EXCLUDED}, indent=1) + "\n")
        if target.parent.exists():
            shutil.rmtree(target.parent)
        work.rename(target.parent)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    for stale in roots.iterdir():
        # Images of earlier inputs: a running guest keeps its open file, nothing else needs them.
        if stale != target.parent and not stale.name.startswith("."):
            shutil.rmtree(stale, ignore_errors=True)
    progress(f"guest root image ready: {target}")
    return target


def _tree_bytes(tree: Path) -> int:
    return sum(path.lstat().st_size for path in tree.rglob("*"))


def _run(argv: list[str]) -> None:
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              check=False)
    except FileNotFoundError:
        raise RootImageError(f"{argv[0]} is not installed (scripts/install.sh installs it)") from None
    if done.returncode != 0:
        raise RootImageError(f"{' '.join(argv[:3])} ... failed ({done.returncode}): "
                             f"{done.stderr.strip()[-2000:]}")
