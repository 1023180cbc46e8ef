"""Every script in examples/ runs through `aurae-py` (its shebang) against a
real auraed, and what it claims to do is checked on the host."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import aurae_sdk
from tests.support.daemon import DaemonProcess, cgroup_dirs

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
V1 = Path("/sys/fs/cgroup")


def run_example(daemon: DaemonProcess, name: str, *args: str, timeout: float = 90,
                tmpdir: Path | None = None) -> str:
    env = {**os.environ, "AURAE_CONFIG": daemon.config,
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    if tmpdir is not None:
        env["TMPDIR"] = str(tmpdir)
    result = subprocess.run([str(EXAMPLES / name), *args], env=env, capture_output=True,
                            text=True, timeout=timeout, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def no_cells(client: aurae_sdk.Client) -> bool:
    return not client.cells.list().cells


def test_every_example_is_an_executable_aurae_py_script() -> None:
    for script in EXAMPLES.glob("*.py"):
        assert script.read_text().startswith("#!/usr/bin/env aurae-py\n"), script
        assert os.access(script, os.X_OK), script


def test_discovery(daemon: DaemonProcess) -> None:
    assert run_example(daemon, "discovery.py") == f"auraed {aurae_sdk.__version__} healthy=True\n"


def test_health(daemon: DaemonProcess) -> None:
    lines = run_example(daemon, "health.py").splitlines()
    assert len(lines) == 4 and all(line.endswith("SERVING") for line in lines)


def test_cpu_quota_holds_the_cell_to_a_fifth_of_a_cpu(daemon: DaemonProcess, client: aurae_sdk.Client) -> None:
    output = run_example(daemon, "cpu_quota.py", "--keep")
    assert "weight=50 max=20000us per 100000us" in output
    try:
        cell = daemon.cgroup_root + "/cpu-quota"
        assert (V1 / "cpu" / cell / "cpu.cfs_quota_us").read_text().strip() == "20000"
        assert (V1 / "cpu" / cell / "cpu.shares").read_text().strip() == "512"
        usage = V1 / "cpuacct" / cell / "cpuacct.usage"
        before, began = int(usage.read_text()), time.monotonic()
        time.sleep(1.0)
        used = (int(usage.read_text()) - before) / 1e9 / (time.monotonic() - began)
        # A busy loop alone would use a whole CPU; the quota allows 0.2.
        assert 0.05 < used < 0.3, used
    finally:
        client.cells.free(cell_name="cpu-quota")


def test_memory_limit_ends_in_an_oom_kill(daemon: DaemonProcess, client: aurae_sdk.Client) -> None:
    output = run_example(daemon, "memory_limit.py")
    assert "killed by the OOM killer (signal 9)" in output
    assert no_cells(client)


def test_nested_cells(daemon: DaemonProcess, client: aurae_sdk.Client) -> None:
    output = run_example(daemon, "nested_cells.py")
    assert output.splitlines() == [
        "team  cpu.max=100000",
        "  team/batch  cpu.max=30000",
        "  team/web  cpu.max=60000  [server]",
        "freed team and everything in it: True",
    ]
    assert not any((d / "team").exists() for d in cgroup_dirs(daemon.cgroup_root))


def test_isolation(daemon: DaemonProcess, client: aurae_sdk.Client) -> None:
    output = run_example(daemon, "isolation.py")
    assert "hostname: sandbox" in output
    processes = re.search(r"processes: (.*)", output).group(1).split()  # type: ignore[union-attr]
    assert processes[0] == "1" and all(int(p) < 50 for p in processes)
    assert re.search(r"devices: lo\s", output) and output.count("LOOPBACK") == 1
    assert "client got: hello over the cell loopback" in output
    assert no_cells(client)


def test_output_streams_both_channels_in_order(daemon: DaemonProcess) -> None:
    lines = run_example(daemon, "output.py").splitlines()
    stdout = [line.split("| ")[1] for line in lines if "talker::stdout" in line]
    stderr = [line.split("| ")[1] for line in lines if "talker::stderr" in line]
    assert stdout == ["line 1", "line 2", "line 3"]
    assert stderr == ["warning 1", "warning 2", "warning 3"]
    assert lines[-1] == "talker exited with 0"


def test_async_fanout_uses_top_level_await(daemon: DaemonProcess, client: aurae_sdk.Client) -> None:
    assert run_example(daemon, "async_fanout.py").splitlines() == [
        "job1 exited with 1", "job2 exited with 2", "job3 exited with 3"]
    assert no_cells(client)



def test_ci_pipeline_deploys_smoke_tests_collects_logs_and_tears_down(
        daemon: DaemonProcess, client: aurae_sdk.Client, tmp_path: Path) -> None:
    # Its scratch files go where this test looks, not in a /tmp that other runs share.
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    output = run_example(daemon, "ci_pipeline.py", "--artifacts", str(tmp_path), tmpdir=scratch)
    lines = output.splitlines()
    assert lines[0] == ("deploy: Plan: 3 to create, 0 to update, 0 to replace, 0 to delete, "
                        "0 unchanged.")
    assert lines[1].startswith("health: serving on 127.0.0.1:")
    assert lines[2] == "smoke: /healthz answered 'ok', cpu.max 50000: pass"
    log = tmp_path / "ci-site.web.log"
    assert lines[3] == f"logs: saved {log}"
    assert lines[4] == "teardown: freed ci-site"
    # http.server logs each request to stderr: the health polls and the smoke test are there.
    assert '"GET /healthz HTTP/1.1" 200' in log.read_text()
    port = lines[1].removeprefix("health: serving on 127.0.0.1:").split()[0]
    assert f'"GET /healthz?smoke={port} HTTP/1.1" 200' in log.read_text()
    assert no_cells(client)
    assert not list(scratch.iterdir())  # its scratch site went with it
    assert not any((d / "ci-site").exists() for d in cgroup_dirs(daemon.cgroup_root))


def test_ci_pipeline_fails_and_still_tears_down(daemon: DaemonProcess, client: aurae_sdk.Client,
                                                tmp_path: Path) -> None:
    env = {**os.environ, "AURAE_CONFIG": daemon.config,
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    result = subprocess.run([str(EXAMPLES / "ci_pipeline.py"), "--artifacts", str(tmp_path),
                             "--expect", "wrong"], env=env, capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "smoke: /healthz answered 'ok', expected 'wrong': FAIL" in result.stdout
    assert "teardown: freed ci-site" in result.stdout
    assert no_cells(client)
