"""The CRI's pods on disk, so that a daemon restarted with --live-restore still lists them.

One JSON file per pod sandbox, `<directory>/<sandbox id>.json`, replaced whole on every change:
written to a temporary file in the same directory and renamed over the old one, so a daemon
that crashes or restarts leaves either the old record or the new one, never a torn one.

Not fsynced: the page cache outlives the daemon, and only the machine's own crash can lose a
write — which ends every pod's instance too, and kubelet recreates what no record lists. A
record such a crash left empty does not parse, and is removed. The two fsyncs of a change were
5 ms (measured at load ~7, a test run writing) of each RunPodSandbox, CreateContainer,
StopPodSandbox and RemovePodSandbox.
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
            os.replace(temporary, self._path(sandbox_id))
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    def delete(self, sandbox_id: str) -> None:
        try:
            self._path(sandbox_id).unlink()
        except FileNotFoundError:
            return

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
