"""Tables for list-like responses: which rows and columns a response shows as.

A response is list-like when all its fields are repeated messages (`cells list`, `vms list`).
`cells list` has a view made for it (a cell tree flattened to paths, limits in people's units,
what runs in each cell); any other list-like response gets one row per item with its scalar
fields as columns.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import Message

from aurae_cli.tables import human_age, joined
from aurae_sdk.messages import to_dict
from aurae_sdk.units import format_bytes


@dataclass(frozen=True)
class View:
    rows: list[dict[str, Any]]
    columns: tuple[str, ...]
    wide: tuple[str, ...]
    empty: str


def list_view(message: Message, *, timestamps: bool = False) -> View | None:
    """The table `message` shows as, or None when it is not list-like."""
    view = _VIEWS.get(message.DESCRIPTOR.full_name)
    if view is not None:
        return view(message, timestamps)
    fields = message.DESCRIPTOR.fields
    if not fields or not all(
        f.is_repeated and f.message_type is not None and not f.message_type.GetOptions().map_entry
        for f in fields
    ):
        return None
    rows: list[dict[str, Any]] = []
    columns: list[str] = []
    for field in fields:
        for item in getattr(message, field.name):
            row = {k: v for k, v in to_dict(item).items() if not isinstance(v, (dict, list))}
            columns.extend(k for k in row if k not in columns)
            rows.append(row)
    kinds = " or ".join(f.name for f in fields)
    return View(rows, tuple(columns), (), f"No {kinds} found.")


def _when(seconds: float, timestamps: bool) -> str:
    if not seconds:
        return ""
    return f"{seconds:.3f}" if timestamps else human_age(seconds)


def _executable(status: Any, timestamps: bool) -> str:
    if status.state == 1:
        since = _when(status.started_at, timestamps)
        return f"{status.name} (running{' since ' if timestamps else ' '}{since})"
    if status.HasField("exit_code"):
        how = f"exited {status.exit_code}"
    elif status.HasField("signal"):
        how = f"killed by signal {status.signal}"
    else:
        how = "exited"
    ended = _when(status.exited_at, timestamps)
    return f"{status.name} ({how}{' at ' if timestamps else ', '}{ended}{'' if timestamps else ' ago'})"


def _cells(message: Any, timestamps: bool) -> View:
    rows: list[dict[str, Any]] = []

    def walk(nodes: Any) -> None:
        for node in nodes:
            cell = node.cell
            cpu = []
            if cell.cpu.HasField("weight"):
                cpu.append(f"weight={cell.cpu.weight}")
            if cell.cpu.HasField("max"):
                period = cell.cpu.period if cell.cpu.HasField("period") else 100_000
                cpu.append(f"max={cell.cpu.max / period:.2f}cpu")
            memory = [f"{name}={format_bytes(getattr(cell.memory, name))}"
                      for name in ("min", "low", "high", "max") if cell.memory.HasField(name)]
            isolation = [kind for kind in ("process", "network")
                         if getattr(cell, f"isolate_{kind}")]
            labels = {k: v for k, v in cell.labels.items() if not k.startswith("exe.aurae-py.io/")}
            owner = labels.pop("aurae-py.io/owner", "")
            cpuset = [f"{n}={getattr(cell.cpuset, n)}" for n in ("cpus", "mems")
                      if cell.cpuset.HasField(n)]
            rows.append({
                "name": cell.name,
                "cpu": joined(cpu),
                "memory": joined(memory),
                "isolation": joined(isolation),
                "executables": ", ".join(_executable(e, timestamps) for e in node.executables)
                or "-",
                "cpuset": joined(cpuset),
                "owner": owner or "-",
                "labels": joined(f"{k}={v}" for k, v in sorted(labels.items())),
            })
            walk(node.children)

    walk(message.cells)
    return View(rows, ("name", "cpu", "memory", "isolation", "executables"),
                ("cpuset", "owner", "labels"), "No cells found.")


def _images(message: Any, timestamps: bool) -> View:
    # People name an image by its references; the id is shortened as docker shows it.
    rows = [{"references": joined(image.references),
             "id": image.id.removeprefix("sha256:")[:12],
             "size": format_bytes(image.size),
             "imported": _when(image.imported_at, timestamps),
             "layers": str(len(image.layers)),
             "manifest_digest": image.manifest_digest} for image in message.images]
    return View(rows, ("references", "id", "size", "imported"), ("layers", "manifest_digest"),
                "No images found.")


_VIEWS: dict[str, Callable[[Any, bool], View]] = {
    "aurae.cells.v0.CellServiceListResponse": _cells,
    "aurae.images.v0.ImageServiceListResponse": _images,
}
