"""The REPL: field completion and message display on their own, then a whole
session in a pseudo-terminal against a real auraed."""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pexpect
import pytest
from prompt_toolkit.completion import CompleteEvent
from prompt_toolkit.document import Document

import aurae_sdk
from aurae_cli.generated.namespace import service_modules
from aurae_cli.repl import MessageFieldCompleter, displayed, pretty
from aurae_sdk import cells, vms
from tests.support.daemon import DaemonProcess


@pytest.fixture
def namespace(daemon: DaemonProcess) -> Iterator[dict[str, Any]]:
    with daemon.client() as client:
        yield {**service_modules(), "client": client}


def complete(namespace: dict[str, Any], text: str) -> list[str]:
    completer = MessageFieldCompleter(lambda: namespace)
    found = completer.get_completions(Document(text), CompleteEvent(completion_requested=True))
    return [completion.text for completion in found]


@pytest.mark.parametrize(
    ("text", "offered"),
    [
        ("cells.Cell(na", ["name="]),
        ("cells.Cell(name='x', is", ["isolate_process=", "isolate_network="]),
        ("cells.Cell(cpu={'we", ["weight': "]),
        ("cells.Cell(cpu={", ['"weight": ', '"max": ', '"period": ']),
        ('client.cells.allocate(cell={"cp', ['cpu": ', 'cpuset": ']),
        ('client.cells.allocate(cell={"cpu": {"weight": 2}, "memory": {"m', ['min": ', 'max": ']),
        ('client.vms.allocate(machine={"drive_mounts": [{"vm_path": "/d"}, {"f', ['fs_type": ']),
        ("client.cells.allocate(cell=cells.Cell(cpu=cells.CpuController(pe", ["period="]),
    ],
)
def test_message_fields_complete_as_keywords_and_dict_keys(
    namespace: dict[str, Any], text: str, offered: list[str]
) -> None:
    assert complete(namespace, text) == offered


@pytest.mark.parametrize(
    "text",
    [
        "client.cells.allocate(ce",  # a method's own keywords: jedi completes those
        "print(na",  # not a message
        'cells.Cell(name="na',  # inside a value, not a key
        'cells.Cell(cpu={"weight": 1, "x": {"',  # no such field
        "cells.Cell(name=",  # after "=" a value comes
    ],
)
def test_nothing_is_offered_where_no_field_fits(namespace: dict[str, Any], text: str) -> None:
    assert complete(namespace, text) == []


def test_short_messages_print_on_one_line_and_long_ones_wrap() -> None:
    cell = cells.Cell(name="web", cpu=cells.CpuController(weight=2))
    assert pretty(cell) == "Cell(name='web', cpu=CpuController(weight=2))"
    machine = vms.VirtualMachine(
        id="vm-1",
        kernel_args=["console=ttyS0", "quiet"],
        drive_mounts=[vms.DriveMount(image_path="/images/data.ext4", vm_path="/data")] * 2,
    )
    assert pretty(machine, width=70).splitlines() == [
        "VirtualMachine(",
        "    id='vm-1',",
        "    kernel_args=['console=ttyS0', 'quiet'],",
        "    drive_mounts=[",
        "        DriveMount(image_path='/images/data.ext4', vm_path='/data'),",
        "        DriveMount(image_path='/images/data.ext4', vm_path='/data'),",
        "    ],",
        ")",
    ]


def test_results_that_are_not_messages_display_as_they_are() -> None:
    assert displayed(42, 80) == 42
    listed = cells.CellServiceListResponse(cells=[{"cell": {"name": "a"}}, {"cell": {"name": "b"}}])
    assert repr(displayed(listed.cells, 80)) == (
        "[CellGraphNode(cell=Cell(name='a')), CellGraphNode(cell=Cell(name='b'))]"
    )


# --------------------------------------------------------------------------
# A session in a pseudo-terminal

ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[()][A-Z0-9]|\x1b[=>]|\r")


