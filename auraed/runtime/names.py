"""Names of cells and executables, validated once at the edge.

A cell name is a path of DNS labels, "a/b/c": cell c nested in b nested in a.
A label is 1-63 ASCII letters, digits and '-', not starting or ending with
'-'; in cell names, lowercase only (they name cgroup directories, and "Web"
and "web" must not be two cells). That rules out "..", "_", empty parts,
non-ASCII, NUL, and every cgroup control-file name ("cgroup.procs",
"memory.max" hold a '.'; v1's "tasks" is reserved), so a valid name can
never step outside the daemon's cgroup subtree or collide with the kernel's
files or the daemon's own `_`-prefixed leaves.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from auraed.errors import InvalidArgument, Subject

_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
# The one cgroup control file whose name is a valid label: v1's "tasks" sits in
# every cgroup directory, so a cell cannot be named so.
_RESERVED_CELL_LABELS = frozenset({"tasks"})
MAX_DEPTH = 16
MAX_NAME_LENGTH = 253


def _label_problem(label: str) -> str | None:
    if not label:
        return "has an empty component"
    if not label.isascii() or not label.isprintable():
        return f"component {label!r} has characters other than ASCII letters, digits and '-'"
    if len(label) > 63:
        return f"component {label[:16]!r}... is {len(label)} characters long; the limit is 63"
    if not _LABEL.fullmatch(label):
        return (
            f"component {label!r} must be letters, digits and '-', "
            "not starting or ending with '-'"
        )
    return None


@dataclass(frozen=True, order=True)
class CellName:
    """A validated cell path such as "a/b"."""

    path: str

    @classmethod
    def parse(cls, text: str) -> CellName:
        subject = Subject.CELL
        if not text:
            raise InvalidArgument("a cell name is required", subject=subject)
        if len(text) > MAX_NAME_LENGTH:
            raise InvalidArgument(
                f"cell name is {len(text)} characters long; the limit is {MAX_NAME_LENGTH}",
                subject=subject,
            )
        labels = text.split("/")
        if len(labels) > MAX_DEPTH:
            raise InvalidArgument(
                f"cell name nests {len(labels)} deep; the limit is {MAX_DEPTH}", subject=subject
            )
        for label in labels:
            problem = _label_problem(label)
            if not problem and label != label.lower():
                problem = f"component {label!r} has uppercase letters; cell names are lowercase"
            if not problem and label in _RESERVED_CELL_LABELS:
                problem = f"component {label!r} is the name of a cgroup control file"
            if problem:
                raise InvalidArgument(f"invalid cell name {text!r}: {problem}", subject=subject)
        return cls(text)

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(self.path.split("/"))

    @property
    def leaf(self) -> str:
        return self.labels[-1]

    @property
    def parent(self) -> CellName | None:
        head, _, _ = self.path.rpartition("/")
        return CellName(head) if head else None

    def ancestors(self) -> list[CellName]:
        """Outermost first: "a/b/c" -> [a, a/b]."""
        labels = self.labels
        return [CellName("/".join(labels[:i])) for i in range(1, len(labels))]

    def is_within(self, other: CellName) -> bool:
        """True for `other` itself and every cell nested inside it."""
        return self.path == other.path or self.path.startswith(other.path + "/")

    def __str__(self) -> str:
        return self.path


def parse_executable_name(text: str) -> str:
    """An executable name: one DNS label, unique within its cell."""
    if not text:
        raise InvalidArgument("an executable name is required", subject=Subject.EXECUTABLE)
    problem = _label_problem(text) if "/" not in text else "must not contain '/'"
    if problem:
        raise InvalidArgument(f"invalid executable name {text!r}: {problem}",
                              subject=Subject.EXECUTABLE)
    return text


# Labels follow the key/value grammar operators know from Kubernetes: a name
# of 1-63 characters, optionally after a DNS-name prefix and '/'.
_LABEL_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?")
MAX_LABELS = 64
MAX_LABEL_PREFIX = 253


def parse_labels(labels: dict[str, str]) -> tuple[tuple[str, str], ...]:
    """Validated labels, sorted by key (so equal maps compare equal)."""
    if len(labels) > MAX_LABELS:
        raise InvalidArgument(f"{len(labels)} labels; the limit is {MAX_LABELS}")
    for key, value in labels.items():
        prefix, slash, name = key.rpartition("/")
        problem = None
        if slash and (not prefix or len(prefix) > MAX_LABEL_PREFIX
                      or not all(_LABEL.fullmatch(part) for part in prefix.split("."))):
            problem = "its prefix before '/' must be a DNS name such as aurae-py.io"
        elif not _LABEL_NAME.fullmatch(name):
            problem = ("its name must be 1-63 letters, digits, '-', '_' or '.', starting and "
                       "ending with a letter or digit")
        if problem:
            raise InvalidArgument(f"invalid label key {key[:80]!r}: {problem}")
        if value and not _LABEL_NAME.fullmatch(value):
            raise InvalidArgument(
                f"invalid value {value[:80]!r} of label {key!r}: a value is empty or 1-63 "
                "letters, digits, '-', '_' or '.', starting and ending with a letter or digit",
            )
    return tuple(sorted(labels.items()))
