"""Scripts that fail clean up after themselves when asked (--cleanup, aurae_sdk.cleanup), and say
what they left otherwise; checked against a real auraed's cell tree and cgroup files."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import aurae_sdk
from tests.support.daemon import DaemonProcess

V1 = Path("/sys/fs/cgroup")

FAILING = """\
client.cells.allocate(cell={"name": "%(name)s"})
client.cells.allocate(cell={"name": "%(name)s/inner"})
client.cells.start(cell_name="%(name)s/inner", executable={"name": "w", "command": "sleep 300"})
print(client.cells.start(executable={"name": "%(name)s-host", "command": "sleep 300"}).host_pid)
client.cells.allocate(cell={"name": "%(name)s-freed"})
client.cells.free(cell_name="%(name)s-freed")
raise RuntimeError("the smoke test failed")
"""


def script(tmp_path: Path, body: str) -> str:
    path = tmp_path / "job.py"
    path.write_text(textwrap.dedent(body))
    return str(path)


def cells_on(client: aurae_sdk.Client) -> list[str]:
    return [node.cell.name for node in client.cells.list().cells]


def test_cleanup_frees_what_a_failing_script_allocated(daemon: DaemonProcess, client: aurae_sdk.Client,
                                                       tmp_path: Path) -> None:
    path = script(tmp_path, FAILING % {"name": "clean"})
    result = daemon.cli("--cleanup", path)
    assert result.returncode == 1
    assert "RuntimeError: the smoke test failed" in result.stderr
    assert ("aurae-py: cleaned up after the failure: freed cells clean, clean/inner; "
            "host executables clean-host") in result.stderr
    assert cells_on(client) == []
    assert not (V1 / "cpu" / daemon.cgroup_root / "clean").exists()
    host_pid = int(result.stdout.split()[0])
    assert not os.path.exists(f"/proc/{host_pid}")  # the host-level executable was stopped


def test_without_cleanup_a_failing_script_says_what_it_left(daemon: DaemonProcess,
                                                            client: aurae_sdk.Client,
                                                            tmp_path: Path) -> None:
    path = script(tmp_path, FAILING % {"name": "left"})
    result = daemon.cli("run", path)
    try:
        assert result.returncode == 1
        assert ("aurae-py: the script left on the node: cells left, left/inner; host executables "
                "left-host (run it with --cleanup") in result.stderr
        assert cells_on(client) == ["left"]
    finally:
        client.cells.stop(executable_name="left-host")
        client.cells.free(cell_name="left")


def test_cleanup_on_sigterm(daemon: DaemonProcess, client: aurae_sdk.Client, tmp_path: Path) -> None:
    path = script(tmp_path, """\
        import time
        client.cells.allocate(cell={"name": "termed"})
        print("allocated", flush=True)
        time.sleep(120)
    """)
    process = subprocess.Popen(
        [sys.executable, "-m", "aurae_cli", "run", "--cleanup", path],
        env={**os.environ, "AURAE_CONFIG": daemon.config},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline() == "allocated\n"
        assert cells_on(client) == ["termed"]
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 128 + signal.SIGTERM
    assert "cleaned up after the failure: freed cells termed" in stderr
    assert cells_on(client) == []


def test_cleanup_context_manager(daemon: DaemonProcess, client: aurae_sdk.Client) -> None:
    try:
        with aurae_sdk.cleanup(client) as allocated:
            client.cells.allocate(cell={"name": "ctx"})
            client.cells.allocate(cell={"name": "ctx/a"})
            assert allocated.cells == ["ctx", "ctx/a"]
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    assert cells_on(client) == []
    with aurae_sdk.cleanup(client) as allocated:
        client.cells.allocate(cell={"name": "kept"})
    try:
        assert cells_on(client) == ["kept"]  # a block that ends normally keeps its allocations
    finally:
        client.cells.free(cell_name="kept")
    deadline = time.monotonic() + 30
    while (V1 / "cpu" / daemon.cgroup_root / "ctx").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not (V1 / "cpu" / daemon.cgroup_root / "ctx").exists()