class Terminal:
    """A pexpect child whose output is matched with terminal escapes removed."""

    def __init__(self, child: pexpect.spawn) -> None:
        self.child = child
        self._raw = ""
        self._seen = 0

    def expect(self, pattern: str, timeout: float = 20) -> re.Match[str]:
        compiled = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            text = ANSI.sub("", self._raw)
            match = compiled.search(text, self._seen)
            if match:
                self._seen = match.end()
                return match
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"{pattern!r} did not appear; the screen ends with {text[-600:]!r}"
                )
            try:
                self._raw += self.child.read_nonblocking(65536, timeout=min(remaining, 0.5))
            except pexpect.TIMEOUT:
                pass

    def prompt(self) -> None:
        self.expect(r">>>")


@pytest.fixture
def terminal(daemon: DaemonProcess, tmp_path: Path) -> Iterator[Terminal]:
    env = {
        **os.environ,
        "AURAE_CONFIG": daemon.config,
        "AURAE_PY_HISTORY": str(tmp_path / "history"),
        "TERM": "xterm-256color",
        "PROMPT_TOOLKIT_NO_CPR": "1",  # pexpect answers no cursor position requests
    }
    child = pexpect.spawn(
        sys.executable,
        ["-m", "aurae_cli"],
        env=env,
        encoding="utf-8",
        dimensions=(50, 160),
        timeout=30,
    )
    try:
        yield Terminal(child)
    finally:
        if child.isalive():
            child.kill(signal.SIGKILL)
        child.close()
        with daemon.client() as client:
            try:
                client.cells.free(cell_name="repl-cell")
            except aurae_sdk.NotFound:
                pass


def test_a_session(terminal: Terminal, daemon: DaemonProcess) -> None:
    terminal.expect(r"Connected to auraed \S+ at " + re.escape(daemon.socket))
    terminal.expect(r"Preloaded: client, aclient")
    terminal.prompt()

    # A call with a dict request; the response prints as a message.
    terminal.child.sendline('client.cells.allocate(cell={"name": "repl-cell"})')
    terminal.expect(r"CellServiceAllocateResponse\(cell_name='repl-cell'")
    with daemon.client() as client:
        assert "repl-cell" in {node.cell.name for node in client.cells.list().cells}

    # Completing a method name, then using what was completed.
    terminal.prompt()
    terminal.child.send("client.cells.all")
    terminal.expect(r"allocate")  # the completion menu
    terminal.child.send("\t")
    terminal.child.send(".__name__\r")
    terminal.expect(r"'allocate'")

    # Completing a message field, as a keyword and as a dict key.
    terminal.prompt()
    terminal.child.send("cells.Cell(na")
    terminal.expect(r"\n name")
    terminal.child.send('\t"x", cpu={"we')
    terminal.expect(r"\n weight")
    terminal.child.send("\t7})\r")
    terminal.expect(r"Cell\(name='x', cpu=CpuController\(weight=7\)\)")

    # A stream prints live until Ctrl-C, and the prompt comes back.
    terminal.prompt()
    terminal.child.sendline(
        'p = client.cells.start(cell_name="repl-cell", executable={'
        '"name": "tick", "command": "while :; do echo tick; sleep 0.2; done"})'
    )
    terminal.prompt()
    terminal.child.sendline("show(client.observe.get_sub_process_stream(process_id=p.pid))")
    terminal.expect(r"tick\n+tick\n")
    terminal.child.sendintr()
    terminal.prompt()
    terminal.child.sendline("6 * 7")
    terminal.expect(r"\n42\n")

    # The asyncio client: a stream as a result prints live too; Ctrl-C cancels it.
    terminal.prompt()
    terminal.child.sendline("aclient.observe.get_sub_process_stream(process_id=p.pid)")
    terminal.expect(r"tick\n+tick\n")
    terminal.child.sendintr()
    terminal.prompt()
    terminal.child.sendline('await aclient.cells.free(cell_name="repl-cell")')
    terminal.expect(r"CellServiceFreeResponse\(\)")
    terminal.prompt()

    terminal.child.sendeof()
    terminal.child.expect(pexpect.EOF, timeout=20)
    terminal.child.close()
    assert terminal.child.exitstatus == 0
    with daemon.client() as client:
        assert "repl-cell" not in {node.cell.name for node in client.cells.list().cells}
