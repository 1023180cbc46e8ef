"""The guest artefacts a virtual machine boots: an uncompressed kernel and an initramfs.

Both are built from Debian packages only, and cached under a directory keyed by a hash of every
input (kernel package and version, busybox version, the init script, the module list, this
builder's format), so they are rebuilt only when one changes:

- `vmlinux`: Debian's linux-image package is fetched with `apt-get download` and unpacked with
  `dpkg-deb -x`; the uncompressed kernel is the xz stream inside its bzImage. QEMU boots it through
  the PVH entry and skips the decompression that dominates a bzImage boot under TCG.
- `initramfs.cpio`: a newc archive holding busybox-static, the modules the guest needs (with their
  dependencies, from each module's .modinfo: the package ships no modules.dep, depmod runs in its
  postinst) and `/init`. The init script loads the modules, mounts the per-VM share (tag `aurae`,
  written by the host daemon: certificates and `boot.env`), the host's /usr and the project's
  environment read-only over 9p, and execs `python -m auraed.pid1`. build() hands QEMU this
  archive followed by the Python layer of guest_python.py (the guest's modules, read from RAM).

Nothing here knows of gRPC; the daemon and `auraed vm-image` call build().
"""

from __future__ import annotations

import hashlib
import json
import lzma
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

# Bumped whenever the layout of what build() writes changes.
FORMAT = 4
KERNEL_META_PACKAGE = "linux-image-amd64"
BUSYBOX = Path("/bin/busybox")
# What the guest needs as modules on Debian's kernel: the virtio-mmio transport of microvm, disks,
# the network, 9p shares, ext4 drives (with crc32c, a soft dependency .modinfo names only by its
# alias), and the ACPI power button read through evdev.
MODULES = ("virtio_mmio", "virtio_blk", "virtio_net", "9pnet_virtio", "9p", "crc32c_generic",
           "ext4", "button", "evdev")
# In the initramfs but loaded only by a guest that boots a read-only root drive (its overlay).
ROOT_DRIVE_MODULES = ("overlay",)
XZ_MAGIC = b"\xfd7zXZ\x00"
# Mount tags of the 9p shares; boot.env (on the `aurae` share) names the project's ones.
VM_SHARE_TAG = "aurae"
USR_SHARE_TAG = "hostusr"
STALE_AFTER = 24 * 3600.0

Progress = Callable[[str], None]


class ImageError(Exception):
    """The artefacts could not be built; the message says which step failed and why."""


@dataclass(frozen=True)
class GuestImage:
    """Where a built kernel and initramfs are."""

    directory: Path
    kernel: Path
    initramfs: Path
    kernel_version: str


