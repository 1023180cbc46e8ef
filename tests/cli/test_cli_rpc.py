"""`aurae-py SERVICE RPC` against a real auraed: exit statuses, output formats,
request files, enum flags, help text, completion and Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemon import DaemonProcess


@pytest.fixture
def cli_cell(daemon: DaemonProcess) -> Iterator[str]:
    name = "cli-cell"
    assert daemon.cli("cells", "allocate", name).returncode == 0
    try:
        yield name
    finally:
        daemon.cli("cells", "free", name)


def _cell_names(daemon: DaemonProcess) -> set[str]:
    with daemon.client() as client:
        return {node.cell.name for node in client.cells.list().cells}


@pytest.mark.parametrize(
    ("args", "status", "message"),
    [
        (("cells", "free", "no-such-cell"), 69, "NOT_FOUND: cell no-such-cell does not exist"),
        (("cells", "allocate", "Not A Name"), 67, "INVALID_ARGUMENT: invalid cell name"),
    ],
    ids=["not-found", "invalid-argument"],
)
def test_a_failed_rpc_exits_with_64_plus_its_status(
    daemon: DaemonProcess, args: tuple[str, ...], status: int, message: str
) -> None:
    result = daemon.cli(*args)
    assert result.returncode == status
    assert result.stderr.startswith(f"aurae-py: {message}")
    assert result.stdout == ""


def test_allocating_twice_exits_70(daemon: DaemonProcess, cli_cell: str) -> None:
    result = daemon.cli("cells", "allocate", cli_cell)
    assert result.returncode == 70
    assert "ALREADY_EXISTS" in result.stderr and "(field cell.name)" in result.stderr


def test_success_exits_0_and_prints_bools_as_proto_does(daemon: DaemonProcess) -> None:
    result = daemon.cli("discovery", "discover")
    assert result.returncode == 0
    assert "healthy: true" in result.stdout.splitlines()


def test_json_output_parses(daemon: DaemonProcess, cli_cell: str) -> None:
    result = daemon.cli("cells", "list", "-o", "json")
    assert result.returncode == 0
    assert {"cell": {"name": cli_cell}} in json.loads(result.stdout)["cells"]


def test_streams_print_json_lines(daemon: DaemonProcess, cli_cell: str) -> None:
    started = json.loads(
        daemon.cli("cells", "start", cli_cell, "count", "--command", "seq 1 3", "-o", "json").stdout
    )
    daemon.cli("cells", "wait", cli_cell, "count")
    result = daemon.cli("observe", "get-sub-process-stream", str(started["pid"]), "-o", "json")
    assert result.returncode == 0
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["item"]["line"] for line in lines] == ["1", "2", "3"]


def test_request_from_stdin(daemon: DaemonProcess) -> None:
    request = json.dumps({"cell": {"name": "cli-stdin", "cpu": {"weight": 300}}})
    # "" leaves the required NAME argument to the request.
    result = daemon.cli("cells", "allocate", "--request", "-", "", input=request)
    try:
        assert result.returncode == 0, result.stderr
        assert "cell_name: cli-stdin" in result.stdout
        with daemon.client() as client:
            [node] = [n for n in client.cells.list().cells if n.cell.name == "cli-stdin"]
        assert node.cell.cpu.weight == 300
    finally:
        daemon.cli("cells", "free", "cli-stdin")


def test_flags_override_the_request_file_and_yaml_works(daemon: DaemonProcess) -> None:
    result = daemon.cli(
        "cells",
        "allocate",
        "--request",
        "-",
        "cli-yaml",
        "--cpu-weight",
        "50",
        input="cell:\n  name: ignored\n  cpu: {weight: 10}\n",
    )
    try:
        assert result.returncode == 0, result.stderr
        assert "cli-yaml" in _cell_names(daemon)
        assert "ignored" not in _cell_names(daemon)
    finally:
        daemon.cli("cells", "free", "cli-yaml")


def test_a_malformed_request_file_is_a_usage_error(daemon: DaemonProcess) -> None:
    result = daemon.cli("cells", "allocate", "--request", "-", "x", input="cell: {")
    assert result.returncode == 2
    assert "--request is not valid JSON or YAML" in result.stderr


def test_enum_flags_take_short_and_full_names(daemon: DaemonProcess, cli_cell: str) -> None:
    started = json.loads(
        daemon.cli(
            "cells", "start", cli_cell, "both", "--command", "echo out; echo err >&2", "-o", "json"
        ).stdout
    )
    daemon.cli("cells", "wait", cli_cell, "both")
    pid = str(started["pid"])
    for name in ("stderr", "STDERR", "LOG_CHANNEL_TYPE_STDERR"):
        result = daemon.cli("observe", "get-sub-process-stream", pid, "--channel-type", name)
        assert result.stdout == "err\n", name
    bad = daemon.cli("observe", "get-sub-process-stream", pid, "--channel-type", "stdlog")
    assert bad.returncode == 2
    assert "'stdlog' is not one of unspecified, stdout, stderr" in bad.stderr


def test_help_shows_the_proto_comments(daemon: DaemonProcess) -> None:
    result = daemon.cli("cells", "allocate", "--help")
    assert "Reserve a new cell: create its cgroup with the requested limits" in result.stdout
    assert "Relative share of CPU time" in result.stdout


def test_completion_scripts_print(daemon: DaemonProcess) -> None:
    for shell in ("bash", "zsh", "fish"):
        result = daemon.cli("completion", shell)
        assert result.returncode == 0
        assert "_AURAE_PY_COMPLETE" in result.stdout
    # The script asks aurae-py itself; here is what it gets back.
    completed = subprocess.run(
        [sys.executable, "-m", "aurae_cli"],
        capture_output=True,
        text=True,
        check=True,
        env={
            **os.environ,
            "_AURAE_PY_COMPLETE": "bash_complete",
            "COMP_WORDS": "aurae-py cel",
            "COMP_CWORD": "1",
        },
    )
    assert completed.stdout.split() == ["plain,cells"]


def test_ctrl_c_ends_a_stream_quietly_with_130(daemon: DaemonProcess, cli_cell: str) -> None:
    started = json.loads(
        daemon.cli(
            "cells",
            "start",
            cli_cell,
            "tick",
            "--command",
            "while :; do echo tick; sleep 0.1; done",
            "-o",
            "json",
        ).stdout
    )
    follower = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "aurae_cli",
            "observe",
            "get-sub-process-stream",
            str(started["pid"]),
        ],
        env={**os.environ, "AURAE_CONFIG": daemon.config},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert follower.stdout is not None
        assert follower.stdout.readline() == "tick\n"
        follower.send_signal(signal.SIGINT)
        _, stderr = follower.communicate(timeout=15)
    finally:
        follower.kill()
        follower.wait()
    assert follower.returncode == 130
    assert stderr == ""


def test_a_closed_pipe_ends_a_stream_quietly(daemon: DaemonProcess, cli_cell: str) -> None:
    started = json.loads(
        daemon.cli(
            "cells", "start", cli_cell, "many", "--command", "seq 1 100000", "-o", "json"
        ).stdout
    )
    pipeline = subprocess.run(
        f"{sys.executable} -m aurae_cli observe get-sub-process-stream {started['pid']} "
        "| head -n 2; echo status=${PIPESTATUS[0]}",
        shell=True,
        executable="/bin/bash",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "AURAE_CONFIG": daemon.config},
    )
    assert pipeline.stdout.splitlines() == ["1", "2", "status=141"]
    assert pipeline.stderr == ""


@pytest.mark.parametrize("args", [("--help",), ("discovery", "discover")], ids=["help", "rpc"])
def test_the_cli_starts_without_the_repl_or_the_pki_libraries(
    daemon: DaemonProcess, args: tuple[str, ...]
) -> None:
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "aurae_cli", *args],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "AURAE_CONFIG": daemon.config},
    )
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()}
    assert not imported & {"ptpython", "prompt_toolkit", "jedi", "cryptography", "yaml"}
    if args == ("--help",):
        assert "grpc" not in imported


def test_an_optional_cell_name_may_be_left_out_for_host_level(
    daemon: DaemonProcess, cli_cell: str
) -> None:
    # CELL_NAME is proto3 `optional`: one positional names the executable, at host level.
    started = daemon.cli("cells", "start", "cli-host", "--command", "sleep 30", "-o", "json")
    assert started.returncode == 0, started.stderr
    pid = json.loads(started.stdout)["pid"]
    try:
        cgroups = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
        # At host level: a cgroup of its own below _host.
        assert any(f":/{daemon.cgroup_root}/_host/cli-host." in line for line in cgroups), cgroups
    finally:
        stopped = daemon.cli("cells", "stop", "cli-host", "--grace-period-ms", "0", "-o", "json")
    assert stopped.returncode == 0, stopped.stderr
    assert json.loads(stopped.stdout)["status"]["signal"] in (9, 15)

    # Two positionals still mean CELL_NAME NAME.
    inside = daemon.cli("cells", "start", cli_cell, "cli-in", "--command", "exit 4", "-o", "json")
    assert inside.returncode == 0, inside.stderr
    waited = daemon.cli("cells", "wait", cli_cell, "cli-in", "-o", "json")
    assert json.loads(waited.stdout)["status"]["exit_code"] == 4

    # A required positional is still demanded, with click's usage status.
    missing = daemon.cli("cells", "start", "--command", "true")
    assert missing.returncode == 2
    assert "Missing argument 'NAME'" in missing.stderr
    help_text = daemon.cli("cells", "start", "--help").stdout
    assert "[OPTIONS] [CELL_NAME] NAME" in help_text


# The CLI with the client's default deadline cut to 1 s: what `cells wait` does by default shows
# in seconds rather than the 30 s of the real default.
_SHORT_DEFAULT = (
    "import functools, runpy, sys, aurae_sdk.client as c; "
    "c.Client = functools.partial(c.Client, timeout=1); "
    "sys.argv = ['aurae-py', *sys.argv[1:]]; runpy.run_module('aurae_cli', run_name='__main__')"
)


def _cli_short_default(daemon: DaemonProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", _SHORT_DEFAULT, *args],
                          env={**os.environ, "AURAE_CONFIG": daemon.config},
                          capture_output=True, text=True, timeout=120, check=False)


def test_cells_wait_has_no_deadline_unless_asked(daemon: DaemonProcess) -> None:
    for timeout in ((), ("--timeout", "forever")):
        assert daemon.cli("cells", "start", "", "nap", "--command", "sleep 3").returncode == 0
        try:
            waited = _cli_short_default(daemon, "cells", "wait", "", "nap", *timeout, "-o", "json")
            assert waited.returncode == 0, waited.stderr
            status = json.loads(waited.stdout)["status"]
            assert status["state"] == "EXECUTABLE_STATE_EXITED", status
        finally:
            daemon.cli("cells", "stop", "", "nap")
    # A deadline the caller sets still counts.
    assert daemon.cli("cells", "start", "", "nap", "--command", "sleep 60").returncode == 0
    try:
        waited = daemon.cli("cells", "wait", "", "nap", "--timeout", "0.5")
        assert "DEADLINE_EXCEEDED" in waited.stderr
        refused = daemon.cli("cells", "wait", "", "nap", "--timeout", "soon")
        assert refused.returncode == 2 and "not a number of seconds or 'forever'" in refused.stderr
    finally:
        daemon.cli("cells", "stop", "", "nap", "--grace-period-ms", "0")


def test_cells_list_follows_every_page(daemon: DaemonProcess) -> None:
    """More cells than a page holds: `cells list` shows them all, nested as in the tree;
    `--page-token ''` shows the first page alone."""
    names = ["pg-a", "pg-a/inner", "pg-b", "pg-c", "pg-d"]
    with daemon.client() as client:
        for name in names:
            client.cells.allocate(cell={"name": name})
        try:
            first = client.cells.list(page_size=2)
            assert first.next_page_token  # the daemon really pages at this size
            listed = daemon.cli("cells", "list", "--page-size", "2", "-o", "json")
            assert listed.returncode == 0, listed.stderr
            tree = json.loads(listed.stdout)
            assert [c["cell"]["name"] for c in tree["cells"]] == ["pg-a", "pg-b", "pg-c", "pg-d"]
            assert [c["cell"]["name"] for c in tree["cells"][0]["children"]] == ["pg-a/inner"]
            assert not tree.get("nextPageToken") and not tree.get("next_page_token")
            text = daemon.cli("cells", "list", "--page-size", "2")
            assert text.returncode == 0, text.stderr
            assert all(name.rpartition("/")[2] in text.stdout for name in names)
            one = daemon.cli("cells", "list", "--page-size", "2", "--page-token", "", "-o",
                             "json")
            assert one.returncode == 0, one.stderr
            page = json.loads(one.stdout)
            assert len(page["cells"]) == 1 and (page.get("nextPageToken")
                                                or page.get("next_page_token"))
        finally:
            for name in ("pg-a", "pg-b", "pg-c", "pg-d"):
                client.cells.free(cell_name=name)


def test_cells_list_follows_pages_at_the_default_size(daemon: DaemonProcess) -> None:
    """Executables with 100 KiB command lines overflow the daemon's 1 MiB page: a plain
    `cells list` still reports every one of them."""
    padding = "x" * (100 * 1024)
    with daemon.client() as client:
        client.cells.allocate(cell={"name": "pg-big"})
        try:
            for index in range(12):
                client.cells.start(cell_name="pg-big", executable={
                    "name": f"big-{index}", "command": f"sleep 600 # {padding}"})
            assert client.cells.list().next_page_token  # one page does not hold them
            listed = daemon.cli("cells", "list", "-o", "json")
            assert listed.returncode == 0, listed.stderr
            (cell,) = json.loads(listed.stdout)["cells"]
            assert sorted(e["name"] for e in cell["executables"]) == sorted(
                f"big-{index}" for index in range(12))
        finally:
            client.cells.free(cell_name="pg-big")
