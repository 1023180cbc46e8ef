"""What operators reach for first, each through the real `aurae-py` against a real auraed: tables,
-o forms, human times, logs, run, units, help, error hints, --timeout, describe -o yaml,
completion, one-line REPL errors, help() on the SDK, and quiet progress off a terminal."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
import yaml

import aurae_sdk
from tests.support.daemon import DaemonProcess

V1 = Path("/sys/fs/cgroup")


@pytest.fixture
def web(client: aurae_sdk.Client) -> Iterator[str]:
    client.cells.allocate(cell={"name": "erg-web", "cpu": {"max": 50_000},
                                "memory": {"max": 256 << 20}, "labels": {"team": "a"}})
    client.cells.start(cell_name="erg-web", executable={"name": "app", "command": "sleep 300"})
    try:
        yield "erg-web"
    finally:
        client.cells.free(cell_name="erg-web")


def test_an_empty_list_says_so(daemon: DaemonProcess) -> None:
    result = daemon.cli("cells", "list")
    assert result.returncode == 0
    assert (result.stdout, result.stderr) == ("", "No cells found.\n")


def test_cells_list_is_a_table_with_wide_json_yaml_and_jsonpath(daemon: DaemonProcess,
                                                                 web: str) -> None:
    table = daemon.cli("cells", "list")
    assert table.returncode == 0, table.stderr
    header, row = table.stdout.splitlines()
    assert header.split() == ["NAME", "CPU", "MEMORY", "ISOLATION", "EXECUTABLES"]
    assert re.fullmatch(r"erg-web +max=0\.50cpu +max=256M +- +app \(running \d+s\)", row), row
    wide = daemon.cli("cells", "list", "-o", "wide").stdout.splitlines()
    assert wide[0].split()[-3:] == ["CPUSET", "OWNER", "LABELS"]
    assert wide[1].endswith("team=a")
    listed = json.loads(daemon.cli("cells", "list", "-o", "json").stdout)
    assert listed["cells"][0]["cell"]["memory"]["max"] == 256 << 20
    assert yaml.safe_load(daemon.cli("cells", "list", "-o", "yaml").stdout)["cells"][0]["cell"][
        "name"] == "erg-web"
    names = daemon.cli("cells", "list", "-o", "jsonpath={.cells[*].executables[*].name}")
    assert names.stdout == "app\n"
    raw = daemon.cli("cells", "list", "--timestamps").stdout.splitlines()[1]
    started = float(re.search(r"running since (\d+\.\d+)", raw)[1])  # type: ignore[index]
    assert abs(started - time.time()) < 600
    bad = daemon.cli("cells", "list", "-o", "xml")
    assert bad.returncode == 2 and "jsonpath=EXPR" in bad.stderr


def test_sizes_take_units_and_help_states_them(daemon: DaemonProcess,
                                               client: aurae_sdk.Client) -> None:
    made = daemon.cli("cells", "allocate", "erg-units", "--memory-max", "1G")
    assert made.returncode == 0, made.stderr
    try:
        limit = V1 / "memory" / daemon.cgroup_root / "erg-units" / "memory.limit_in_bytes"
        assert limit.read_text().strip() == str(1 << 30)
    finally:
        client.cells.free(cell_name="erg-units")
    bad = daemon.cli("cells", "allocate", "erg-units", "--memory-max", "12Q")
    assert bad.returncode == 2 and "'12Q' is not a size" in bad.stderr
    helped = " ".join(daemon.cli("cells", "allocate", "--help").stdout.split())
    assert "--memory-max SIZE" in helped and "Accepts 512K, 256M, 1G" in helped
    assert "1 to 10000" in helped and "1000 to 1000000" in helped


def test_every_command_has_examples_in_its_help() -> None:
    from aurae_cli.app import cli

    def commands(command: click.Command, path: list[str]) -> Iterator[tuple[str, click.Command]]:
        if isinstance(command, click.Group):
            context = click.Context(command)
            for name in command.list_commands(context):
                found = command.get_command(context, name)
                assert found is not None
                yield from commands(found, [*path, name])
        else:
            yield " ".join(path), command

    missing = [name for name, command in commands(cli, [])
               if "Examples:" not in command.get_help(click.Context(command, info_name=name))]
    assert missing == []
    assert "Examples:" in cli.get_help(click.Context(cli))


def test_connection_failures_point_at_doctor(daemon: DaemonProcess, tmp_path: Path) -> None:
    result = daemon.cli("--socket", str(tmp_path / "nothing.sock"), "cells", "list")
    assert result.returncode == 64 + 14
    assert result.stderr.startswith("aurae-py: UNAVAILABLE: ")
    assert result.stderr.splitlines()[-1] == (
        "hint: run `aurae-py doctor` to check the config, certificates and daemon")
    # Not every failure is about the connection.
    refused = daemon.cli("cells", "free", "erg-none")
    assert refused.returncode == 64 + 5 and "doctor" not in refused.stderr


def test_global_timeout(daemon: DaemonProcess, client: aurae_sdk.Client) -> None:
    client.cells.allocate(cell={"name": "erg-wait"})
    client.cells.start(cell_name="erg-wait", executable={"name": "w", "command": "sleep 300"})
    try:
        began = time.monotonic()
        waited = daemon.cli("--timeout", "1", "cells", "wait", "erg-wait", "w")
        assert waited.returncode == 64 + 4, waited.stderr
        assert "DEADLINE_EXCEEDED" in waited.stderr
        assert time.monotonic() - began < 25
    finally:
        client.cells.free(cell_name="erg-wait")


def test_describe_as_yaml(daemon: DaemonProcess) -> None:
    result = daemon.cli("describe", "Cell", "-o", "yaml")
    assert result.returncode == 0, result.stderr
    described = yaml.safe_load(result.stdout)
    assert described["full_name"] == "aurae.cells.v0.Cell"
    assert "labels" in [field["name"] for field in described["fields"]]


def test_logs_replay_stdout_and_stderr_in_the_order_written(daemon: DaemonProcess,
                                                            client: aurae_sdk.Client,
                                                            tmp_path: Path) -> None:
    # The process writes one line, then waits until the daemon has it before the next, so
    # every line has a later timestamp than the one before, whichever pipe it went to.
    gate = tmp_path / "gate"
    gate.mkdir()
    steps = [("err", "e1"), ("out", "o1"), ("err", "e2"), ("out", "o2"), ("out", "o3"),
             ("err", "e3")]
    script = "; ".join(
        f"echo {text}{' >&2' if pipe == 'err' else ''}; "
        f"while [ ! -e {gate}/{index} ]; do sleep 0.02; done"
        for index, (pipe, text) in enumerate(steps))
    client.cells.allocate(cell={"name": "erg-logs"})
    try:
        client.cells.start(cell_name="erg-logs",
                           executable={"name": "talk", "command": script + "; sleep 300"})
        for index, (_, text) in enumerate(steps):
            deadline = time.monotonic() + 60
            while text not in daemon.cli("logs", "erg-logs", "talk").stdout + \
                    daemon.cli("logs", "erg-logs", "talk").stderr:
                assert time.monotonic() < deadline, f"{text} never arrived"
                time.sleep(0.1)
            (gate / str(index)).touch()
        merged = subprocess.run(
            [sys.executable, "-m", "aurae_cli", "logs", "erg-logs", "talk"],
            env={**os.environ, "AURAE_CONFIG": daemon.config}, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, timeout=60, check=False)
        assert merged.stdout.split() == [text for _, text in steps]
        split = daemon.cli("logs", "erg-logs", "talk")
        assert (split.stdout.split(), split.stderr.split()) == (["o1", "o2", "o3"],
                                                                ["e1", "e2", "e3"])
        tail = daemon.cli("logs", "erg-logs", "talk", "--tail", "2", "--timestamps")
        lines = (tail.stdout + tail.stderr).splitlines()
        assert sorted(line.split()[1] for line in lines) == ["e3", "o3"]
        assert all(abs(int(line.split()[0]) - time.time()) < 600 for line in lines)
        assert daemon.cli("logs", "erg-logs", "talk", "--since", "2030-01-01T00:00:00").stdout \
            == ""
        missing = daemon.cli("logs", "erg-logs", "nope")
        assert missing.returncode == 64 + 5 and "it has: talk" in missing.stderr
    finally:
        client.cells.free(cell_name="erg-logs")


def test_logs_follow_until_exit(daemon: DaemonProcess, client: aurae_sdk.Client) -> None:
    client.cells.allocate(cell={"name": "erg-follow"})
    try:
        client.cells.start(cell_name="erg-follow", executable={
            "name": "count", "command": "for i in 1 2 3; do echo $i; sleep 0.3; done"})
        followed = daemon.cli("logs", "erg-follow", "count", "-f", "--tail", "1", timeout=60)
        assert followed.returncode == 0, followed.stderr
        lines = followed.stdout.split()
        assert lines[-1] == "3" and lines == sorted(lines) and len(set(lines)) == len(lines)
    finally:
        client.cells.free(cell_name="erg-follow")


def test_run_streams_and_exits_with_the_workload_status(daemon: DaemonProcess,
                                                        client: aurae_sdk.Client) -> None:
    result = daemon.cli("run", "--rm", "--", "sh", "-c", "echo out; echo err >&2; exit 3")
    assert result.returncode == 3
    assert result.stdout == "out\n"
    assert result.stderr.splitlines()[-1] == "err"
    assert [n.cell.name for n in client.cells.list().cells] == []  # --rm took its cell
    killed = daemon.cli("run", "--rm", "--", "sh", "-c", "kill -TERM $$")
    assert killed.returncode == 128 + 15
    kept = daemon.cli("run", "--cpu-max", "20000", "--memory-max", "64M", "--", "cat",
                      "/proc/self/cgroup")
    assert kept.returncode == 0, kept.stderr
    cell = re.search(r"running (run-[0-9a-f]+):", kept.stderr)[1]  # type: ignore[index]
    try:
        cpu_line = next(line for line in kept.stdout.splitlines()
                        if "cpu" in line.split(":")[1].split(","))
        assert f"/{daemon.cgroup_root}/{cell}/" in cpu_line
        base = V1 / "cpu" / daemon.cgroup_root / cell
        assert (base / "cpu.cfs_quota_us").read_text().strip() == "20000"
        memory = V1 / "memory" / daemon.cgroup_root / cell / "memory.limit_in_bytes"
        assert memory.read_text().strip() == str(64 << 20)
        assert f"aurae-py cells free {cell}" in kept.stderr
    finally:
        client.cells.free(cell_name=cell)
    # In an existing cell, with --name; a script path still means a script.
    client.cells.allocate(cell={"name": "erg-run"})
    try:
        named = daemon.cli("run", "--cell", "erg-run", "--name", "hello", "--", "echo", "hi")
        assert named.returncode == 0 and named.stdout == "hi\n"
        (node,) = [n for n in client.cells.list().cells if n.cell.name == "erg-run"]
        assert [e.name for e in node.executables] == ["hello"]
    finally:
        client.cells.free(cell_name="erg-run")
    usage = daemon.cli("run", "no-such-script.py")
    assert usage.returncode == 2 and "put -- before it" in usage.stderr


def test_completion_of_cells_executables_and_contexts(daemon: DaemonProcess, web: str,
                                                      tmp_path: Path) -> None:
    def complete(words: str) -> list[str]:
        env = {**os.environ, "AURAE_CONFIG": daemon.config, "_AURAE_PY_COMPLETE": "bash_complete",
               "COMP_WORDS": words, "COMP_CWORD": str(len(words.split(" ")) - 1)}
        done = subprocess.run([sys.executable, "-m", "aurae_cli"], env=env, capture_output=True,
                              text=True, timeout=60, check=False)
        return [line.split(",", 1)[1] for line in done.stdout.splitlines()]

    assert complete("aurae-py cells free erg") == ["erg-web"]
    assert complete("aurae-py logs erg-web a") == ["app"]
    assert complete("aurae-py cells stop erg-web ") == ["app"]
    config = tmp_path / "config"
    config.write_text(Path(daemon.config).read_text() +
                      '\n[contexts.edge-1.system]\nsocket = "10.0.0.1:8080"\n')
    env_config = str(config)
    contexts = subprocess.run(
        [sys.executable, "-m", "aurae_cli"], capture_output=True, text=True, timeout=60,
        env={**os.environ, "AURAE_CONFIG": env_config, "_AURAE_PY_COMPLETE": "bash_complete",
             "COMP_WORDS": "aurae-py --context default,e", "COMP_CWORD": "2"}, check=False)
    assert [line.split(",", 1)[1] for line in contexts.stdout.splitlines()] == ["default,edge-1"]


def test_vms_list_is_a_table_and_vm_ids_complete(daemon: DaemonProcess,
                                                client: aurae_sdk.Client) -> None:
    from aurae_sdk.declared import VirtualMachine

    empty = daemon.cli("vms", "list")
    assert empty.returncode == 0, empty.stderr
    assert (empty.stdout, empty.stderr) == ("", "No machines found.\n")
    # Allocated, not booted (this daemon boots no guest): enough to be listed and completed.
    client.vms.allocate(machine=VirtualMachine("erg-vm", memory_mb=128).message("erg"))
    try:
        table = daemon.cli("vms", "list")
        assert table.returncode == 0, table.stderr
        header, row = table.stdout.splitlines()
        assert header.split()[0] == "ID" and "STATUS" in header.split()
        assert row.split()[0] == "erg-vm"
        env = {**os.environ, "AURAE_CONFIG": daemon.config, "_AURAE_PY_COMPLETE": "bash_complete",
               "COMP_WORDS": "aurae-py vms start erg", "COMP_CWORD": "3"}
        done = subprocess.run([sys.executable, "-m", "aurae_cli"], env=env, capture_output=True,
                              text=True, timeout=60, check=False)
        assert [line.split(",", 1)[1] for line in done.stdout.splitlines()] == ["erg-vm"]
    finally:
        client.vms.free(vm_id="erg-vm")


def test_help_on_the_client_and_messages_shows_the_api(daemon: DaemonProcess) -> None:
    script = ("import pydoc\n"
              "print(pydoc.render_doc(aurae_sdk.Client, renderer=pydoc.plaintext))\n"
              "print(pydoc.render_doc(cells.Cell, renderer=pydoc.plaintext))\n")
    result = daemon.cli("run", "-", input=script)
    assert result.returncode == 0, result.stderr
    text = " ".join(word for word in result.stdout.split() if word != "|")
    assert "client.cells aurae.cells.v0.CellService" in text
    assert ".allocate(cell) Reserve a new cell" in text
    assert "-> stream Follow the stdout or stderr" in text
    assert "Fields: name (str): Path name of the cell" in text
    assert "labels (Mapping[str, str])" in text


def test_progress_is_quiet_off_a_terminal(daemon: DaemonProcess, client: aurae_sdk.Client,
                                          tmp_path: Path) -> None:
    manifest = tmp_path / "many.yaml"
    manifest.write_text("owner: erg\ncells:\n" + "".join(f"  - name: erg-m{i}\n" for i in range(4)))
    try:
        applied = daemon.cli("apply", "-f", str(manifest))
        assert applied.returncode == 0, applied.stderr
        assert applied.stderr == "" and "\x1b" not in applied.stdout
    finally:
        daemon.cli("delete", "-f", str(manifest))
    assert [n.cell.name for n in client.cells.list().cells] == []


def test_the_repl_prints_one_line_for_an_api_error(daemon: DaemonProcess, tmp_path: Path) -> None:
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(sys.executable, ["-m", "aurae_cli"], encoding="utf-8", timeout=30,
                          dimensions=(50, 160),
                          env={**os.environ, "AURAE_CONFIG": daemon.config, "TERM": "dumb",
                               "AURAE_PY_HISTORY": str(tmp_path / "history"),
                               "PROMPT_TOOLKIT_NO_CPR": "1"})
    try:
        child.expect(">>>")
        child.sendline('client.cells.free(cell_name="erg-nope")')
        child.expect(r"aurae-py: NOT_FOUND: cell erg-nope does not exist \(field cell_name\)")
        child.expect(r"tb\(\) shows the traceback")
        child.expect(">>>")
        before = child.before
        assert "Traceback" not in before
        child.sendline("tb()")
        child.expect("Traceback")
        child.expect("NotFound")
        child.expect(">>>")
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        if child.isalive():
            child.kill(9)
        child.close()
