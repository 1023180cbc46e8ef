"""CellService/List in pages: no response grows past the message limit with the workload.

The host-level executables come first, by name; then the tree is walked depth first by name.
Every host-level executable, cell and executable of a cell is one entry at a position (its key)
in that order: the cell, then its executables by name, then its children. A page takes entries
from just after the previous page's last key until it holds page_size cells (a cell repeated to
carry more of its executables counts again; host-level executables count no cell) or PAGE_BYTES
of messages, whatever they are; the page token is that last key. Continuing from a key rather than an
offset means a cell allocated or freed between pages shifts nothing: no entry is skipped or
repeated because of it.

A page's cells nest as in the tree when their parent is on the page too; a cell whose parent was
on an earlier page is at the page's top level (its name is its whole path), and a cell whose
executables overflow a page appears again, with the rest of them, on the next.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import json
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

from aurae_sdk.wire.generated.pb.cells import cells_pb2 as pb
from auraed.errors import InvalidArgument
from auraed.runtime.executables import Executable
from auraed.runtime.names import CellName
from auraed.runtime.workloads import CellSpec, CellView

# Well under the 4 MiB message limit even after the one entry that crosses it (an executable
# with a 128 KiB command is the largest).
PAGE_BYTES = 1024 * 1024
# What nesting a message in another costs on the wire (tag and length), at most.
_FRAMING_BYTES = 8

# (cell path components, 0 for the cell itself or 1 for one of its executables, its name).
# A host-level executable has no cell: () sorts before every cell's path.
Key = tuple[tuple[str, ...], int, str]
Entry = tuple[Key, CellView | None, Executable | None]


def _entries(tree: list[CellView], host: list[Executable]) -> Iterator[Entry]:
    for executable in sorted(host, key=lambda e: e.name):
        yield ((), 1, executable.name), None, executable

    def walk(view: CellView) -> Iterator[Entry]:
        labels = tuple(view.name.path.split("/"))
        yield (labels, 0, ""), view, None
        for executable in sorted(view.executables, key=lambda e: e.name):
            yield (labels, 1, executable.name), view, executable
        for child in sorted(view.children, key=lambda c: c.name.path):
            yield from walk(child)

    for top in sorted(tree, key=lambda c: c.name.path):
        yield from walk(top)


def encode_token(key: Key) -> str:
    labels, kind, name = key
    return base64.urlsafe_b64encode(json.dumps([list(labels), kind, name]).encode()).decode()


def decode_token(token: str) -> Key | None:
    """The key a page token names (None for the first page); INVALID_ARGUMENT for junk."""
    if not token:
        return None
    refusal = InvalidArgument("not a page token this daemon gave (pass next_page_token back "
                              "as it came)", field="page_token")
    try:
        labels, kind, name = json.loads(base64.urlsafe_b64decode(token.encode("ascii")))
    except (ValueError, TypeError, binascii.Error, UnicodeEncodeError):
        raise refusal from None
    if (not isinstance(labels, list) or not (labels or kind == 1)
            or not all(isinstance(x, str) for x in labels)
            or kind not in (0, 1) or not isinstance(name, str)):
        raise refusal
    return tuple(labels), kind, name


class ListingCache:
    """The serialized Cell and ExecutableStatus of each entry, kept from one List to the next.

    A page is put together from these bytes (a protobuf message is the concatenation of its
    fields, a nested one framed by tag and length), so a List of a thousand unchanged cells
    builds no message per cell. A cell's Cell changes only with its spec (Update replaces the
    spec object); an executable's status with what `version(executable)` returns, which must
    name everything the status shows that can change after its start.
    """

    def __init__(self, cell_message: Callable[[CellName, CellSpec], pb.Cell],
                 executable_status: Callable[[Executable], pb.ExecutableStatus],
                 version: Callable[[Executable], object]) -> None:
        self._cell_message = cell_message
        self._executable_status = executable_status
        self._version = version
        self._lock = threading.Lock()
        self._cells: dict[str, tuple[CellSpec, bytes]] = {}
        self._statuses: dict[int, tuple[Executable, object, bytes]] = {}

    def cell(self, view: CellView) -> bytes:
        cached = self._cells.get(view.name.path)
        if cached is not None and cached[0] is view.spec:
            return cached[1]
        data = self._cell_message(view.name, view.spec).SerializeToString()
        with self._lock:
            self._cells[view.name.path] = (view.spec, data)
        return data

    def status(self, executable: Executable) -> bytes:
        version = self._version(executable)
        cached = self._statuses.get(id(executable))
        if cached is not None and cached[0] is executable and cached[1] == version:
            return cached[2]
        data = self._executable_status(executable).SerializeToString()
        with self._lock:
            self._statuses[id(executable)] = (executable, version, data)
        return data

    def drop(self, paths: Iterable[str], executables: Iterable[int]) -> None:
        """Forget these cells' and executables' bytes (theirs no longer: freed, replaced)."""
        with self._lock:
            for path in paths:
                self._cells.pop(path, None)
            for key in executables:
                self._statuses.pop(key, None)

    def keep_only(self, tree: list[CellView], host: list[Executable]) -> None:
        """Drop what belongs to cells and executables no longer in the tree or at host level
        (after a List of all of it), so that the cache holds no freed executable alive."""
        paths: set[str] = set()
        executables = {id(e) for e in host}
        stack = list(tree)
        while stack:
            view = stack.pop()
            paths.add(view.name.path)
            executables.update(id(e) for e in view.executables)
            stack.extend(view.children)
        with self._lock:
            self._cells = {k: v for k, v in self._cells.items() if k in paths}
            self._statuses = {k: v for k, v in self._statuses.items() if k in executables}


class _Node:
    """A cell on the page being put together: its own fields, and its children on the page."""

    __slots__ = ("children", "fields")

    def __init__(self, fields: list[bytes]) -> None:
        self.fields = fields
        self.children: list[_Node] = []

    def encode(self) -> bytes:
        return b"".join(self.fields) + b"".join(
            _length_delimited(_CHILDREN, child.encode()) for child in self.children)


# Field tags of CellGraphNode and CellServiceListResponse (wire type 2: length-delimited).
_NODE_CELL, _CHILDREN, _EXECUTABLES, _MISSING_CGROUPS = b"\x0a", b"\x12", b"\x1a", b"\x52"
_NAMESPACES_LOST = b"\x58\x01"  # field 11, a varint: true
_RESPONSE_CELLS, _NEXT_PAGE_TOKEN, _HOST_EXECUTABLES = b"\x0a", b"\x12", b"\x1a"


def _length_delimited(tag: bytes, payload: bytes) -> bytes:
    size = len(payload)
    if size < 0x80:
        return tag + bytes((size,)) + payload
    prefix = bytearray(tag)
    while size >= 0x80:
        prefix.append((size & 0x7F) | 0x80)
        size >>= 7
    prefix.append(size)
    return bytes(prefix) + payload


class ListedWorkloads(Protocol):
    """What WholeListing reads of auraed.runtime.workloads.Workloads."""

    def changed_since(self, version: int) -> tuple[int, set[str] | None]: ...
    def tree(self, tops: Iterable[str] | None = None) -> list[CellView]: ...
    def drifted_tops(self) -> set[str]: ...
    def host_executables(self) -> list[Executable]: ...
    @property
    def version(self) -> tuple[int, int]: ...


class _Subtree:
    """One top-level cell on the first page, as List gives it: its bytes (framed as a cell
    of the response), what list_page counts them as, and what they were made of."""

    __slots__ = ("cells", "cost", "data", "entries", "executables")

    def __init__(self) -> None:
        self.data = b""
        self.cost = 0
        self.entries = 0
        self.cells: list[str] = []
        self.executables: list[int] = []


class WholeListing:
    """The first page holding every cell, kept per top-level cell from one List to the next.

    After a change only the top-level cells it touched (Workloads.changed_since, and those
    whose cgroups the host may have changed: Workloads.drifted_tops) are put together again;
    the page is the others' kept bytes joined with theirs. What comes out is what list_page
    gives for the same tree, the same request and no page token, whenever that is one
    complete page (every cell, within PAGE_BYTES); else page() says None and list_page runs.
    """

    def __init__(self, cache: ListingCache) -> None:
        self._cache = cache
        self._lock = threading.Lock()  # one List puts the page together at a time
        self._built = -1  # Workloads.changed_since's version of what is kept
        self._removals = -1
        self._tops: dict[str, _Subtree] = {}
        self._order: list[str] = []  # the kept top-level cell paths, sorted
        self._cells = self._cost = self._entries = 0
        self._hosts: set[int] = set()  # the host executables whose statuses are cached

    def page(self, workloads: ListedWorkloads, page_size: int) -> bytes | None:
        """The serialized first page (cells and host executables) of every cell, or None
        if every cell does not fit on one page of `page_size` cells and PAGE_BYTES."""
        with self._lock:
            removals = workloads.version[1]
            now, touched = workloads.changed_since(self._built)
            if touched is None:
                touched = set(self._order)
                views = workloads.tree()
                touched.update(view.name.path for view in views)
            else:
                if removals != self._removals:
                    touched |= workloads.drifted_tops()
                touched.discard("")
                views = workloads.tree(touched) if touched else []
            fresh = {view.name.path: view for view in views}
            for path in touched:
                old = self._tops.pop(path, None)
                view = fresh.get(path)
                new = _subtree(view, self._cache) if view is not None else None
                if old is not None:
                    self._account(old, -1)
                    if new is None:
                        del self._order[bisect.bisect_left(self._order, path)]
                    self._cache.drop(set(old.cells) - set(new.cells if new else ()),
                                     set(old.executables) - set(new.executables if new else ()))
                elif new is not None:
                    bisect.insort(self._order, path)
                if new is not None:
                    self._tops[path] = new
                    self._account(new, +1)
            self._built, self._removals = now, removals
            if page_size and self._cells > page_size:
                return None
            hosts = sorted(workloads.host_executables(), key=lambda e: e.name)
            host_ids = {id(e) for e in hosts}
            self._cache.drop((), self._hosts - host_ids)
            self._hosts = host_ids
            # Host-level executables are entries before the cells, within the same byte
            # budget as list_page counts them (not against page_size).
            host_fields = [_length_delimited(_HOST_EXECUTABLES, self._cache.status(e))
                           for e in hosts]
            entries = self._entries + len(host_fields)
            if entries > 1 and self._cost + sum(map(len, host_fields)) > PAGE_BYTES:
                return None
            tops = self._tops
            return b"".join(host_fields + [tops[path].data for path in self._order])

    def _account(self, subtree: _Subtree, sign: int) -> None:
        self._cells += sign * len(subtree.cells)
        self._cost += sign * subtree.cost
        self._entries += sign * subtree.entries


def _subtree(view: CellView, cache: ListingCache) -> _Subtree:
    """A top-level cell's node with its whole subtree, entry by entry as list_page makes
    and counts it (see _entries)."""
    subtree = _Subtree()

    def node(view: CellView) -> bytes:
        fields = [_length_delimited(_NODE_CELL, cache.cell(view))]
        fields.extend(_length_delimited(_MISSING_CGROUPS, missing.encode())
                      for missing in view.missing_cgroups)
        if view.namespaces_lost:
            fields.append(_NAMESPACES_LOST)
        subtree.cost += sum(len(field) for field in fields) + _FRAMING_BYTES
        subtree.entries += 1
        subtree.cells.append(view.name.path)
        for executable in sorted(view.executables, key=lambda e: e.name):
            status = _length_delimited(_EXECUTABLES, cache.status(executable))
            subtree.cost += len(status) + _FRAMING_BYTES
            subtree.entries += 1
            subtree.executables.append(id(executable))
            fields.append(status)
        children = [_length_delimited(_CHILDREN, node(child))
                    for child in sorted(view.children, key=lambda c: c.name.path)]
        return b"".join(fields) + b"".join(children)

    subtree.data = _length_delimited(_RESPONSE_CELLS, node(view))
    return subtree


def list_page(tree: list[CellView], host: list[Executable], request: pb.CellServiceListRequest,
              cache: ListingCache) -> pb.CellServiceListResponse:
    after = decode_token(request.page_token)
    nodes: dict[str, _Node] = {}
    top: list[_Node] = []
    host_fields: list[bytes] = []
    size = 0
    last: Key | None = None
    complete = True
    for key, view, executable in _entries(tree, host):
        if after is not None and key <= after:
            continue
        if view is None:
            assert executable is not None
            field = _length_delimited(_HOST_EXECUTABLES, cache.status(executable))
            if last is not None and size + len(field) > PAGE_BYTES:
                complete = False
                break
            host_fields.append(field)
            size += len(field)
            last = key
            continue
        path = view.name.path
        node = nodes.get(path)
        if node is None and request.page_size and len(nodes) >= request.page_size:
            complete = False
            break
        fields = []
        if node is None:
            fields.append(_length_delimited(_NODE_CELL, cache.cell(view)))
            # Drift, on the cell's first appearance (auraed.runtime.workloads.CellView).
            fields.extend(_length_delimited(_MISSING_CGROUPS, missing.encode())
                          for missing in view.missing_cgroups)
            if view.namespaces_lost:
                fields.append(_NAMESPACES_LOST)
        if executable is not None:
            fields.append(_length_delimited(_EXECUTABLES, cache.status(executable)))
        cost = sum(len(field) for field in fields) + _FRAMING_BYTES
        if last is not None and size + cost > PAGE_BYTES:
            complete = False
            break
        if node is None:
            node = nodes[path] = _Node(fields)
            parent = view.name.parent
            siblings = nodes[parent.path].children if parent and parent.path in nodes else top
            siblings.append(node)
        else:
            node.fields.extend(fields)
        size += cost
        last = key
    page = [*host_fields, *(_length_delimited(_RESPONSE_CELLS, node.encode()) for node in top)]
    if complete:
        if after is None:
            cache.keep_only(tree, host)
    elif last is not None:
        page.append(_length_delimited(_NEXT_PAGE_TOKEN, encode_token(last).encode()))
    return pb.CellServiceListResponse.FromString(b"".join(page))


__all__ = ["PAGE_BYTES", "ListingCache", "WholeListing", "decode_token", "encode_token",
           "list_page"]