# The guest's /init. Busybox lives at /busybox (not /bin: /bin becomes a link into the shared
# /usr); every applet is called through it. boot.env sets AURAE_SHARES ("tag:path ..."),
# AURAE_PYTHON and AURAE_PID1_CONFIG, and AURAE_ROOT (a disk, e.g. /dev/vda) with AURAE_ROOT_RO
# for a guest booting a root drive: mounted at /newroot (read-only under a tmpfs overlay), it
# replaces the host's /usr, and switch_root makes it / before pid 1 starts.
INIT_SCRIPT = """#!/busybox sh
B=/busybox
$B mkdir -p /proc /sys /dev /usr /tmp /run /aurae
$B mount -t proc proc /proc
$B mount -t devtmpfs devtmpfs /dev
for module in $($B cat /modules/load-order); do
    $B insmod /modules/$module || echo "init: insmod $module failed"
done
if ! $B mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144,ro aurae /aurae; then
    echo "init: cannot mount the aurae share"; $B poweroff -f
fi
. /aurae/boot.env
root=
if [ -n "$AURAE_ROOT" ]; then
    root=/newroot
    $B mkdir -p /lower /upper $root
    tries=0
    while [ ! -b "$AURAE_ROOT" ] && [ $tries -lt 500 ]; do $B usleep 20000; tries=$((tries + 1)); done
    if [ "$AURAE_ROOT_RO" = 1 ]; then
        $B insmod /modules/overlay.ko
        $B mount -t ext4 -o ro "$AURAE_ROOT" /lower &&
            $B mount -t tmpfs -o mode=0755 upper /upper && $B mkdir /upper/data /upper/work &&
            $B mount -t overlay -o lowerdir=/lower,upperdir=/upper/data,workdir=/upper/work root $root ||
            { echo "init: cannot mount the root drive $AURAE_ROOT"; $B poweroff -f; }
    else
        $B mount -t ext4 "$AURAE_ROOT" $root || { echo "init: cannot mount the root drive $AURAE_ROOT"; $B poweroff -f; }
    fi
else
    $B mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144,ro,cache=loose hostusr /usr || $B poweroff -f
fi
for share in $AURAE_SHARES; do
    tag=${share%%:*}; path=${share#*:}
    $B mkdir -p "$root$path"
    $B mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144,ro,cache=loose "$tag" "$root$path" ||
        echo "init: cannot mount $tag at $path"
done
$B umount /proc
# The Python layer (auraed/kernel/guest_python.py): the guest's modules from RAM, not 9p.
[ -d /python ] && export PYTHONPATH=/python
if [ -n "$root" ]; then
    $B mkdir -p $root/aurae $root/dev
    $B mount --move /aurae $root/aurae && $B mount --move /dev $root/dev
    # switch_root empties the initramfs, the layer with it: copy it into a tmpfs of the new
    # root first (RAM to RAM; its symlinks name host paths, mounted there as here).
    if [ -d /python ]; then
        $B mkdir -p $root/python && $B mount -t tmpfs -o mode=0755 python $root/python &&
            $B cp -a /python/. $root/python/ ||
            { echo "init: cannot copy the Python layer; the guest's modules come over 9p"; unset PYTHONPATH; }
    fi
    exec $B switch_root $root "$AURAE_PYTHON" -m auraed.pid1 "$AURAE_PID1_CONFIG"
fi
exec "$AURAE_PYTHON" -m auraed.pid1 "$AURAE_PID1_CONFIG"
echo "init: cannot exec $AURAE_PYTHON"; $B poweroff -f
"""


def default_cache_dir() -> Path:
    return Path("/var/lib/aurae/vm-images")


def build(cache_dir: Path, progress: Progress = lambda line: None) -> GuestImage:
    """The cached artefacts for the current inputs, built first if they are missing; the
    initramfs QEMU is given carries this interpreter's Python layer (guest_python.py)."""
    from auraed.kernel.guest_python import LayerError, combined_initramfs

    image = _build_base(cache_dir, progress)
    try:
        initramfs = combined_initramfs(image.initramfs, progress=progress)
    except LayerError as error:
        raise ImageError(f"the guest's Python layer: {error}") from None
    return replace(image, initramfs=initramfs)


def _build_base(cache_dir: Path, progress: Progress) -> GuestImage:
    package, version = _kernel_package()
    busybox_version = _package_version("busybox-static")
    key = hashlib.sha256(json.dumps({
        "format": FORMAT, "kernel": [package, version], "busybox": busybox_version,
        "init": INIT_SCRIPT, "modules": MODULES, "root_drive_modules": ROOT_DRIVE_MODULES,
    }, sort_keys=True).encode()).hexdigest()[:16]
    directory = cache_dir / key
    image = GuestImage(directory, directory / "vmlinux", directory / "initramfs.cpio",
                       package.removeprefix("linux-image-"))
    if (directory / "complete").exists():
        (directory / "complete").touch()  # in use: not stale for another builder
        return image
    progress(f"building guest artefacts in {directory} ({package} {version})")
    cache_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=cache_dir))
    try:
        progress(f"apt-get download {package}")
        _run(["apt-get", "download", "-q", f"{package}={version}"], cwd=work)
        deb = next(work.glob("*.deb"))
        progress(f"dpkg-deb -x {deb.name}")
        unpacked = work / "unpacked"
        _run(["dpkg-deb", "-x", str(deb), str(unpacked)])
        deb.unlink()
        release = package.removeprefix("linux-image-")
        progress("extracting the uncompressed kernel from the bzImage")
        _write_vmlinux(unpacked / "boot" / f"vmlinuz-{release}", work / "vmlinux")
        progress("writing the initramfs")
        module_dir = unpacked / "lib" / "modules" / release
        modules = resolve_modules(module_dir, MODULES)
        loaded = {m.name for m in modules}
        on_demand = [m for m in resolve_modules(module_dir, ROOT_DRIVE_MODULES)
                     if m.name not in loaded]
        _write_initramfs(work / "initramfs.cpio", modules, on_demand)
        shutil.rmtree(unpacked)
        (work / "inputs.json").write_text(json.dumps(
            {"kernel": package, "version": version, "busybox": busybox_version,
             "modules": [m.name for m in modules]}, indent=1) + "\n")
        (work / "complete").touch()
        if directory.exists():
            shutil.rmtree(directory)
        work.rename(directory)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    for stale in cache_dir.iterdir():
        # Artefacts of other inputs, unused for a day: a running guest keeps its open files, and
        # builders of other checkouts (other inputs) sharing the cache keep theirs meanwhile.
        marker = stale / "complete"
        if stale != directory and marker.exists() and time.time() - marker.stat().st_mtime > STALE_AFTER:
            shutil.rmtree(stale, ignore_errors=True)
    progress(f"guest artefacts ready: {directory}")
    return image


