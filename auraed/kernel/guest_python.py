"""The guest's Python modules in RAM: a second cpio archive appended to the initramfs.

Why: a guest reads its interpreter's standard library, the virtualenv and the checkout over 9p,
and under TCG every 9p request is a round trip through emulated virtio and QEMU's 9p server. A
guest daemon imports ~480 modules (lookups, opens, reads, closes of each); measured on our loaded
2-core machines that is ~0.13 s a module, ~21 s of a boot. The modules in the initramfs are
read from RAM instead.

What is in it: every package a guest's auraed imports at start (found by importing the guest's
entry points in a child interpreter, `ENTRY_POINTS`), whole: each outermost regular package
(`grpc`, `cryptography`, `google/protobuf`, `auraed`, the standard library's `asyncio`,
`email`...) and each top-level module file. Under `/python` in the guest (`GUEST_PATH`, put
first on sys.path through PYTHONPATH by /init), each `.py` becomes a sourceless `.pyc` (the host's
own cached bytecode when it is current, else compiled here; the code objects keep the host
source paths, so tracebacks show the source over 9p) and every other file (extension modules,
data) a symlink to its host path, read over 9p as before. A package is mirrored whole so that its
`__path__` finds everything it holds; what is not in the layer (extension modules at top level,
packages only imported later) is found further down sys.path, over 9p.

Keyed by the interpreter's bytecode magic and every mirrored file's path, size and mtime: an
edited source makes a new layer. Each layer is cached as the combined archive QEMU is given
(`initramfs.cpio` + the layer; the kernel unpacks concatenated archives in order). Layers unused
for a day are removed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

GUEST_PATH = "/python"
# What a guest runs at start: auraed.pid1 (init), then in its forked child the daemon. The
# floor of bench/vms.py imports a subset of these.
# The status protos are imported at a call's first error (auraed.interceptors.abort): grpc_status
# is in the layer so; google.rpc's two modules sit in a namespace package and stay on 9p (they
# were the only bytecode a guest read over 9p before its first answer; now only at an error).
ENTRY_POINTS = ("auraed.pid1", "auraed.kernel.guest_network", "auraed.__main__", "auraed.server",
                "auraed.wired", "auraed.kernel.spawner.__main__", "google.rpc.error_details_pb2",
                "google.rpc.status_pb2", "grpc_status.rpc_status")
# The child interpreter prints what the entry points loaded: sys.path and each module's file.
_PROBE = """
import importlib, json, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
files = {n: getattr(m, "__file__", None) for n, m in list(sys.modules.items())}
print(json.dumps({"path": sys.path, "files": sorted((n, f) for n, f in files.items() if f)}))
"""
_SKIPPED_DIRECTORIES = {"__pycache__"}

Progress = Callable[[str], None]


class LayerError(Exception):
    """The layer could not be made; the message says why."""


def combined_initramfs(base: Path, python: str = sys.executable,
                       progress: Progress = lambda line: None) -> Path:
    """`base` followed by the Python layer of `python`'s environment, cached beside `base`."""
    roots = mirrored_roots(python)
    entries = _entries(roots)
    key = hashlib.sha256(json.dumps({
        "magic": importlib.util.MAGIC_NUMBER.hex(), "python": python, "base": base.stat().st_size,
        "base_mtime": base.stat().st_mtime_ns, "files": entries,
    }, sort_keys=True).encode()).hexdigest()[:16]
    target = base.with_name(f"initramfs-python-{key}.cpio")
    if target.exists():
        os.utime(target)  # in use: not stale
        return target
    progress(f"writing the guest's Python layer ({len(entries)} files) into {target.name}")
    temporary = target.with_name(f".{target.name}.{os.getpid()}")
    try:
        with temporary.open("wb") as out:
            out.write(base.read_bytes())
        _write_layer(temporary, roots)
        temporary.replace(target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _remove_stale(target)
    return target


def mirrored_roots(python: str) -> list[tuple[Path, str]]:
    """(host path, path inside the layer) of each package and module the guest loads at start."""
    done = subprocess.run([python, "-c", _PROBE, *ENTRY_POINTS], capture_output=True, text=True,
                          check=False, cwd="/")
    if done.returncode != 0:
        last = done.stderr.strip().splitlines()[-1:] or [""]
        raise LayerError(f"{python} cannot import the guest's modules: {last[0]}")
    probe = json.loads(done.stdout)
    # Deepest first, so a file is placed under the sys.path entry that holds it most closely.
    search = sorted({os.path.realpath(p) for p in probe["path"] if p and os.path.isdir(p)},
                    key=len, reverse=True)
    roots: dict[Path, str] = {}
    for module, name in probe["files"]:
        file = Path(os.path.realpath(name))
        base = next((Path(p) for p in search if str(file).startswith(p + "/")), None)
        if base is None:
            # Found by a meta path finder (pip's default editable install maps the checkout's
            # packages so): its base is what the module's dotted name climbs to.
            depth = module.count(".") + (1 if file.stem == "__init__" else 0)
            base = file.parents[depth] if depth < len(file.parents) else None
            if base is not None and base / module.split(".")[0] not in (file, *file.parents,
                                                                          file.with_suffix("")):
                base = None  # an alias (sys.modules["x.y"] set by hand): leave it to 9p
        if base is None or file.parent == base and file.suffix != ".py":
            continue  # not on sys.path (the entry script), or a top-level extension module
        root = file
        while root.parent != base and (root.parent / "__init__.py").exists():
            root = root.parent
        if root.parent != base and root == file:
            continue  # a module file directly in a namespace package: keep it on 9p
        roots.setdefault(root, str(root.relative_to(base)))
    # A package inside another mirrored one (a namespace package in a regular one) is in it.
    return sorted((root, inside) for root, inside in roots.items()
                  if not any(other != root and other in root.parents for other in roots))


def _walk(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    found = []
    for directory, subdirectories, files in os.walk(root):
        subdirectories[:] = sorted(d for d in subdirectories if d not in _SKIPPED_DIRECTORIES)
        found += [Path(directory, f) for f in sorted(files) if not f.endswith(".pyc")]
    return found


def _entries(roots: list[tuple[Path, str]]) -> list[tuple[str, int, int]]:
    entries = []
    for root, _ in roots:
        for path in _walk(root):
            info = path.stat()
            entries.append((str(path), info.st_size, info.st_mtime_ns))
    return entries


def _bytecode(source: Path) -> bytes:
    """A sourceless .pyc of `source`: the interpreter's cached one when current, else compiled."""
    info = source.stat()
    try:
        cached = Path(importlib.util.cache_from_source(str(source))).read_bytes()
    except (OSError, ValueError):
        cached = b""
    if (cached[:4] == importlib.util.MAGIC_NUMBER and cached[4:8] == b"\0\0\0\0"
            and int.from_bytes(cached[8:12], "little") == int(info.st_mtime) & 0xFFFFFFFF
            and int.from_bytes(cached[12:16], "little") == info.st_size & 0xFFFFFFFF):
        return cached
    import marshal

    try:
        code = compile(source.read_bytes(), str(source), "exec", dont_inherit=True)
    except SyntaxError as error:
        raise LayerError(f"{source} does not compile: {error}") from None
    header = importlib.util.MAGIC_NUMBER + b"\0" * 4
    header += (int(info.st_mtime) & 0xFFFFFFFF).to_bytes(4, "little")
    header += (info.st_size & 0xFFFFFFFF).to_bytes(4, "little")
    return header + marshal.dumps(code)


def _write_layer(target: Path, roots: list[tuple[Path, str]]) -> None:
    from auraed.kernel.guest_image import Cpio

    archive = Cpio(target, append=True)
    directory, regular, link = stat.S_IFDIR | 0o755, stat.S_IFREG | 0o644, stat.S_IFLNK | 0o777
    made: set[str] = set()

    def parents(inside: str) -> None:
        parts = Path(inside).parts
        for depth in range(1, len(parts)):
            name = "/".join(parts[:depth])
            if name not in made:
                made.add(name)
                archive.add(f"{GUEST_PATH.lstrip('/')}/{name}", directory)

    archive.add(GUEST_PATH.lstrip("/"), directory)
    for root, inside in roots:
        for path in _walk(root):
            relative = Path(inside) / path.relative_to(root) if path != root else Path(inside)
            parents(str(relative))
            if path.suffix == ".py":
                archive.add(f"{GUEST_PATH.lstrip('/')}/{relative.with_suffix('.pyc')}", regular,
                            _bytecode(path))
            else:
                archive.add(f"{GUEST_PATH.lstrip('/')}/{relative}", link, str(path).encode())
    archive.close()


def _remove_stale(current: Path) -> None:
    from auraed.kernel.guest_image import STALE_AFTER

    now = time.time()
    for other in current.parent.glob("initramfs-python-*.cpio"):
        try:
            if other != current and now - other.stat().st_mtime > STALE_AFTER:
                other.unlink()
        except FileNotFoundError:
            pass
