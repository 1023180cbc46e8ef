"""The guest's Python layer (auraed/kernel/guest_python.py): the archive appended to a base
initramfs, unpacked here as the kernel would, and imported from by this interpreter."""

from __future__ import annotations

import importlib.util
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from auraed.kernel import guest_python
from auraed.kernel.guest_image import Cpio


def unpack(archive: bytes, target: Path) -> list[str]:
    """Every newc archive in `archive`, in order, into `target` (what the kernel does)."""
    names, offset = [], 0
    while offset < len(archive):
        if archive[offset:offset + 6] != b"070701":
            offset += 1  # the zero padding between concatenated archives
            continue
        fields = [int(archive[offset + 6 + 8 * i:offset + 14 + 8 * i], 16) for i in range(13)]
        mode, size, name_size = fields[1], fields[6], fields[11]
        name_start = offset + 110
        name = archive[name_start:name_start + name_size - 1].decode()
        data_start = (name_start + name_size + 3) & ~3
        data = archive[data_start:data_start + size]
        offset = (data_start + size + 3) & ~3
        if name == "TRAILER!!!":
            continue
        names.append(name)
        path = target / name
        if stat.S_ISDIR(mode):
            path.mkdir(parents=True, exist_ok=True)
        elif stat.S_ISLNK(mode):
            path.symlink_to(data.decode())
        else:
            path.write_bytes(data)
    return names


@pytest.fixture(scope="module")
def layer(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    work = tmp_path_factory.mktemp("layer")
    base = work / "initramfs.cpio"
    archive = Cpio(base)
    archive.add("init", stat.S_IFREG | 0o755, b"#!/busybox sh\n")
    archive.close()
    combined = guest_python.combined_initramfs(base)
    root = work / "root"
    root.mkdir()
    return root, unpack(combined.read_bytes(), root)


def test_the_base_archive_comes_first_and_the_layer_after_it(layer: tuple[Path, list[str]]) -> None:
    root, names = layer
    assert names[0] == "init"
    assert (root / "init").read_bytes() == b"#!/busybox sh\n"
    assert "python/auraed/pid1.pyc" in names


def test_sources_become_sourceless_bytecode_of_this_interpreter(
        layer: tuple[Path, list[str]]) -> None:
    root, _ = layer
    pyc = root / "python" / "auraed" / "server.pyc"
    assert pyc.read_bytes()[:4] == importlib.util.MAGIC_NUMBER
    assert not (root / "python" / "auraed" / "server.py").exists()


def test_other_files_are_links_to_the_host_files(layer: tuple[Path, list[str]]) -> None:
    root, _ = layer
    import grpc._cython

    (extension,) = Path(grpc._cython.__file__).parent.glob("cygrpc*.so")
    link = root / "python" / "grpc" / "_cython" / extension.name
    assert link.is_symlink() and os.readlink(link) == str(extension.resolve())


def test_a_guest_interpreter_imports_the_daemon_from_the_layer(
        layer: tuple[Path, list[str]]) -> None:
    root, _ = layer
    done = subprocess.run(
        [sys.executable, "-c", ("import auraed.server, grpc, json; print(auraed.server.__file__); "
                                "print(grpc.__file__); print(json.__file__)")],
        env={**os.environ, "PYTHONPATH": str(root / "python")}, cwd="/",
        capture_output=True, text=True, check=True)
    files = done.stdout.split()
    assert files == [str(root / "python" / "auraed" / "server.pyc"),
                     str(root / "python" / "grpc" / "__init__.pyc"),
                     str(root / "python" / "json" / "__init__.pyc")]


def test_a_layer_is_cached_beside_its_base(tmp_path: Path) -> None:
    base = tmp_path / "initramfs.cpio"
    Cpio(base).close()
    first = guest_python.combined_initramfs(base)
    assert first.parent == tmp_path and first.name.startswith("initramfs-python-")
    written = first.stat().st_mtime_ns
    assert guest_python.combined_initramfs(base) == first
    assert first.read_bytes().startswith(base.read_bytes())
    assert first.stat().st_size > base.stat().st_size
    assert written <= first.stat().st_mtime_ns  # touched when used, not rewritten
