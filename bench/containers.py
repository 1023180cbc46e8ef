"""Containers: an image's container started to its exit, against `runc run` of the same image.

Ours, two ways: (1) the Standard Library — Allocate an isolated cell, Start the image's
container running `true` (overlayfs over the stored layers, pivot_root, /proc /dev /sys),
Wait, Free; (2) the CRI — RunPodSandbox (a spawned instance per pod, forked from the warm
template, whose own CRI runs the container as its cell), CreateContainer, StartContainer, poll
ContainerStatus until EXITED, RemovePodSandbox; also pods back to back, pods spaced 0.3 s
apart (their spare refilled just before) and a burst of pods started at once. Theirs: `runc
run` of a bundle whose rootfs is the same image's layers (the store's unpacked layers, mounted
read-only as one overlay for the run), with runc's default namespaces, running `true`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

import aurae_sdk
from auraed.cri.generated import api_pb2 as cri
from auraed.cri.generated import api_pb2_grpc as cri_grpc
from auraed.kernel.libc import MNT_DETACH, MS_RDONLY, mount_with_data, umount2
from bench.core import Comparison, Figure, Mode, Result, Series, interleave
from tests.support.daemon import running_daemon

ROOT = Path(__file__).resolve().parent.parent
IMAGE = "localhost/aurae/busybox:latest"
BURST = 4
SMOKE_BURST = 2  # still more than the one spare
# Between spaced pods: the spare is refilled after 0.1-0.2 s of quiet (auraed.cri.pod_instances),
# so the next pod finds it ready but only just.
SPACING = 0.3


def _build_image(directory: Path) -> Path:
    layout = directory / "layout"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "busybox_image.py"), str(layout)],
                   check=True, capture_output=True)
    return layout


def _runc_bundle(directory: Path, layers: list[Path]) -> Path:
    bundle = directory / "bundle"
    (bundle / "rootfs").mkdir(parents=True)
    # Lowers only (topmost first), no upper: a read-only overlay, as runc's root.readonly wants.
    options = "lowerdir=" + ":".join(str(p) for p in reversed(layers))
    mount_with_data("overlay", str(bundle / "rootfs"), "overlay", MS_RDONLY, options)
    subprocess.run(["runc", "spec"], cwd=bundle, check=True)
    config = json.loads((bundle / "config.json").read_text())
    config["process"]["terminal"] = False
    config["process"]["args"] = ["true"]
    config["process"]["env"] = ["PATH=/bin"]
    config["root"]["readonly"] = True
    (bundle / "config.json").write_text(json.dumps(config))
    return bundle


def _cri_lifecycle(runtime: cri_grpc.RuntimeServiceStub, name: str) -> float:
    sandbox = cri.PodSandboxConfig(metadata=cri.PodSandboxMetadata(
        name=name, uid=name, namespace="bench"), hostname=name)
    begin = time.perf_counter()
    sandbox_id = runtime.RunPodSandbox(cri.RunPodSandboxRequest(config=sandbox),
                                       timeout=30).pod_sandbox_id
    container_id = runtime.CreateContainer(cri.CreateContainerRequest(
        pod_sandbox_id=sandbox_id, sandbox_config=sandbox, config=cri.ContainerConfig(
            metadata=cri.ContainerMetadata(name="c"), image=cri.ImageSpec(image=IMAGE),
            command=["true"])), timeout=30).container_id
    runtime.StartContainer(cri.StartContainerRequest(container_id=container_id), timeout=30)
    # Polled every millisecond: the CRI has no Wait, and a coarser poll would time the poll.
    while runtime.ContainerStatus(cri.ContainerStatusRequest(container_id=container_id),
                                  timeout=30).status.state != cri.CONTAINER_EXITED:
        time.sleep(0.001)
    runtime.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id), timeout=30)
    return (time.perf_counter() - begin) * 1e3


def _cells_lifecycle(client: aurae_sdk.Client, name: str) -> float:
    begin = time.perf_counter()
    client.cells.allocate(cell={"name": name, "isolate_process": True, "isolate_network": True})
    client.cells.start(cell_name=name, executable={"name": "t", "command": "true",
                                                   "image": IMAGE})
    client.cells.wait(cell_name=name, executable_name="t", timeout=30)
    client.cells.free(cell_name=name)
    return (time.perf_counter() - begin) * 1e3


def run(mode: Mode) -> list[Result]:
    runs = mode.pick(full=40, quick=10, smoke=1)
    pods_at_once = mode.pick(full=BURST, quick=BURST, smoke=SMOKE_BURST)
    spaced_runs = mode.pick(full=15, quick=5, smoke=1)
    cells = Series("Allocate isolated cell + Start image container `true` + Wait + Free", "ms")
    pods = Series("CRI: RunPodSandbox + Create + Start + status until EXITED + Remove "
                  "(a spare claimed)", "ms")
    bare = Series("CRI: the same, spares off (--cri-pod-spares 0)", "ms")
    spaced = Series(f"CRI: the same, each pod {SPACING * 1e3:.0f} ms after the last ended",
                    "ms")
    runc = Series("runc run (same image layers as a read-only overlay, `true`)", "ms")
    with tempfile.TemporaryDirectory(prefix="aurae-bench-containers-") as tmp:
        where = Path(tmp)
        layout = _build_image(where)
        socket, bare_socket = where / "cri.sock", where / "cri-bare.sock"
        with running_daemon("--cri-socket", str(socket)) as daemon, daemon.client() as client, \
                running_daemon("--cri-socket", str(bare_socket), "--cri-pod-spares",
                               "0") as bare_daemon, bare_daemon.client() as bare_client, \
                grpc.insecure_channel(f"unix:{socket}") as channel, \
                grpc.insecure_channel(f"unix:{bare_socket}") as bare_channel:
            client.images.import_(file_name=str(layout))
            bare_client.images.import_(file_name=str(layout))
            layers = sorted((daemon.workdir / "lib" / "images" / "layers" / "sha256").iterdir())
            manifest = client.images.inspect(image_name=IMAGE).image
            by_diff = {p.name: p for p in layers}
            ordered = [by_diff[layer.diff_id.removeprefix("sha256:")]
                       for layer in manifest.layers]
            bundle = _runc_bundle(where, ordered)
            runtime = cri_grpc.RuntimeServiceStub(channel)
            bare_runtime = cri_grpc.RuntimeServiceStub(bare_channel)
            counter = iter(range(10**9))

            def runc_run() -> float:
                begin = time.perf_counter()
                subprocess.run(["runc", "run", "--bundle", str(bundle),
                                f"aurae-bench-c{next(counter)}"], check=True,
                               stdin=subprocess.DEVNULL)
                return (time.perf_counter() - begin) * 1e3

            try:
                # Cold: the first of each after the daemon started and the image was imported
                # (its layers just written, so in the page cache; the spawner's spare ready).
                # The first pod of a daemon has no spare (its RunPodSandbox starts one) and
                # also starts the instances' warm template.
                cold_cells = _cells_lifecycle(client, f"c{next(counter)}")
                cold_pod = _cri_lifecycle(runtime, f"p{next(counter)}")
                cold_bare = _cri_lifecycle(bare_runtime, f"p{next(counter)}")
                cold_runc = runc_run()
                interleave(runs, (cells, lambda: _cells_lifecycle(client, f"c{next(counter)}")),
                           (pods, lambda: _cri_lifecycle(runtime, f"p{next(counter)}")),
                           (bare, lambda: _cri_lifecycle(bare_runtime, f"p{next(counter)}")),
                           (runc, runc_run), warmup=mode.warmup(2))
                # Back to back: pods_at_once pods one after the other, the spare taken by the
                # first and not refilled in time for the next ones.
                in_a_row = [_cri_lifecycle(runtime, f"r{i}") for i in range(pods_at_once)]
                # Spaced: one pod SPACING after the last ended, as pods come on a busy node:
                # its spare refilled (and just connected) in between, not long before.
                for i in range(spaced_runs):
                    time.sleep(SPACING)
                    spaced.samples.append(_cri_lifecycle(runtime, f"s{i}"))
                # A burst: pods_at_once pods at once, as kubelet starts a node's pods after a
                # reboot.
                begin = time.perf_counter()
                with ThreadPoolExecutor(pods_at_once) as pool:
                    list(pool.map(lambda i: _cri_lifecycle(runtime, f"b{i}"),
                                  range(pods_at_once)))
                burst = (time.perf_counter() - begin) * 1e3
            finally:
                umount2(str(bundle / "rootfs"), MNT_DETACH)
    return [
        Figure("container_lifecycle_cold", "First image container in an isolated cell after "
               "start (cold)", cold_cells, "ms", notes=f"runc's first run: {cold_runc:.1f} ms"),
        Figure("cri_pod_lifecycle_cold", "First CRI pod + container start to exit after start "
               "(cold: no spare yet, and it also starts the instances' warm template)",
               cold_pod, "ms", notes=f"spares off: {cold_bare:.1f} ms; "
                                     f"runc's first run: {cold_runc:.1f} ms"),
        Figure("cri_pod_in_a_row", f"{pods_at_once} CRI pods + containers back to back (the spare "
               "cannot refill between them): the slowest", max(in_a_row), "ms",
               notes="each: " + ", ".join(f"{v:.1f}" for v in in_a_row) + " ms"),
        Figure("cri_pod_burst", f"{pods_at_once} CRI pods + containers started to exit at once "
               "(wall time for all)", burst, "ms",
               notes=f"runc, one at a time: {pods_at_once} x {runc.median:.1f} ms"),
        Comparison("container_lifecycle_vs_runc", "Image container in an isolated cell vs runc "
                   "run of the same image", cells, runc, goal="<= 1.0x runc"),
        Comparison("cri_pod_lifecycle_vs_runc", "CRI pod + container start to exit vs runc run "
                   "of the same image", pods, runc, goal="<= 1.0x runc",
                   notes="ours: a spare pod instance claimed (its cell moved below the pod's "
                         "cgroup parent, its daemon told where it is), five RPCs relayed to "
                         "its CRI, ContainerStatus polls"),
        Comparison("cri_pod_spaced_vs_runc", f"CRI pod + container start to exit, pods "
                   f"{SPACING * 1e3:.0f} ms apart (the spare refilled just before), vs runc "
                   "run of the same image", spaced, runc, goal="<= 1.0x runc",
                   notes="runc's runs are the interleaved ones above"),
        Comparison("cri_pod_lifecycle_no_spare_vs_runc", "CRI pod + container start to exit, "
                   "spares off, vs runc run of the same image", bare, runc,
                   goal="<= 1.0x runc",
                   notes="ours: a spawned instance per pod (a fork of the warm template)"),
    ]
