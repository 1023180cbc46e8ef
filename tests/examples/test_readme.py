"""The README's code runs as written against a real auraed and leaves nothing behind."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import aurae_sdk
from tests.support.daemon import DaemonProcess, cgroup_dirs

README = Path(__file__).resolve().parents[2] / "README.md"


def block_after(heading: str, language: str) -> str:
    text = README.read_text()
    section = text[text.index(heading):]
    match = re.search(rf"```{language}\n(.*?)```", section, re.DOTALL)
    assert match is not None, f"no {language} block after {heading!r}"
    return match.group(1)


def run(daemon: DaemonProcess, argv: list[str], source: str, tmp_path: Path) -> str:
    script = tmp_path / "snippet.py"
    script.write_text(source)
    env = {**os.environ, "AURAE_CONFIG": daemon.config,
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    result = subprocess.run([*argv, str(script)], env=env, capture_output=True, text=True,
                            timeout=120, check=False, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def left(daemon: DaemonProcess, client: aurae_sdk.Client) -> list[str]:
    cells = [node.cell.name for node in client.cells.list().cells]
    running = [f":{e.name}" for page in aurae_sdk.list_pages(client)
               for e in page.host_executables if e.state == 1]
    return cells + running + [str(d) for d in cgroup_dirs(daemon.cgroup_root)
                              for _ in d.glob("*/_procs")]


def test_the_sdk_snippet(daemon: DaemonProcess, client: aurae_sdk.Client, tmp_path: Path) -> None:
    output = run(daemon, [sys.executable], block_after("## Using the SDK", "python"), tmp_path)
    assert output.splitlines() == ["hello", "NOT_FOUND cell nope does not exist cell_name"]
    assert left(daemon, client) == []


def test_the_script_at_the_top(daemon: DaemonProcess, client: aurae_sdk.Client,
                               tmp_path: Path) -> None:
    output = run(daemon, [str(Path(sys.executable).parent / "aurae-py")],
                 block_after("# aurae-py", "python"), tmp_path)
    assert output.splitlines() == ["hi", "3"]
    assert left(daemon, client) == []


def test_the_manifest_plans(daemon: DaemonProcess, client: aurae_sdk.Client,
                            tmp_path: Path) -> None:
    manifest = tmp_path / "node.yaml"
    manifest.write_text(block_after("## Declared state", "yaml"))
    result = daemon.cli("diff", "-f", str(manifest))
    assert result.returncode == 2, result.stderr
    assert "+ create   cell       web" in result.stdout
    assert "+ create   executable web:app" in result.stdout
    assert "+ create   executable :agent" in result.stdout
    assert "+ create   instance   build-1" in result.stdout
    assert "+ create   cell       [build-1] job" in result.stdout
    assert "+ create   vm         ci-vm" in result.stdout
    assert left(daemon, client) == []
