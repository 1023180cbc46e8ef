"""Spare pod instances (auraed.cri.pod_instances, --cri-pod-spares): a pod instance started
ahead becomes the next pod that does not share the node's namespaces — its cell moved below
the pod's cgroup parent with the pod's limits, its hostname the pod's — and no spare is left
behind by a stop, a --live-restore stop or a crash. Against a real daemon, checked through
/proc and cgroupfs."""

from __future__ import annotations

import os
import signal
import stat
from pathlib import Path

import grpc
import pytest

from auraed.cri.generated import api_pb2 as cri
from auraed.cri.generated import api_pb2_grpc as cri_grpc
from tests.cri.test_cri import _verbose, _wait_for, parents_freed
from tests.cri.test_cri import spares as _spares
from tests.cri.test_pod_instances import (
    _cgroup_of,
    _exec,
    _import,
    _ns,
    _sandbox,
    _start,
    cri_socket,  # noqa: F401 - a fixture
)
from tests.support.daemon import DaemonProcess, cgroup_dirs, running_daemon

pytestmark = pytest.mark.daemon


def _spare_pids(daemon: DaemonProcess, name: str) -> set[int]:
    pids: set[int] = set()
    for top in cgroup_dirs(daemon.cgroup_root):
        for procs in (top / f"instance-{name}").rglob("cgroup.procs"):
            pids.update(int(p) for p in procs.read_text().split())
    return pids


def _run(runtime: cri_grpc.RuntimeServiceStub, config: cri.PodSandboxConfig) -> str:
    sandbox_id: str = runtime.RunPodSandbox(cri.RunPodSandboxRequest(config=config),
                                            timeout=120).pod_sandbox_id
    return sandbox_id


def _pod_info(runtime: cri_grpc.RuntimeServiceStub, sandbox_id: str) -> dict[str, object]:
    return _verbose(runtime.PodSandboxStatus, cri.PodSandboxStatusRequest(
        pod_sandbox_id=sandbox_id, verbose=True))


def test_a_spare_becomes_the_next_pod_with_its_place_limits_and_hostname(
        busybox_image: tuple[Path, Path], cri_socket: Path, tmp_path: Path) -> None:  # noqa: F811
    with running_daemon("--cri-socket", str(cri_socket)) as daemon:
        _import(daemon, busybox_image[0])
        tops = {d.parent.name: d for d in cgroup_dirs(daemon.cgroup_root)}
        with grpc.insecure_channel(f"unix:{cri_socket}") as channel:
            runtime = cri_grpc.RuntimeServiceStub(channel)
            assert _spares(daemon) == []  # a daemon that ran no pod has none
            first = _run(runtime, _sandbox("first", tmp_path))
            _wait_for(lambda: len(_spares(daemon)) == 1, 120)
            [spare] = _spares(daemon)
            assert str(_pod_info(runtime, first)["instance"]) != spare
            _wait_for(lambda: (daemon.runtime_dir / "instances" / spare / "standby.sock")
                      .exists(), 120)
            before = _spare_pids(daemon, spare)
            assert before  # its namespace holder, its daemon, its spawner seed

            config = _sandbox("second", tmp_path, memory=192 << 20)
            second = _run(runtime, config)
            info = _pod_info(runtime, second)
            assert info["instance"] == spare
            cell = str(info["cell"])
            assert cell == f"kubepods/burstable/pod-second/instance-{spare}"
            # Moved: nothing of it is left at its old place, in any hierarchy.
            assert all(not (top / f"instance-{spare}").exists()
                       for top in cgroup_dirs(daemon.cgroup_root))
            # The pod's limit was written on the new cell, and every process of the spare
            # is in it (in each hierarchy).
            if "memory" in tops:
                limit = tops["memory"] / cell / "memory.limit_in_bytes"
            else:
                limit = Path("/sys/fs/cgroup") / daemon.cgroup_root / cell / "memory.max"
            assert limit.read_text().strip() == str(192 << 20)
            for pid in before:
                if Path(f"/proc/{pid}").exists():
                    for controller in ("memory", "cpu", "pids") if "memory" in tops else ("",):
                        assert _cgroup_of(pid, controller).startswith(
                            f"/{daemon.cgroup_root}/{cell}/"), (pid, controller)
            # The pod's hostname in the instance's uts namespace, which its containers share.
            container = _start(runtime, second, config, "c", ["sleep", "300"])
            assert _exec(runtime, container, "hostname") == b"second-host\n"
            container_pid = _verbose(runtime.ContainerStatus, cri.ContainerStatusRequest(
                container_id=container, verbose=True))["pid"]
            assert _ns(container_pid, "uts") == _ns(int(str(info["pid"])), "uts")
            # Another spare is started for the next pod.
            _wait_for(lambda: len(_spares(daemon)) == 1 and _spares(daemon) != [spare], 120)
            for sandbox_id in (first, second):
                runtime.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id),
                                         timeout=120)
            parents_freed(daemon.cgroup_root)


