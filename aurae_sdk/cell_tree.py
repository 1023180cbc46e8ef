"""The whole cell tree, whatever its size: CellService/List page by page, put back together.

    for node in aurae_sdk.list_cells(client):
        print(node.cell.name, [e.name for e in node.executables])

List answers in pages (an aurae-py addition) so that no response outgrows the message limit.
A page nests a cell under its parent when both are on it; a cell whose parent was on an earlier
page comes at the page's top level, named by its whole path, and a cell whose executables
overflowed a page comes again with the rest of them. These helpers follow next_page_token to the
end and merge the pages into one tree of CellGraphNode, as a single List of a small tree gives.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Iterator
from typing import TYPE_CHECKING

from aurae_sdk.generated import cells

if TYPE_CHECKING:
    from aurae_sdk.client import AsyncClient, Client


def list_pages(client: Client, *, page_size: int = 0,
               timeout: float | None = None) -> Iterator[cells.CellServiceListResponse]:
    """Every page of List in order (page_size 0: as many cells as fit in a page)."""
    token = ""
    while True:
        page = client.cells.list(page_size=page_size, page_token=token, timeout=timeout)
        yield page
        token = page.next_page_token
        if not token:
            return


async def alist_pages(aclient: AsyncClient, *, page_size: int = 0, timeout: float | None = None,
                      ) -> AsyncIterator[cells.CellServiceListResponse]:
    """list_pages() on an AsyncClient."""
    token = ""
    while True:
        page = await aclient.cells.list(page_size=page_size, page_token=token, timeout=timeout)
        yield page
        token = page.next_page_token
        if not token:
            return


def list_cells(client: Client, *, page_size: int = 0,
               timeout: float | None = None) -> list[cells.CellGraphNode]:
    """The top-level cells with all their descendants and executables, from every page."""
    return merge_pages(list_pages(client, page_size=page_size, timeout=timeout))


async def alist_cells(aclient: AsyncClient, *, page_size: int = 0,
                      timeout: float | None = None) -> list[cells.CellGraphNode]:
    """list_cells() on an AsyncClient."""
    return merge_pages([page async for page in alist_pages(aclient, page_size=page_size,
                                                           timeout=timeout)])


def merge_pages(pages: Iterable[cells.CellServiceListResponse]) -> list[cells.CellGraphNode]:
    """One tree from List's pages."""
    tree = cells.CellServiceListResponse()
    nodes: dict[str, cells.CellGraphNode] = {}

    def place(node: cells.CellGraphNode) -> None:
        name = node.cell.name
        merged = nodes.get(name)
        if merged is None:
            parent = nodes.get(name.rpartition("/")[0]) if "/" in name else None
            merged = nodes[name] = (parent.children if parent else tree.cells).add()
            merged.cell.CopyFrom(node.cell)
        merged.executables.extend(node.executables)
        for child in node.children:
            place(child)

    for page in pages:
        for node in page.cells:
            place(node)
    return list(tree.cells)


__all__ = ["alist_cells", "alist_pages", "list_cells", "list_pages", "merge_pages"]
