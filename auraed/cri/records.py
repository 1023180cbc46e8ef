"""The CRI's pods on disk, so that a daemon restarted with --live-restore still lists them.

One JSON file per pod sandbox, `<directory>/<sandbox id>.json`, replaced whole on every change:
written to a temporary file in the same directory, fsynced, renamed over the old one, and the
directory fsynced, so a crash leaves either the old record or the new one, never a torn one.
A record that does not parse is reported and removed, not guessed at.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger("auraed.cri")

SUFFIX = ".json"


class PodRecords:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def open(self) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        for leftover in self.directory.glob(".tmp-*"):
            leftover.unlink(missing_ok=True)  # a write a crash interrupted before its rename

    def save(self, sandbox_id: str, record: dict[str, Any]) -> None:
        data = json.dumps(record, sort_keys=True).encode()
        fd, temporary = tempfile.mkstemp(dir=self.directory, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temporary, self._path(sandbox_id))
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        self._sync_directory()

    def delete(self, sandbox_id: str) -> None:
        try:
            self._path(sandbox_id).unlink()
        except FileNotFoundError:
            return
        self._sync_directory()

    def load(self) -> list[dict[str, Any]]:
        records = []
        for path in sorted(self.directory.glob(f"*{SUFFIX}")):
            try:
                record = json.loads(path.read_bytes())
                if not isinstance(record, dict) or record.get("id") != path.stem:
                    raise ValueError("not a pod record")
            except (OSError, ValueError) as error:
                log.error("removing a pod record that does not parse",
                          extra={"path": str(path), "error": str(error)})
                path.unlink(missing_ok=True)
                continue
            records.append(record)
        return records

    def _path(self, sandbox_id: str) -> Path:
        return self.directory / f"{sandbox_id}{SUFFIX}"

    def _sync_directory(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
