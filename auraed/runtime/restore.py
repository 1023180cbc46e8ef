"""What the spawner keeps for a daemon that adopts it: the records of cells and the labels of
executables and holders, and reading them back.

A cell's record is kept (Spawner.keep) once it is allocated and forgotten once it is freed; an
executable's label and a holder's travel with their spawn request, so no process ever exists
that the spawner could not name. Reading back trusts nothing: a record or label that does not
parse is reported, and what it named is cleaned up rather than adopted.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from auraed.kernel.cgroups import CgroupLimits
from auraed.runtime.names import CellName

CELL_RECORD_PREFIX = "cell "


class BadRecord(Exception):
    """A record or label that is not what this daemon writes."""


@dataclass(frozen=True)
class CellRecord:
    name: CellName
    limits: CgroupLimits
    isolate_process: bool
    isolate_network: bool


@dataclass(frozen=True)
class ExecutableLabel:
    cell: CellName | None
    name: str
    command: str
    description: str
    uid: int
    gid: int
    log_dir: Path
    started_at: float
    # Host level: the executable's own cgroup (None in a cell, and in labels of older daemons).
    scope: str | None = None


def cell_key(name: CellName) -> str:
    return CELL_RECORD_PREFIX + name.path


def cell_record(record: CellRecord) -> dict[str, object]:
    return {"name": record.name.path, "limits": asdict(record.limits),
            "isolate_process": record.isolate_process,
            "isolate_network": record.isolate_network}


def holder_label(cell: CellName) -> dict[str, object]:
    return {"holder_of": cell.path}


def executable_label(label: ExecutableLabel) -> dict[str, object]:
    # Not the command: the spawner keeps the argv (`/bin/sh -c COMMAND`) anyway, and a
    # command can take most of a request on its own.
    return {"cell": label.cell.path if label.cell else None, "name": label.name,
            "description": label.description, "uid": label.uid,
            "gid": label.gid, "log_dir": str(label.log_dir), "started_at": label.started_at,
            "scope": label.scope}


def read_cell_record(value: dict[str, object]) -> CellRecord:
    try:
        limits = value["limits"]
        assert isinstance(limits, dict)
        return CellRecord(
            name=_cell_name(value["name"]),
            limits=CgroupLimits(**limits),
            isolate_process=bool(value["isolate_process"]),
            isolate_network=bool(value["isolate_network"]),
        )
    except (KeyError, TypeError, AssertionError, ValueError) as error:
        raise BadRecord(f"cell record {value!r}: {error!r}") from None


def read_holder_label(label: dict[str, object] | None) -> CellName:
    if label is None or "holder_of" not in label:
        raise BadRecord(f"not a holder's label: {label!r}")
    return _cell_name(label["holder_of"])


def read_executable_label(label: dict[str, object] | None, argv: list[str]) -> ExecutableLabel:
    """`argv`: the process's, as the spawner kept it."""
    try:
        assert label is not None
        assert len(argv) == 3 and argv[:2] == ["/bin/sh", "-c"], f"argv {argv!r}"
        cell = label["cell"]
        return ExecutableLabel(
            cell=None if cell is None else _cell_name(cell),
            name=str(label["name"]),
            command=argv[2],
            description=str(label["description"]),
            uid=int(label["uid"]),  # type: ignore[call-overload]
            gid=int(label["gid"]),  # type: ignore[call-overload]
            log_dir=Path(str(label["log_dir"])),
            started_at=float(label["started_at"]),  # type: ignore[arg-type]
            scope=None if label.get("scope") is None else str(label["scope"]),
        )
    except (KeyError, TypeError, AssertionError, ValueError) as error:
        raise BadRecord(f"executable label {label!r}: {error!r}") from None


def _cell_name(value: object) -> CellName:
    if not isinstance(value, str):
        raise BadRecord(f"cell name {value!r}")
    try:
        return CellName.parse(value)
    except Exception as error:  # noqa: BLE001 - whatever the grammar raises, the record is bad
        raise BadRecord(f"cell name {value!r}: {error}") from None