def test_a_pod_that_comes_while_the_spare_still_starts_starts_its_own_and_leaves_the_spare(
        busybox_image: tuple[Path, Path], cri_socket: Path, tmp_path: Path) -> None:  # noqa: F811
    """A spare whose daemon does not wait for its claim yet (its standby socket is not at its
    name, as before it listens) is not claimed: the pod gets an instance of its own, and the
    next pod, once the spare waits, gets the spare."""
    with running_daemon("--cri-socket", str(cri_socket)) as daemon:
        _import(daemon, busybox_image[0])
        with grpc.insecure_channel(f"unix:{cri_socket}") as channel:
            runtime = cri_grpc.RuntimeServiceStub(channel)
            first = _run(runtime, _sandbox("first", tmp_path))
            _wait_for(lambda: len(_spares(daemon)) == 1, 120)
            [spare] = _spares(daemon)
            standby = daemon.runtime_dir / "instances" / spare / "standby.sock"
            _wait_for(standby.exists, 120)
            hidden = standby.with_name(".standby.sock.starting")
            standby.rename(hidden)  # as the spare is before it listens
            second = _run(runtime, _sandbox("second", tmp_path))
            own = str(_pod_info(runtime, second)["instance"])
            assert own != spare
            assert _spares(daemon) == [spare]  # kept for the next pod
            hidden.rename(standby)
            third = _run(runtime, _sandbox("third", tmp_path))
            assert _pod_info(runtime, third)["instance"] == spare
            for sandbox_id in (first, second, third):
                runtime.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id),
                                         timeout=120)
            parents_freed(daemon.cgroup_root)


def test_a_spare_listens_on_its_cri_socket_before_its_claim_and_answers_once_claimed(
        busybox_image: tuple[Path, Path], cri_socket: Path, tmp_path: Path) -> None:  # noqa: F811
    """The spare's CRI server is bound before the claim (mode 0600); a call made then is held
    until the claimed spare has wired its services, and is answered by it. Its start wrote no
    VM records: it never ran a VM."""
    with running_daemon("--cri-socket", str(cri_socket)) as daemon:
        _import(daemon, busybox_image[0])
        with grpc.insecure_channel(f"unix:{cri_socket}") as channel:
            runtime = cri_grpc.RuntimeServiceStub(channel)
            _run(runtime, _sandbox("first", tmp_path))
            _wait_for(lambda: len(_spares(daemon)) == 1, 120)
            [spare] = _spares(daemon)
            directory = daemon.runtime_dir / "instances" / spare
            _wait_for(lambda: (directory / "standby.sock").exists(), 120)
            inner = directory / "cri.sock"
            info = os.lstat(inner)
            assert stat.S_ISSOCK(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600
            with grpc.insecure_channel(f"unix:{inner}") as spare_channel:
                early = cri_grpc.RuntimeServiceStub(spare_channel).ListPodSandbox.future(
                    cri.ListPodSandboxRequest(), timeout=120)
                # Unclaimed, the spare has no pods to list: the call waits for its wiring.
                with pytest.raises(grpc.FutureTimeoutError):
                    early.result(timeout=1.0)
                second = _run(runtime, _sandbox("second", tmp_path))
                assert _pod_info(runtime, second)["instance"] == spare
                # Answered by the claimed spare's CRI: at most the sandbox the host asked for.
                assert len(early.result(timeout=120).items) <= 1
            # A pod's daemon never ran a VM: its start wrote no VM records nor TAP registry.
            run, library = directory / "run", daemon.workdir / "lib" / "instances" / spare
            assert run.is_dir() and (library / "audit.log").exists()  # where they would be
            assert not (run / "vms.state").exists() and not (library / "vm-taps").exists()


def test_a_pod_sharing_the_nodes_network_or_pids_takes_no_spare(
        busybox_image: tuple[Path, Path], cri_socket: Path, tmp_path: Path) -> None:  # noqa: F811
    with running_daemon("--cri-socket", str(cri_socket)) as daemon:
        _import(daemon, busybox_image[0])
        with grpc.insecure_channel(f"unix:{cri_socket}") as channel:
            runtime = cri_grpc.RuntimeServiceStub(channel)
            ids = [_run(runtime, _sandbox("first", tmp_path))]
            _wait_for(lambda: len(_spares(daemon)) == 1, 120)
            [spare] = _spares(daemon)
            for name, options in (("hostnet", cri.NamespaceOption(network=cri.NODE)),
                                  ("hostpid", cri.NamespaceOption(pid=cri.NODE))):
                config = _sandbox(name, tmp_path)
                config.linux.security_context.namespace_options.CopyFrom(options)
                ids.append(_run(runtime, config))
                info = _pod_info(runtime, ids[-1])
                assert info["instance"] != spare
                pid = int(str(info["pid"]))
                kind = "net" if name == "hostnet" else "pid"
                assert _ns(pid, kind) == _ns(os.getpid(), kind)
                assert _spares(daemon) == [spare]  # still waiting for a pod it fits
            for sandbox_id in ids:
                runtime.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id),
                                         timeout=120)