def _run(argv: list[str], cwd: Path | None = None) -> str:
    try:
        done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise ImageError(f"{argv[0]} is not installed (scripts/install.sh installs it)") from None
    if done.returncode != 0:
        raise ImageError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def _kernel_package() -> tuple[str, str]:
    """The versioned kernel package linux-image-amd64 points at, and its candidate version."""
    depends = _run(["apt-cache", "depends", KERNEL_META_PACKAGE])
    for line in depends.splitlines():
        name = line.strip().removeprefix("Depends:").strip()
        if name.startswith("linux-image-") and name != KERNEL_META_PACKAGE:
            return name, _candidate_version(name)
    raise ImageError(f"apt-cache knows no kernel behind {KERNEL_META_PACKAGE}: run apt-get update")


def _candidate_version(package: str) -> str:
    for line in _run(["apt-cache", "policy", package]).splitlines():
        if line.strip().startswith("Candidate:"):
            return line.split(":", 1)[1].strip()
    raise ImageError(f"apt-cache has no candidate version of {package}")


def _package_version(package: str) -> str:
    return _run(["dpkg-query", "-W", "-f=${Version}", package]).strip()


def _write_vmlinux(bzimage: Path, target: Path) -> None:
    data = bzimage.read_bytes()
    start = data.find(XZ_MAGIC)
    if start < 0:
        raise ImageError(f"{bzimage}: no xz stream in the bzImage")
    decompressor = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
    try:
        kernel = decompressor.decompress(data[start:])
    except lzma.LZMAError as error:
        raise ImageError(f"{bzimage}: the xz stream does not decompress: {error}") from None
    if not kernel.startswith(b"\x7fELF"):
        raise ImageError(f"{bzimage}: the decompressed kernel is not an ELF file")
    target.write_bytes(kernel)


@dataclass(frozen=True)
class Module:
    name: str
    path: Path
    depends: tuple[str, ...]


def module_info(path: Path) -> dict[str, str]:
    """The key=value strings of a module's .modinfo ELF section (64-bit little-endian)."""
    data = path.read_bytes()
    if path.suffix == ".xz":
        data = lzma.decompress(data)
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise ImageError(f"{path}: not a 64-bit ELF module")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names_offset = sections[shstrndx][4]
    info: dict[str, str] = {}
    for name_index, _, _, _, offset, size in sections:
        end = data.index(b"\0", names_offset + name_index)
        if data[names_offset + name_index:end] == b".modinfo":
            for entry in data[offset:offset + size].split(b"\0"):
                key, equals, value = entry.decode(errors="replace").partition("=")
                if equals:
                    info.setdefault(key, value)
    return info


def resolve_modules(module_dir: Path, wanted: Iterable[str]) -> list[Module]:
    """The wanted modules and their dependencies, each after what it depends on."""
    by_name: dict[str, Path] = {}
    for path in (module_dir / "kernel").rglob("*.ko*"):
        by_name[path.name.split(".ko")[0].replace("-", "_")] = path
    builtin = {Path(line).name.split(".ko")[0].replace("-", "_")
               for line in (module_dir / "modules.builtin").read_text().split()}
    ordered: list[Module] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        name = name.replace("-", "_")
        if name in seen or name in builtin:
            return
        seen.add(name)
        path = by_name.get(name)
        if path is None:
            raise ImageError(f"module {name} is neither built in nor in {module_dir}")
        depends = tuple(d for d in module_info(path).get("depends", "").split(",") if d)
        for dependency in depends:
            visit(dependency)
        ordered.append(Module(name, path, depends))

    for name in wanted:
        visit(name)
    return ordered


