"""What the spawner keeps for a daemon that adopts it: the records of cells and of restart
policies, the labels of executables and holders, and reading them back.

A cell's record is kept (Spawner.keep) once it is allocated and forgotten once it is freed; an
executable's label and a holder's travel with their spawn request, so no process ever exists
that the spawner could not name. An executable with a restart policy has a record of the
policy's state too, kept again whenever it changes (a start, a planned restart, the start limit
hit, Stop) and forgotten with the executable: it outlives each of the processes the policy
starts. The spawner holds records in memory and writes them, with everything else it keeps,
to its state file atomically (write, fsync, rename) with a checksum when a daemon adopts it, so
a torn state is refused whole (auraed.kernel.spawner.state). Reading back trusts nothing: a record or label that does not
parse is reported, and what it named is cleaned up rather than adopted.
"""

from __future__ import annotations

import collections
from dataclasses import asdict, dataclass
from pathlib import Path

from auraed.kernel.cgroups import CgroupLimits
from auraed.runtime.executables import ExecutableKey
from auraed.runtime.names import CellName
from auraed.runtime.restarts import RestartMode, RestartPolicy, RestartState

CELL_RECORD_PREFIX = "cell "
RESTART_RECORD_PREFIX = "restart "


class BadRecord(Exception):
    """A record or label that is not what this daemon writes."""


@dataclass(frozen=True)
class CellRecord:
    name: CellName
    limits: CgroupLimits
    isolate_process: bool
    isolate_network: bool
    isolate_pid: bool = False  # absent from the records of older daemons
    # The daemon's own workload the cell belongs to ("vm <id>"), so that it stays out of
    # clients' reach across a restart; None for clients' cells (and in older records).
    owner: str | None = None
    # What the cell was allocated or last updated with, so a manifest's ownership (labels) and
    # an isolated cell's hostname are the same after a restart. Absent from older records.
    labels: tuple[tuple[str, str], ...] = ()
    hostname: str | None = None


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
    # A container's: its directory (auraed.runtime.containers) and the id of its image.
    container: tuple[Path, str] | None = None
    # The labels it was started with (none in labels of older daemons).
    labels: tuple[tuple[str, str], ...] = ()


def cell_key(name: CellName) -> str:
    return CELL_RECORD_PREFIX + name.path


def cell_record(record: CellRecord) -> dict[str, object]:
    return {"name": record.name.path, "limits": asdict(record.limits),
            "isolate_process": record.isolate_process,
            "isolate_network": record.isolate_network, "isolate_pid": record.isolate_pid,
            "owner": record.owner, "labels": dict(record.labels), "hostname": record.hostname}


def holder_label(cell: CellName) -> dict[str, object]:
    return {"holder_of": cell.path}


def executable_label(label: ExecutableLabel) -> dict[str, object]:
    # Not the command: the spawner keeps the argv (`/bin/sh -c COMMAND`) anyway, and a
    # command can take most of a request on its own. A container's argv is the image's: its
    # command (what listings show) and its filesystem are here.
    value: dict[str, object] = {
        "cell": label.cell.path if label.cell else None, "name": label.name,
        "description": label.description, "uid": label.uid, "gid": label.gid,
        "log_dir": str(label.log_dir), "started_at": label.started_at, "scope": label.scope,
        "labels": dict(label.labels)}
    if label.container is not None:
        value["command"] = label.command
        value["container"] = {"directory": str(label.container[0]), "image": label.container[1]}
    return value


def restart_key(key: ExecutableKey) -> str:
    return RESTART_RECORD_PREFIX + str(key)


def restart_record(key: ExecutableKey, state: RestartState) -> dict[str, object]:
    policy = state.policy
    return {"cell": key.cell.path if key.cell else None, "name": key.name,
            "mode": policy.mode.value, "first_delay": policy.first_delay,
            "max_delay": policy.max_delay, "burst": policy.burst, "interval": policy.interval,
            "count": state.count, "consecutive": state.consecutive,
            "last_delay": state.last_delay, "due": state.due, "ended": state.ended,
            "gave_up": state.gave_up, "starts": list(state.starts)}


def read_restart_record(value: dict[str, object]) -> tuple[ExecutableKey, RestartState]:
    try:
        cell = value["cell"]
        policy = RestartPolicy(
            mode=RestartMode(value["mode"]), first_delay=_number(value["first_delay"]),
            max_delay=_number(value["max_delay"]), burst=int(_number(value["burst"])),
            interval=_number(value["interval"]))
        starts = value["starts"]
        assert isinstance(starts, list) and len(starts) <= max(policy.burst, 1)
        state = RestartState(
            policy=policy, count=int(_number(value["count"])),
            consecutive=int(_number(value["consecutive"])),
            last_delay=_number(value["last_delay"]), due=_number(value["due"]),
            ended=value["ended"] is True, gave_up=value["gave_up"] is True,
            starts=collections.deque(_number(start) for start in starts))
        key = ExecutableKey(None if cell is None else _cell_name(cell), str(value["name"]))
    except (KeyError, TypeError, AssertionError, ValueError) as error:
        raise BadRecord(f"restart record {value!r}: {error!r}") from None
    return key, state


def _number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"not a number of the record: {value!r}")
    return float(value)


def read_cell_record(value: dict[str, object]) -> CellRecord:
    try:
        limits = value["limits"]
        assert isinstance(limits, dict)
        return CellRecord(
            name=_cell_name(value["name"]),
            limits=CgroupLimits(**limits),
            isolate_process=bool(value["isolate_process"]),
            isolate_network=bool(value["isolate_network"]),
            isolate_pid=bool(value.get("isolate_pid", False)),
            owner=None if value.get("owner") is None else str(value["owner"]),
            labels=_labels(value.get("labels")),
            hostname=None if value.get("hostname") is None else str(value["hostname"]),
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
        container = label.get("container")
        if container is None:
            assert len(argv) == 3 and argv[:2] == ["/bin/sh", "-c"], f"argv {argv!r}"
            command = argv[2]
        else:
            assert isinstance(container, dict) and isinstance(label["command"], str)
            command = label["command"]
        cell = label["cell"]
        return ExecutableLabel(
            cell=None if cell is None else _cell_name(cell),
            name=str(label["name"]),
            command=command,
            description=str(label["description"]),
            uid=int(label["uid"]),  # type: ignore[call-overload]
            gid=int(label["gid"]),  # type: ignore[call-overload]
            log_dir=Path(str(label["log_dir"])),
            started_at=float(label["started_at"]),  # type: ignore[arg-type]
            scope=None if label.get("scope") is None else str(label["scope"]),
            container=None if container is None else (Path(str(container["directory"])),
                                                      str(container["image"])),
            labels=_labels(label.get("labels")),
        )
    except (KeyError, TypeError, AssertionError, ValueError) as error:
        raise BadRecord(f"executable label {label!r}: {error!r}") from None


def _labels(value: object) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise BadRecord(f"labels {value!r}")
    return tuple(sorted((str(k), str(v)) for k, v in value.items()))


def _cell_name(value: object) -> CellName:
    if not isinstance(value, str):
        raise BadRecord(f"cell name {value!r}")
    try:
        return CellName.parse(value)
    except Exception as error:  # noqa: BLE001 - whatever the grammar raises, the record is bad
        raise BadRecord(f"cell name {value!r}: {error}") from None
