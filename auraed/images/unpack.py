"""Unpack an image layer into a directory that overlayfs can use as one lower layer.

OCI whiteouts become overlayfs's own: `.wh.NAME` a 0/0 character device NAME, and
`.wh..wh..opq` the `trusted.overlay.opaque` attribute on its directory — so the stack of
unpacked layers, mounted as overlay lowers, shows the image exactly. The layer's uncompressed
bytes are hashed as they are read and must match the config's diff_id.

Entries are never written through a symlink, nor outside the directory: a layer whose names
climb out ("../x", "/x") or go through a link it made is refused.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import stat
import tarfile
import zlib
from pathlib import Path
from typing import IO

from auraed.errors import FailedPrecondition, InvalidArgument

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
OPAQUE_XATTR = "trusted.overlay.opaque"
_CHUNK = 1024 * 1024


class _Hashing:
    """A read-only stream that hashes what passes through it."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream
        self.sha256 = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        self.sha256.update(data)
        return data

    def drain(self) -> None:
        while self.read(_CHUNK):
            pass


class LayerRefused(Exception):
    """The layer cannot be unpacked safely or does not match its digest."""


def _decompressed(blob: IO[bytes], compression: str) -> IO[bytes]:
    if compression == "gzip":
        return gzip.GzipFile(fileobj=blob, mode="rb")  # type: ignore[return-value]
    if compression == "":
        return blob
    raise FailedPrecondition(f"{compression}-compressed layers are not supported by this "
                             "daemon (Python 3.11 has no zstd); re-push the image with gzip")


def _entry_path(root: Path, name: str) -> Path:
    normalized = os.path.normpath(name.lstrip("/")) if name else ""
    if normalized in ("", ".") or normalized.startswith(".."):
        raise LayerRefused(f"entry {name!r} is outside the layer")
    parts = normalized.split("/")
    here = root
    for part in parts[:-1]:
        here = here / part
        try:
            mode = os.lstat(here).st_mode
        except FileNotFoundError:
            os.mkdir(here)
            os.chmod(here, 0o755)  # not the daemon's umask: the container's users traverse it
            continue
        if stat.S_ISLNK(mode):
            raise LayerRefused(f"entry {name!r} goes through the symlink {part!r}")
        if not stat.S_ISDIR(mode):
            raise LayerRefused(f"entry {name!r} is below a non-directory")
    return root / normalized


def _clear(path: Path) -> None:
    """Make room for an entry: a later entry of the same name replaces an earlier one."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISDIR(mode):
        import shutil

        shutil.rmtree(path)
    else:
        os.unlink(path)


def _extract(tar: tarfile.TarFile, root: Path) -> None:
    directories: list[tuple[Path, tarfile.TarInfo]] = []
    for member in tar:
        path = _entry_path(root, member.name)
        base = path.name
        if base == OPAQUE_MARKER:
            os.setxattr(path.parent, OPAQUE_XATTR, b"y")
            continue
        if base.startswith(WHITEOUT_PREFIX):
            hidden = path.parent / base[len(WHITEOUT_PREFIX):]
            if hidden.name in ("", ".", ".."):
                raise LayerRefused(f"whiteout {member.name!r} names nothing")
            _clear(hidden)
            os.mknod(hidden, stat.S_IFCHR | 0o600, os.makedev(0, 0))
            continue
        if member.isdir():
            if not path.is_dir() or path.is_symlink():
                _clear(path)
                os.mkdir(path, 0o700)
            directories.append((path, member))
            continue
        _clear(path)
        if member.isreg():
            source = tar.extractfile(member)
            assert source is not None
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as out:
                while chunk := source.read(_CHUNK):
                    out.write(chunk)
        elif member.issym():
            os.symlink(member.linkname, path)
        elif member.islnk():
            target = _entry_path(root, member.linkname)
            if not target.is_file() or target.is_symlink():
                raise LayerRefused(f"hard link {member.name!r} to {member.linkname!r}, which "
                                   "is not a file of this layer")
            os.link(target, path, follow_symlinks=False)
            continue  # owner and mode are the target's
        elif member.ischr() or member.isblk():
            kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
            os.mknod(path, kind | 0o600, os.makedev(member.devmajor, member.devminor))
        elif member.isfifo():
            os.mkfifo(path, 0o600)
        else:
            raise LayerRefused(f"entry {member.name!r} has an unsupported type")
        _set_metadata(path, member)
    # Directories last and deepest first: a read-only directory must not stop its own entries.
    for path, member in sorted(directories, key=lambda item: len(item[0].parts), reverse=True):
        _set_metadata(path, member)


def _set_metadata(path: Path, member: tarfile.TarInfo) -> None:
    os.chown(path, member.uid, member.gid, follow_symlinks=False)
    if not member.issym():
        os.chmod(path, member.mode & 0o7777)
    os.utime(path, (member.mtime, member.mtime), follow_symlinks=False)
    for key, value in (member.pax_headers or {}).items():
        if key.startswith("SCHILY.xattr."):
            try:
                os.setxattr(path, key.removeprefix("SCHILY.xattr."),
                            value.encode("utf-8", "surrogateescape"), follow_symlinks=False)
            except OSError:
                pass  # an attribute the filesystem refuses (user.* on some) is not the image


def unpack_layer(blob: IO[bytes], compression: str, diff_id: str, root: Path) -> None:
    """Unpack the layer `blob` into the empty directory `root`; its uncompressed bytes must
    hash to `diff_id`. On failure `root` is left for the caller to remove."""
    hashing = _Hashing(_decompressed(blob, compression))
    try:
        with tarfile.open(fileobj=hashing, mode="r|") as tar:  # type: ignore[call-overload]
            _extract(tar, root)
        hashing.drain()  # the tar's end padding counts in the digest too
    except (tarfile.TarError, EOFError, zlib.error, OSError) as error:
        if isinstance(error, OSError) and error.errno is not None and not isinstance(
                error, gzip.BadGzipFile):
            raise
        raise InvalidArgument(f"layer {diff_id} is not a valid tar stream: {error}") from None
    except LayerRefused as refused:
        raise InvalidArgument(f"layer {diff_id} refused: {refused}") from None
    actual = "sha256:" + hashing.sha256.hexdigest()
    if actual != diff_id:
        raise InvalidArgument(f"layer content does not match its diff_id: expected {diff_id}, "
                              f"got {actual}")
