"""aurae-py scripts against a real auraed: the shebang, top-level await,
arguments, the preloaded names, and how failures end a script."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.support.daemon import DaemonProcess

VENV_BIN = Path(sys.executable).parent


def write_script(directory: Path, name: str, body: str) -> Path:
    path = directory / name
    path.write_text("#!/usr/bin/env aurae-py\n" + textwrap.dedent(body))
    path.chmod(0o755)
    return path


def run(
    argv: list[str], daemon: DaemonProcess | None, cwd: Path, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}"}
    env.pop("AURAE_CONFIG", None)
    if daemon is not None:
        env["AURAE_CONFIG"] = daemon.config
    return subprocess.run(
        argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=60, input=stdin, check=False
    )


def test_a_shebang_script_with_top_level_await(daemon: DaemonProcess, tmp_path: Path) -> None:
    script = write_script(
        tmp_path,
        "allocate.py",
        """\
        import sys
        name = sys.argv[1]
        await aclient.cells.allocate(cell=cells.Cell(name=name, cpu=cells.CpuController(weight=150)))
        try:
            started = await aclient.cells.start(
                cell_name=name, executable={"name": "hi", "command": "echo hello"})
            async for item in logs.afollow(aclient, started.pid, "stdout"):
                print("got", item.line)
            listed = await aclient.cells.list()
            print("weights", [n.cell.cpu.weight for n in listed.cells if n.cell.name == name])
        finally:
            await aclient.cells.free(cell_name=name)
        print("args", sys.argv[1:], __name__, __file__ == sys.argv[0])
    """,
    )
    result = run([str(script), "script-async", "--flag", "-x"], daemon, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "got hello",
        "weights [150]",
        "args ['script-async', '--flag', '-x'] __main__ True",
    ]
    assert result.stderr == ""


def test_a_sync_script(daemon: DaemonProcess, tmp_path: Path) -> None:
    script = write_script(
        tmp_path,
        "sync.py",
        """\
        client.cells.allocate(cell={"name": "script-sync"})
        try:
            started = client.cells.start(cell_name="script-sync",
                                         executable={"name": "count", "command": "seq 1 3"})
            show(client.observe.get_sub_process_stream(process_id=started.pid))
            status = client.cells.wait(cell_name="script-sync", executable_name="count").status
            print("exit", status.exit_code, cells.ExecutableState.Name(status.state))
        finally:
            client.cells.free(cell_name="script-sync")
    """,
    )
    result = run(["aurae-py", str(script.name)], daemon, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["1", "2", "3", "exit 0 EXECUTABLE_STATE_EXITED"]


def test_an_uncaught_aurae_error_is_one_line_and_the_status_exit(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    script = write_script(
        tmp_path,
        "free.py",
        """\
        print("freeing")

        def free(name):
            client.cells.free(cell_name=name)

        free("no-such-cell")
    """,
    )
    result = run([str(script)], daemon, tmp_path)
    assert result.returncode == 64 + 5
    assert result.stdout == "freeing\n"
    # The line of the script where the failing call was made, not the SDK's.
    assert result.stderr == (
        f"aurae-py: {script}:5: NOT_FOUND: cell no-such-cell does not exist (field cell_name)\n"
    )


def test_the_same_from_an_async_script_run_with_the_run_command(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    write_script(
        tmp_path,
        "bad.py",
        """\
        await aclient.cells.allocate(cell={"name": "Bad Name"})
    """,
    )
    result = run(["aurae-py", "run", "bad.py"], daemon, tmp_path)
    assert result.returncode == 64 + 3
    assert result.stderr.startswith("aurae-py: bad.py:2: INVALID_ARGUMENT: ")
    assert result.stderr.endswith("(field cell.name)\n")
    assert len(result.stderr.splitlines()) == 1


def test_other_exceptions_print_the_script_traceback(tmp_path: Path) -> None:
    script = write_script(
        tmp_path,
        "boom.py",
        """\
        def explode():
            raise RuntimeError("boom")
        explode()
    """,
    )
    result = run([str(script)], None, tmp_path)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "Traceback (most recent call last):",
        f'  File "{script}", line 4, in <module>',
        "    explode()",
        f'  File "{script}", line 3, in explode',
        '    raise RuntimeError("boom")',
        "RuntimeError: boom",
    ]


def test_a_script_that_never_calls_the_daemon_needs_no_config(tmp_path: Path) -> None:
    script = write_script(
        tmp_path,
        "offline.py",
        """\
        import sys
        print(cells.Cell(name="web").name, client)
        sys.exit(7)
    """,
    )
    result = run([str(script)], None, tmp_path)
    assert result.stdout == "web <aurae_sdk.Client, opened on first use>\n"
    assert result.returncode == 7


def test_a_missing_config_is_reported_where_the_client_was_first_used(tmp_path: Path) -> None:
    script = write_script(
        tmp_path,
        "needs.py",
        """\
        print("before")
        client.discovery.discover()
    """,
    )
    result = run([str(script)], None, tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith(f"aurae-py: {script}:3: ")
    assert "no Aurae client config found" in result.stderr or "does not exist" in result.stderr


def test_global_options_come_before_the_script(daemon: DaemonProcess, tmp_path: Path) -> None:
    script = write_script(tmp_path, "where.py", "print(client.config.socket)\n")
    result = run(
        ["aurae-py", "--config", daemon.config, "--socket", daemon.socket, str(script)],
        None,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{daemon.socket}\n"


def test_a_script_from_stdin(daemon: DaemonProcess, tmp_path: Path) -> None:
    result = run(
        ["aurae-py"], daemon, tmp_path, stdin="print(client.discovery.discover().healthy)\n"
    )
    assert (result.returncode, result.stdout) == (0, "True\n")


def test_a_syntax_error_points_at_the_script(tmp_path: Path) -> None:
    script = write_script(tmp_path, "broken.py", "x = (\n")
    result = run([str(script)], None, tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith(f'  File "{script}", line 2')
    assert "SyntaxError" in result.stderr


def test_ctrl_c_ends_a_script_quietly_with_130(daemon: DaemonProcess, tmp_path: Path) -> None:
    script = write_script(
        tmp_path,
        "forever.py",
        """\
        client.cells.allocate(cell={"name": "script-forever"})
        try:
            started = client.cells.start(cell_name="script-forever", executable={
                "name": "tick", "command": "while :; do echo tick; sleep 0.1; done"})
            for item in logs.follow(client, started.pid):
                print(item.line, flush=True)
        finally:
            client.cells.free(cell_name="script-forever")
            print("freed", flush=True)
    """,
    )
    env = {
        **os.environ,
        "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}",
        "AURAE_CONFIG": daemon.config,
    }
    process = subprocess.Popen(
        [str(script)],
        env=env,
        cwd=tmp_path,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline() == "tick\n"
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == 130
    assert stdout.splitlines()[-1] == "freed"
    assert stderr == ""


@pytest.mark.parametrize("name", ["cells", "describe"])
def test_a_command_name_wins_over_a_file_of_that_name(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_text("print('script')\n")
    result = run(["aurae-py", name, "--help"], None, tmp_path)
    assert result.returncode == 0
    assert "script" not in result.stdout.splitlines()
    assert "Usage: aurae-py " + name in result.stdout


def test_script_names_are_importable_and_bound_to_the_runners_clients(daemon: DaemonProcess, tmp_path: Path) -> None:
    """`from aurae_sdk.script import client` under aurae-py is the runner's own
    client, and under plain python it connects from the config by itself."""
    script = tmp_path / "typed.py"
    script.write_text(
        "import aurae_sdk.script as names\n"
        "from aurae_sdk.script import client\n"
        "print(client.discovery.discover().healthy)\n"
        "print(names.client is globals().get('client'))\n"
    )
    env = {**os.environ, "AURAE_CONFIG": daemon.config}
    under_aurae = subprocess.run([sys.executable, "-m", "aurae_cli", str(script)], env=env,
                                 capture_output=True, text=True, timeout=60, check=False)
    assert under_aurae.stdout.split() == ["True", "True"], under_aurae.stderr
    plain = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                           timeout=60, check=False)
    assert plain.stdout.split()[0] == "True", plain.stderr
