"""Every response is bounded: List pages a tree of any size, and a command is refused exactly
when exec would refuse it."""

from __future__ import annotations

import asyncio

import pytest

import aurae_sdk
from aurae_sdk import cells
from tests.support.daemon import DaemonProcess

# The kernel's MAX_ARG_STRLEN on 4 KiB pages: one argv string with its NUL.
MAX_ARG_STRLEN = 131072
BIG = 120_000  # bytes of one command; 40 of them are more than a 4 MiB message


def big_command(index: int) -> str:
    head = f"exec sleep 600 #{index:03d}"
    return head + "x" * (BIG - len(head))


@pytest.fixture
def big_tree(client: aurae_sdk.Client):  # type: ignore[no-untyped-def]
    """Cells big, big/inner and big2 with 40 executables whose commands total ~4.8 MB."""
    for name in ("big", "big/inner", "big2"):
        client.cells.allocate(cell={"name": name})
    started = {}
    try:
        for index in range(40):
            cell = ("big", "big/inner", "big2")[index % 3]
            client.cells.start(cell_name=cell, executable={"name": f"e{index}",
                                                           "command": big_command(index)})
            started[f"e{index}"] = cell
        yield started
    finally:
        for name, cell in started.items():
            client.cells.stop(cell_name=cell, executable_name=name, grace_period_ms=0)
        for name in ("big/inner", "big", "big2"):
            client.cells.free(cell_name=name)


def walk(nodes: list[cells.CellGraphNode]) -> list[cells.CellGraphNode]:
    return [n for node in nodes for n in [node, *walk(list(node.children))]]


def test_a_tree_larger_than_a_message_comes_in_pages(client: aurae_sdk.Client,
                                                     big_tree: dict[str, str]) -> None:
    first = client.cells.list()  # a client that knows nothing of pages gets the first one
    assert first.next_page_token and first.ByteSize() < 4 * 1024 * 1024
    tree = aurae_sdk.list_cells(client)
    assert [node.cell.name for node in tree] == ["big", "big2"]
    (inner,) = tree[0].children
    assert inner.cell.name == "big/inner"
    found = {e.name: (node.cell.name, e.command) for node in walk(tree) for e in node.executables}
    assert found == {name: (cell, big_command(int(name[1:]))) for name, cell in big_tree.items()}


def test_page_size_counts_cells_and_a_child_after_its_parents_page_stands_alone(
        client: aurae_sdk.Client, big_tree: dict[str, str]) -> None:
    pages = list(aurae_sdk.list_pages(client, page_size=1))
    names = [[node.cell.name for node in page.cells] for page in pages]
    # Depth first by name; a cell repeats when its executables overflow a page.
    assert names[0] == ["big"] and names[-1] == ["big2"]
    assert sorted({n for page in names for n in page}) == ["big", "big/inner", "big2"]
    assert all(len(page) == 1 for page in names) and not pages[-1].next_page_token
    assert all(page.ByteSize() <= 2 * 1024 * 1024 for page in pages)
    assert sum(len(node.executables) for page in pages for node in walk(list(page.cells))) == 40


def test_a_page_token_the_daemon_did_not_give_is_invalid(client: aurae_sdk.Client) -> None:
    for token in ("junk", "eyJhIjogMX0=", "W1tdLCAwLCAiIl0="):  # not base64 JSON; {"a": 1}; [[], 0, ""]
        with pytest.raises(aurae_sdk.InvalidArgument) as refused:
            client.cells.list(page_token=token)
        assert refused.value.field == "page_token"


@pytest.mark.parametrize("filler", ["x", "\x01", "\u00e9"], ids=["ascii", "control", "utf8"])
def test_the_longest_command_exec_takes_runs_and_one_byte_more_is_refused(
        client: aurae_sdk.Client, filler: str) -> None:
    head = "true #"
    width = len(filler.encode())
    longest = head + filler * ((MAX_ARG_STRLEN - 1 - len(head)) // width)
    longest += "x" * (MAX_ARG_STRLEN - 1 - len(longest.encode()))
    assert len(longest.encode()) == MAX_ARG_STRLEN - 1
    client.cells.allocate(cell={"name": "longest"})
    try:
        client.cells.start(cell_name="longest", executable={"name": "ok", "command": longest})
        waited = client.cells.wait(cell_name="longest", executable_name="ok", timeout=30)
        assert waited.status.exit_code == 0 and waited.status.command == longest
        with pytest.raises(aurae_sdk.InvalidArgument) as refused:
            client.cells.start(cell_name="longest",
                               executable={"name": "over", "command": longest + "x"})
        assert refused.value.field == "executable.command"
        assert "MAX_ARG_STRLEN" in refused.value.message
        assert not [e for node in aurae_sdk.list_cells(client) for e in node.executables
                    if e.name == "over"]
    finally:
        client.cells.free(cell_name="longest")


def test_the_async_helper_merges_the_same_tree(daemon: DaemonProcess, client: aurae_sdk.Client,
                                               big_tree: dict[str, str]) -> None:
    async def listed() -> list[cells.CellGraphNode]:
        async with aurae_sdk.AsyncClient(daemon.config) as aclient:
            return await aurae_sdk.alist_cells(aclient, page_size=2)

    assert asyncio.run(listed()) == aurae_sdk.list_cells(client)


def test_host_level_executables_count_against_the_page_budget(client: aurae_sdk.Client) -> None:
    # 12 host-level executables of 120 KB each are 1.4 MB: more than one page holds.
    names = [f"host-big-{index:02d}" for index in range(12)]
    client.cells.allocate(cell={"name": "after-host"})
    try:
        for index, name in enumerate(names):
            client.cells.start(executable={"name": name, "command": big_command(index)})
        pages = list(aurae_sdk.list_pages(client))
        assert len(pages) > 1
        assert all(page.ByteSize() <= 1024 * 1024 + 1024 for page in pages)  # the token aside
        seen = [e.name for page in pages for e in page.host_executables]
        assert seen == names  # each exactly once, by name, across the pages
        assert {e.name: e.command for page in pages for e in page.host_executables} == {
            name: big_command(index) for index, name in enumerate(names)}
        # The cells come after them, in the same pages.
        assert [n.cell.name for n in aurae_sdk.list_cells(client)] == ["after-host"]
        # A page of one cell at most still carries host-level executables by bytes alone.
        small = list(aurae_sdk.list_pages(client, page_size=1))
        assert [e.name for page in small for e in page.host_executables] == names
    finally:
        for name in names:
            try:
                client.cells.stop(executable_name=name, grace_period_ms=0)
            except aurae_sdk.NotFound:
                pass
        client.cells.free(cell_name="after-host")
