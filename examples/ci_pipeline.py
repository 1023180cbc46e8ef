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
LOG_DEADLINE = 10.0


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


def collect_logs(node_cell: str, executable: str, artifacts: Path, until: str) -> Path:
    """The executable's stdout and stderr, in the order written, into a file: what it wrote
    up to its first line containing `until` (or all it wrote within LOG_DEADLINE).

    Output reaches the node a moment after the process writes it (the spawner holding the
    pipes reports it to the daemon), so a replay taken just after a request can miss the line
    the request logged: the stream is followed until that line has come.
    """
    (status,) = [e for n in aurae_sdk.list_cells(client) if n.cell.name == node_cell
                 for e in n.executables if e.name == executable]
    stream = client.observe.get_sub_process_stream(process_id=status.host_pid,
                                                   timeout=LOG_DEADLINE)
    path = artifacts / f"{node_cell}.{executable}.log"
    with path.open("w") as file:
        try:
            for response in stream:
                items = [*response.items, *([response.item] if response.HasField("item") else [])]
                file.writelines(f"{item.channel} {item.line}\n" for item in items)
                if any(until in item.line for item in items):
                    break
        except aurae_sdk.DeadlineExceeded:
            pass  # saved what came
        finally:
            stream.cancel()
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
smoke = "/healthz"
try:
    plan = aurae_sdk.apply(client, node)
    print(f"deploy: {plan.summary()}")
    took = wait_for_health(f"http://127.0.0.1:{port}/healthz")
    print(f"health: serving on 127.0.0.1:{port} after {took:.1f} s")
    smoke = f"/healthz?smoke={port}"  # the request the server's log must show
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{smoke}", timeout=10) as response:
        body = response.read().decode().strip()
    limits = {n.cell.name: n.cell.cpu.max for n in aurae_sdk.list_cells(client)}
    if body == options.expect and limits.get("ci-site") == 50_000:
        print(f"smoke: /healthz answered {body!r}, cpu.max {limits['ci-site']}: pass")
        status = 0
    else:
        print(f"smoke: /healthz answered {body!r}, expected {options.expect!r}: FAIL")
finally:
    try:
        print(f"logs: saved {collect_logs('ci-site', 'web', artifacts, f'GET {smoke} ')}")
    finally:
        removed = aurae_sdk.delete(client, node)
        shutil.rmtree(site, ignore_errors=True)
        print(f"teardown: freed {', '.join(s.name for s in removed.changes) or 'nothing'}")
sys.exit(status)