class Cpio:
    """A cpio archive in the "newc" format the kernel unpacks into its initial rootfs; `append`
    writes it after what the file holds (the kernel unpacks concatenated archives in order)."""

    def __init__(self, path: Path, append: bool = False) -> None:
        self._file = path.open("ab" if append else "wb")
        self._inode = 1

    def add(self, name: str, mode: int, data: bytes = b"") -> None:
        encoded = name.encode() + b"\0"
        fields = (self._inode, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0)
        header = b"070701" + b"".join(b"%08X" % value for value in fields)
        self._inode += 1
        self._file.write(header + encoded)
        self._pad()
        self._file.write(data)
        self._pad()

    def _pad(self) -> None:
        self._file.write(b"\0" * (-self._file.tell() % 4))

    def close(self) -> None:
        self.add("TRAILER!!!", 0)
        self._file.close()


def _write_initramfs(target: Path, modules: list[Module], on_demand: list[Module]) -> None:
    if not BUSYBOX.exists():
        raise ImageError(f"{BUSYBOX} is missing: install busybox-static (scripts/install.sh)")
    archive = Cpio(target)
    directory, regular, link = stat.S_IFDIR | 0o755, stat.S_IFREG, stat.S_IFLNK | 0o777
    for name in ("dev", "proc", "sys", "usr", "tmp", "run", "etc", "var", "aurae", "modules",
                 "root", "mnt"):
        archive.add(name, directory)
    # Python and everything it loads live in the host's /usr, shared over 9p: the usual
    # merged-/usr links make /lib64/ld-linux-x86-64.so.2 and /bin/sh resolve there.
    for name in ("bin", "sbin", "lib", "lib64"):
        archive.add(name, link, f"usr/{name}".encode())
    archive.add("dev/console", stat.S_IFCHR | 0o600)  # replaced by devtmpfs; the kernel wants one early
    archive.add("busybox", regular | 0o755, BUSYBOX.read_bytes())
    archive.add("init", regular | 0o755, INIT_SCRIPT.encode())
    archive.add("etc/passwd", regular | 0o644, b"root:x:0:0:root:/root:/bin/sh\n")
    archive.add("etc/group", regular | 0o644, b"root:x:0:\n")
    archive.add("etc/hostname", regular | 0o644, b"aurae-guest\n")
    archive.add("etc/hosts", regular | 0o644, b"127.0.0.1 localhost\n::1 localhost\n")
    order = []
    for module in [*modules, *on_demand]:
        data = module.path.read_bytes()
        if module.path.suffix == ".xz":
            data = lzma.decompress(data)
        archive.add(f"modules/{module.name}.ko", regular | 0o644, data)
        if module in modules:
            order.append(f"{module.name}.ko")
    archive.add("modules/load-order", regular | 0o644, ("\n".join(order) + "\n").encode())
    archive.close()


def main(argv: list[str]) -> int:
    """`auraed vm-image [--cache-dir DIR] [--root-image]`: build (or find) the artefacts and
    print where."""
    import argparse

    from auraed.kernel import guest_root

    parser = argparse.ArgumentParser(prog="auraed vm-image",
                                     description="Build the guest kernel and initramfs from "
                                                 "Debian packages, cached.")
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    parser.add_argument("--root-image", action="store_true",
                        help="also build an ext4 root image (mmdebstrap: python3, libstdc++6, iproute2) "
                             "to boot with root_drive")
    args = parser.parse_args(argv)
    progress = lambda line: print(f"  {line}", file=sys.stderr)
    try:
        image = build(args.cache_dir, progress=progress)
        root = guest_root.build(args.cache_dir, progress=progress) if args.root_image else None
    except (ImageError, guest_root.RootImageError) as error:
        print(f"auraed vm-image: {error}", file=sys.stderr)
        return 1
    print(f"kernel {image.kernel}\ninitramfs {image.initramfs}")
    if root is not None:
        print(f"root {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
