#!/usr/bin/env aurae-py
"""A CI pipeline against a node: deploy from a manifest, wait for health, smoke-test, collect
logs, tear down, and exit with the status the pipeline earned.

    ./ci_pipeline.py --artifacts out/          # 0 when the smoke test passes
    ./ci_pipeline.py --expect wrong            # a failing smoke test: exits 1, still tears down

Every step prints one line, as CI logs like it. The node is left as it was found: the manifest's
cells are deleted whatever happened (`aurae_sdk.delete`), and the logs are saved first.
"""

import argparse
import shutil
import socket
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import aurae_sdk
from aurae_sdk.manifest import loads
from aurae_sdk.script import client

MANIFEST = Path(__file__).resolve().parent / "ci" / "site.yaml"
HEALTH_DEADLINE = 60.0  # seconds; generous, the machine may be busy


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for_health(url: str) -> float:
    began = time.monotonic()
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return time.monotonic() - began
        except OSError:
            pass
        if time.monotonic() - began > HEALTH_DEADLINE:
            raise TimeoutError(f"{url} not healthy after {HEALTH_DEADLINE:.0f} s")
        time.sleep(0.1)


def collect_logs(node_cell: str, executable: str, artifacts: Path) -> Path:
    """The executable's stdout and stderr so far, in the order written, into a file."""
    (status,) = [e for n in aurae_sdk.list_cells(client) if n.cell.name == node_cell
                 for e in n.executables if e.name == executable]
    stream = client.observe.get_sub_process_stream(process_id=status.host_pid, replay_only=True)
    path = artifacts / f"{node_cell}.{executable}.log"
    with path.open("w") as file:
        for response in stream:
            file.writelines(f"{item.channel} {item.line}\n" for item in response.items)
            if response.HasField("item"):
                file.write(f"{response.item.channel} {response.item.line}\n")
    return path


parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--artifacts", type=Path, default=Path("ci-artifacts"),
                    help="where to save the logs (default: ./ci-artifacts)")
parser.add_argument("--expect", default="ok", help="what /healthz must answer (smoke test)")
options = parser.parse_args()

site = Path(tempfile.mkdtemp(prefix="ci-site-"))
(site / "healthz").write_text("ok\n")
artifacts = options.artifacts
artifacts.mkdir(parents=True, exist_ok=True)
port = free_port()
node = loads(MANIFEST.read_text().replace("${PORT}", str(port)).replace("${SITE}", str(site)),
             str(MANIFEST))

status = 1
try:
    plan = aurae_sdk.apply(client, node)
    print(f"deploy: {plan.summary()}")
    took = wait_for_health(f"http://127.0.0.1:{port}/healthz")
    print(f"health: serving on 127.0.0.1:{port} after {took:.1f} s")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as response:
        body = response.read().decode().strip()
    limits = {n.cell.name: n.cell.cpu.max for n in aurae_sdk.list_cells(client)}
    if body == options.expect and limits.get("ci-site") == 50_000:
        print(f"smoke: /healthz answered {body!r}, cpu.max {limits['ci-site']}: pass")
        status = 0
    else:
        print(f"smoke: /healthz answered {body!r}, expected {options.expect!r}: FAIL")
finally:
    try:
        print(f"logs: saved {collect_logs('ci-site', 'web', artifacts)}")
    finally:
        removed = aurae_sdk.delete(client, node)
        shutil.rmtree(site, ignore_errors=True)
        print(f"teardown: freed {', '.join(s.name for s in removed.changes) or 'nothing'}")
sys.exit(status)
