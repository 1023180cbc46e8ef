"""CellService/List in pages: no response grows past the message limit with the workload.

The tree is walked depth first by name, and every cell and every executable is one entry at a
position (its key) in that order: the cell, then its executables by name, then its children. A
page takes entries from just after the previous page's last key until it holds page_size cells
(a cell repeated to carry more of its executables counts again) or PAGE_BYTES of messages; the page token is that last key. Continuing from a key rather than an
offset means a cell allocated or freed between pages shifts nothing: no entry is skipped or
repeated because of it.

A page's cells nest as in the tree when their parent is on the page too; a cell whose parent was
on an earlier page is at the page's top level (its name is its whole path), and a cell whose
executables overflow a page appears again, with the rest of them, on the next.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Iterator

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

# (cell path components, 0 for the cell itself or 1 for one of its executables, its name)
Key = tuple[tuple[str, ...], int, str]
Entry = tuple[Key, CellView, Executable | None]


def _entries(tree: list[CellView]) -> Iterator[Entry]:
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
    if (not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels)
            or kind not in (0, 1) or not isinstance(name, str)):
        raise refusal
    return tuple(labels), kind, name


def list_page(
    tree: list[CellView],
    request: pb.CellServiceListRequest,
    cell_message: Callable[[CellName, CellSpec], pb.Cell],
    executable_status: Callable[[Executable], pb.ExecutableStatus],
) -> pb.CellServiceListResponse:
    after = decode_token(request.page_token)
    response = pb.CellServiceListResponse()
    nodes: dict[str, pb.CellGraphNode] = {}
    size = 0
    last: Key | None = None
    for key, view, executable in _entries(tree):
        if after is not None and key <= after:
            continue
        new_node = view.name.path not in nodes
        if new_node and request.page_size and len(nodes) >= request.page_size:
            break
        cell = cell_message(view.name, view.spec) if new_node else None
        status = executable_status(executable) if executable is not None else None
        cost = sum(m.ByteSize() + _FRAMING_BYTES for m in (cell, status) if m is not None)
        if cell is not None:
            cost += sum(len(path) + _FRAMING_BYTES for path in view.missing_cgroups)
        if last is not None and size + cost > PAGE_BYTES:
            break
        if cell is not None:
            parent = view.name.parent
            container = nodes[parent.path].children if parent and parent.path in nodes \
                else response.cells
            node = nodes[view.name.path] = container.add()  # a reference into the response
            node.cell.CopyFrom(cell)
            # Drift, on the cell's first appearance (auraed.runtime.workloads.CellView).
            node.missing_cgroups.extend(view.missing_cgroups)
            node.namespaces_lost = view.namespaces_lost
        if status is not None:
            nodes[view.name.path].executables.append(status)
        size += cost
        last = key
    else:
        return response  # every entry is on this page
    if last is not None:
        response.next_page_token = encode_token(last)
    return response


__all__ = ["PAGE_BYTES", "decode_token", "encode_token", "list_page"]