def test_no_spare_with_cri_pod_spares_zero(
        busybox_image: tuple[Path, Path], cri_socket: Path, tmp_path: Path) -> None:  # noqa: F811
    with running_daemon("--cri-socket", str(cri_socket), "--cri-pod-spares", "0") as daemon:
        _import(daemon, busybox_image[0])
        with grpc.insecure_channel(f"unix:{cri_socket}") as channel:
            runtime = cri_grpc.RuntimeServiceStub(channel)
            ids = [_run(runtime, _sandbox(name, tmp_path)) for name in ("one", "two")]
            assert _spares(daemon) == []
            assert not list((daemon.runtime_dir / "instances").glob("*/standby.sock"))
            for sandbox_id in ids:
                runtime.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id),
                                         timeout=120)


@pytest.mark.parametrize("how", ["stop", "live-restore", "crash"])
def test_a_spare_never_outlives_its_daemon(
        busybox_image: tuple[Path, Path], cri_socket: Path, tmp_path: Path,  # noqa: F811
        how: str) -> None:
    with running_daemon("--cri-socket", str(cri_socket), "--live-restore") as first:
        _import(first, busybox_image[0])
        with grpc.insecure_channel(f"unix:{cri_socket}") as channel:
            runtime = cri_grpc.RuntimeServiceStub(channel)
            _run(runtime, _sandbox("pod", tmp_path))
            _wait_for(lambda: len(_spares(first)) == 1, 120)
            [spare] = _spares(first)
            _wait_for(lambda: (first.runtime_dir / "instances" / spare / "standby.sock")
                      .exists(), 120)
            pids = _spare_pids(first, spare)
        if how == "stop":
            assert first.stop(signal.SIGINT) == 0
        elif how == "live-restore":
            assert first.stop(signal.SIGTERM) == 0
        else:
            first.process.kill()
            first.process.wait()
        if how != "crash":
            # Gone with its daemon: processes, cgroups, directories.
            assert not any(Path(f"/proc/{pid}").exists() for pid in pids)
            assert _spares(first) == []
            assert not (first.runtime_dir / "instances" / spare).exists()
        # The next daemon starts with no spare of the last one's, and nothing of it runs.
        with running_daemon("--cri-socket", str(cri_socket), "--live-restore",
                            after=first) as second:
            _wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in pids), 60)
            assert _spares(second) == []
            assert not (second.runtime_dir / "instances" / spare).exists()
            with grpc.insecure_channel(f"unix:{cri_socket}") as channel:
                runtime = cri_grpc.RuntimeServiceStub(channel)
                for pod in runtime.ListPodSandbox(cri.ListPodSandboxRequest(),
                                                  timeout=30).items:
                    runtime.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod.id),
                                             timeout=120)
