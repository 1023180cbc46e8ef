"""Isolated cells: the whole lifecycle against `runc run` of an equivalent
busybox bundle, and what an idle isolated cell costs in memory.

Lifecycle, ours: Allocate (pid+mount+ipc+uts+net namespaces, cgroups),
Start `true`, see it exit (Wait), Free — four RPCs over mTLS. Theirs: `runc
run` of a bundle whose rootfs is busybox-static, with the same namespaces,
running `true` (runc creates the cgroups, pivots into the rootfs, waits, and
deletes the container).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import aurae_sdk
from bench.core import Comparison, Figure, Mode, Result, Series, interleave, rss_bytes
from tests.support.daemon import running_daemon

BUSYBOX = Path("/bin/busybox")


def runc_bundle(directory: Path) -> Path:
    """A minimal OCI bundle: busybox as the whole rootfs, `true` as the process."""
    rootfs = directory / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    for name in ("proc", "dev", "sys", "tmp"):
        (rootfs / name).mkdir()
    shutil.copy(BUSYBOX, rootfs / "bin" / "busybox")
    (rootfs / "bin" / "true").symlink_to("busybox")
    (rootfs / "bin" / "sh").symlink_to("busybox")
    subprocess.run(["runc", "spec"], cwd=directory, check=True)
    config = json.loads((directory / "config.json").read_text())
    config["process"]["terminal"] = False
    config["process"]["args"] = ["/bin/sh", "-c", "true"]
    config["root"]["readonly"] = True
    kinds = {ns["type"] for ns in config["linux"]["namespaces"]}
    assert {"pid", "network", "ipc", "uts", "mount"} <= kinds, kinds
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def _lifecycle(client: aurae_sdk.Client, name: str) -> float:
    """Allocate an isolated cell, Start `true`, Wait for its exit, Free: milliseconds."""
    begin = time.perf_counter()
    client.cells.allocate(cell={"name": name, "isolate_process": True, "isolate_network": True})
    client.cells.start(cell_name=name, executable={"name": "t", "command": "true"})
    client.cells.wait(cell_name=name, executable_name="t", timeout=10)
    client.cells.free(cell_name=name)
    return (time.perf_counter() - begin) * 1e3


def _cgroup2_mount() -> str | None:
    with open("/proc/self/mountinfo") as mountinfo:
        mounts = {line.split()[4] for line in mountinfo if " - cgroup2 " in line}
    return next((m for m in ("/sys/fs/cgroup/unified", "/sys/fs/cgroup") if m in mounts), None)


def _init_of(pid: int) -> int:
    """The host pid of pid 1 of the pid namespace `pid` is in (the cell's holder)."""
    namespace = os.readlink(f"/proc/{pid}/ns/pid")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.readlink(f"/proc/{entry}/ns/pid") != namespace:
                continue
            with open(f"/proc/{entry}/status") as status:
                nspid = next(line for line in status if line.startswith("NSpid:")).split()
        except OSError:  # gone meanwhile, or not ours to look into
            continue
        if nspid[-1] == "1":
            return int(entry)
    raise LookupError(f"no init in the pid namespace of {pid}")


def _in_subtree(pid: int, cgroup_root: str) -> bool:
    """Whether the process is in the daemon's cgroups: other daemons' holders (other runs on
    the same machine) are not this one's, and may end while being read."""
    try:
        with open(f"/proc/{pid}/cgroup") as cgroups:
            return f"/{cgroup_root}/" in cgroups.read()
    except OSError:
        return False


def pss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as rollup:
        for line in rollup:
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    return 0


def run(mode: Mode) -> list[Result]:
    runs = mode.pick(full=40, quick=10, smoke=1)
    idle_cells = mode.pick(full=100, quick=20, smoke=2)
    ours = Series("Allocate isolated cell + Start `true` + Wait + Free (SDK, mTLS)", "ms")
    theirs = Series("runc run (busybox bundle, same namespaces, `sh -c true`)", "ms")
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="aurae-bench-runc-") as tmp, \
            running_daemon() as daemon, daemon.client() as client:
        bundle = runc_bundle(Path(tmp))
        counter = iter(range(10**9))

        def lifecycle() -> float:
            return _lifecycle(client, f"iso{next(counter)}")

        def runc_run() -> float:
            name = f"aurae-bench-{next(counter)}"
            begin = time.perf_counter()
            subprocess.run(["runc", "run", "--bundle", str(bundle), name], check=True,
                           stdin=subprocess.DEVNULL)
            return (time.perf_counter() - begin) * 1e3

        interleave(runs, (ours, lifecycle), (theirs, runc_run), warmup=mode.warmup(2))
        results.append(Comparison(
            "isolated_lifecycle_vs_runc", "Isolated cell lifecycle vs runc run", ours, theirs,
            goal="<= 0.5x runc",
            notes="leans on no spare where the kernel's procfs takes pidns= (6.18+): the "
                  "spawner fork_execs the holder into namespaces it made itself, and the "
                  "workload into them; elsewhere a spare forked ahead (replaced after 5 ms "
                  "idle) takes the holder"))

        # A burst: lifecycles back to back, so the spawner is never idle long enough
        # (SPARE_IDLE_MS) to fork the next spare ahead of time; each sample is one burst's
        # mean. Against runc runs back to back, bursts alternating.
        burst = mode.pick(full=100, quick=25, smoke=2)
        burst_ours = Series(f"{burst} isolated lifecycles back to back, per lifecycle", "ms")
        burst_runc = Series(f"{burst} runc runs back to back, per run", "ms")

        def burst_of(measure: Callable[[], float]) -> Callable[[], float]:
            def mean() -> float:
                begin = time.perf_counter()
                for _ in range(burst):
                    measure()
                return (time.perf_counter() - begin) * 1e3 / burst
            return mean

        interleave(mode.pick(full=3, quick=1, smoke=1), (burst_ours, burst_of(lifecycle)),
                   (burst_runc, burst_of(runc_run)), warmup=0)
        results.append(Comparison(
            "isolated_burst_vs_runc", f"A burst of {burst} isolated cell lifecycles vs {burst} "
            "runc runs", burst_ours, burst_runc, goal="<= 0.35x runc",
            notes="leans on no warm spare: none is kept where holders start from C (procfs "
                  "pidns=); elsewhere a used spare is replaced only after the spawner idled "
                  "5 ms, which lifecycles back to back seldom leave"))

        # The same on a cgroup2 hierarchy, where processes are born in their cgroup: on a
        # hybrid host its unified mount (binding no controller limits use), against the same
        # runc (which uses the v1 hierarchies).
        v2_mount = _cgroup2_mount()
        if v2_mount is not None:
            ours_v2 = Series(f"the same, daemon on cgroup2 ({v2_mount})", "ms")
            theirs_v2 = Series("runc run (as above)", "ms")
            with running_daemon(cgroup_mount=v2_mount) as daemon_v2, \
                    daemon_v2.client() as client_v2:
                interleave(runs, (ours_v2, lambda: _lifecycle(client_v2, f"v{next(counter)}")),
                           (theirs_v2, runc_run), warmup=mode.warmup(2))
            results.append(Comparison(
                "isolated_lifecycle_v2_vs_runc", "Isolated cell lifecycle on cgroup2 vs runc run",
                ours_v2, theirs_v2, goal="<= 0.5x runc",
                notes="no spare; started from C, holder and workload are born in the cell's "
                      "cgroup while the spawner visits it (cgroup.procs); forked children "
                      "are born there by clone3 CLONE_INTO_CGROUP"))

        # Starting in an existing isolated cell against its floor: the same two round trips
        # plus a fork/exec that joins the cell's namespaces (util-linux nsenter forks into
        # the pid namespace and execs; its own exec is extra, so the floor is generous).
        client.cells.allocate(cell={"name": "warm", "isolate_process": True,
                                    "isolate_network": True})
        probe = client.cells.start(cell_name="warm", executable={"name": "probe",
                                                                  "command": "sleep 60"})
        holder_pid = _init_of(probe.host_pid)
        client.cells.stop(cell_name="warm", executable_name="probe", grace_period_ms=0)
        start_in_cell = Series("Start `true` in an isolated cell + Wait (SDK, mTLS)", "ms")
        floor = Series("2 Discover round trips + nsenter -t HOLDER -a true", "ms")
        nsenter = ["nsenter", "-t", str(holder_pid), "-m", "-u", "-i", "-n", "-p", "true"]

        def start_and_wait() -> float:
            name = f"t{next(counter)}"
            begin = time.perf_counter()
            client.cells.start(cell_name="warm", executable={"name": name, "command": "true"})
            client.cells.wait(cell_name="warm", executable_name=name, timeout=10)
            return (time.perf_counter() - begin) * 1e3

        def round_trips_and_nsenter() -> float:
            begin = time.perf_counter()
            client.discovery.discover()
            subprocess.run(nsenter, check=True, stdin=subprocess.DEVNULL)
            client.discovery.discover()
            return (time.perf_counter() - begin) * 1e3

        interleave(runs * 2, (start_in_cell, start_and_wait), (floor, round_trips_and_nsenter),
                   warmup=mode.warmup(3))
        results.append(Comparison(
            "start_in_isolated_cell_vs_floor", "Start in an existing isolated cell vs its floor",
            start_in_cell, floor, goal="close to fork/exec + joining namespaces"))
        client.cells.free(cell_name="warm")

        # Idle cost: the daemon's own growth plus each cell's holder process.
        before = rss_bytes(daemon.process.pid)
        for index in range(idle_cells):
            client.cells.allocate(cell={"name": f"idle{index}", "isolate_process": True,
                                        "isolate_network": True})
        time.sleep(0.5)
        after = rss_bytes(daemon.process.pid)
        holders = [pid for pid in (int(p) for p in subprocess.run(
            ["pgrep", "-f", "^catatonit -P"], capture_output=True, text=True,
            check=False).stdout.split()) if _in_subtree(pid, daemon.cgroup_root)]
        holder_pss = sum(pss_bytes(pid) for pid in holders) / max(1, len(holders))
        holder_rss = sum(rss_bytes(pid) for pid in holders) / max(1, len(holders))
        per_cell = (after - before) / idle_cells + holder_pss
        results.append(Figure(
            "idle_isolated_cell_memory", f"Memory of one idle isolated cell ({idle_cells} allocated)",
            per_cell / 1024 / 1024, "MiB",
            notes=f"daemon RSS +{(after - before) / 1024 / idle_cells:.0f} KiB per cell; holder "
                  f"(catatonit) PSS {holder_pss / 1024:.0f} KiB, RSS {holder_rss / 1024:.0f} KiB; "
                  f"no Python process per cell"))
        for index in range(idle_cells):
            client.cells.free(cell_name=f"idle{index}")
    return results
