"""Failures of the cgroup layer, one class per kind so services can map each to a status code.

`field` names the limit at fault in the API's cgroup v2 terms ("memory.max", ...), or is None when
the failure is not about one limit.
"""


class CgroupError(Exception):
    """Base of every failure this package raises."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class InvalidLimit(CgroupError):
    """A limit is out of range or malformed; nothing was written."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"invalid {field}: {message}", field)


class UnsupportedLimit(CgroupError):
    """A limit this host's cgroups cannot express (e.g. memory.high on v1); nothing was written."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"unsupported {field}: {message}", field)


class LimitRefused(CgroupError):
    """The kernel rejected a value that passed validation (e.g. v1 memory.max below usage)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field} refused by the kernel: {message}", field)


class UnsafePath(CgroupError):
    """Something other than a real directory sits where one of our cgroups should be."""

    def __init__(self, path: str) -> None:
        super().__init__(f"refusing {path}: not a real directory (symlink or file in its place)")
        self.path = path


class CgroupNotFound(CgroupError):
    """The cell's cgroup (or, for create, its parent's) does not exist."""

    def __init__(self, cell_path: str) -> None:
        super().__init__(f"no cgroup for cell {cell_path!r}")
        self.cell_path = cell_path


class CgroupExists(CgroupError):
    """create() was asked for a cell whose cgroup already exists."""

    def __init__(self, cell_path: str) -> None:
        super().__init__(f"a cgroup for cell {cell_path!r} already exists")
        self.cell_path = cell_path


class CgroupBusy(CgroupError):
    """Processes were still in the cell's cgroups when kill() or remove() gave up waiting."""

    def __init__(self, cell_path: str, pids: set[int]) -> None:
        super().__init__(f"cell {cell_path!r} still holds processes {sorted(pids)}")
        self.cell_path = cell_path
        self.pids = pids
