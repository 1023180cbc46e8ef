"""`auraed spawn -o DIR` against Debian's runc: the bundle boots into a nested auraed that
answers Discover and runs a cell, and stopping the container leaves nothing."""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import aurae_sdk
from aurae_cli.pki import init_pki

pytestmark = pytest.mark.skipif(shutil.which("runc") is None, reason="runc is not installed")


def spawn(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "auraed", "spawn", *args],
                          capture_output=True, text=True, timeout=60, check=False)


def cgroups_named(name: str) -> list[str]:
    found = subprocess.run(["find", "/sys/fs/cgroup", "-maxdepth", "6", "-type", "d",
                            "-name", name], capture_output=True, text=True, check=False)
    return found.stdout.split()


def test_runc_boots_the_bundle_into_a_working_auraed() -> None:
    workdir = Path(tempfile.mkdtemp(prefix="aurae-bundle-", dir="/tmp"))
    container = f"aurae-bundle-{secrets.token_hex(4)}"
    bundle = workdir / "b"
    socket = bundle / "run" / "aurae.sock"
    pki = init_pki(workdir / "pki", socket=str(socket))
    runc: subprocess.Popen[bytes] | None = None
    try:
        written = spawn("-o", str(bundle), "--pki", str(pki.directory), "--name", "nested")
        assert written.returncode == 0, written.stderr
        config = json.loads((bundle / "config.json").read_text())
        assert config["process"]["args"][1:3] == ["-m", "auraed"]  # auraed is the init
        assert config["root"]["readonly"] is True
        kinds = {ns["type"] for ns in config["linux"]["namespaces"]}
        assert {"pid", "network", "ipc", "uts", "mount", "cgroup"} <= kinds
        keys = list((bundle / "rootfs" / "etc" / "aurae" / "pki").iterdir())
        assert pki.ca_key.read_bytes() not in [k.read_bytes() for k in keys]
        assert pki.server_key.read_bytes() not in [k.read_bytes() for k in keys]

        with open(workdir / "runc.log", "wb") as log:
            runc = subprocess.Popen(["runc", "run", "--bundle", str(bundle), container],
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        deadline = time.monotonic() + 60
        while not socket.exists():
            assert runc.poll() is None, (workdir / "runc.log").read_text()
            assert time.monotonic() < deadline, (workdir / "runc.log").read_text()
            time.sleep(0.05)
        with aurae_sdk.Client(str(pki.config), timeout=30) as client:
            answer = client.discovery.discover()
            assert answer.healthy and answer.version
            # A working daemon, not only a listener: a cell in the container's cgroup.
            client.cells.allocate(cell={"name": "web", "memory": {"max": 32 << 20}})
            started = client.cells.start(cell_name="web", executable={
                "name": "hi", "command": "echo inside; hostname"})
            lines = [r.item.line for r in client.observe.get_sub_process_stream(
                process_id=started.pid, channel_type="LOG_CHANNEL_TYPE_STDOUT", timeout=30)]
            assert lines == ["inside", "nested"]
        limits = [Path(d) / "memory.limit_in_bytes" for d in cgroups_named("web")
                  if f"/{container}/aurae/web" in d and "/memory/" in d]
        assert [int(p.read_text()) for p in limits] == [32 << 20]

        subprocess.run(["runc", "kill", container, "TERM"], check=True, timeout=30)
        assert runc.wait(60) == 0  # auraed as pid 1 shut down cleanly on SIGTERM
        assert "auraed stopped" in (workdir / "runc.log").read_text()
    finally:
        if runc is not None and runc.poll() is None:
            subprocess.run(["runc", "kill", container, "KILL"], check=False, timeout=30)
            runc.wait(60)
        subprocess.run(["runc", "delete", "-f", container], check=False, timeout=30,
                       capture_output=True)
        shutil.rmtree(workdir, ignore_errors=True)
    assert cgroups_named(container) == []


def test_spawn_refuses_bad_input_and_writes_nothing(tmp_path: Path) -> None:
    pki = init_pki(tmp_path / "pki")
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "file").write_text("x")
    refused = spawn("-o", str(occupied), "--pki", str(pki.directory))
    assert refused.returncode == 2 and "not empty" in refused.stderr
    assert sorted(p.name for p in occupied.iterdir()) == ["file"]
    no_ca = spawn("-o", str(tmp_path / "b1"), "--pki", str(tmp_path / "missing"))
    assert no_ca.returncode == 2 and "--pki" in no_ca.stderr
    assert not (tmp_path / "b1").exists()
    bad_name = spawn("-o", str(tmp_path / "b2"), "--pki", str(pki.directory), "--name", "a_b")
    assert bad_name.returncode == 2 and "invalid name" in bad_name.stderr
    assert not (tmp_path / "b2").exists()
