"""Virtual machines: Allocate + Start until the guest's auraed answers Discover, against the
floor of the same boot (the same kernel, initramfs, QEMU, accelerator, 9p shares and TAP, with
a minimal Python gRPC server as pid 1 instead of auraed.pid1 + auraed; see
bench/vm_floor_guest.py). Cold boots only: every sample is a fresh guest.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aurae_sdk
from aurae_sdk.wire import dns
from aurae_sdk.wire.pki import CertificateAuthority
from auraed.kernel import guest_image, tap
from auraed.kernel.qemu import QemuMachine, Share, default_kernel_args
from auraed.runtime.vms import project_environment
from bench.core import Comparison, Figure, Mode, Result, Series, interleave
from tests.support.daemon import DaemonProcess, running_daemon

ROOT = Path(__file__).resolve().parent.parent
DEADLINE = 300.0


def _ours(daemon: DaemonProcess, client: aurae_sdk.Client, vm_id: str) -> float:
    begin = time.perf_counter()
    client.vms.allocate(machine={"id": vm_id, "mem_size_mb": 512})
    client.vms.start(vm_id=vm_id)
    with client.vm(vm_id) as guest:
        assert guest.discovery.discover().healthy
    elapsed = time.perf_counter() - begin
    client.vms.free(vm_id=vm_id)
    return elapsed


def _floor(daemon: DaemonProcess, image: guest_image.GuestImage, accelerator: str,
           work: Path) -> float:
    guest = work / "guest"
    shutil.rmtree(guest, ignore_errors=True)
    guest.mkdir(parents=True)
    identity = CertificateAuthority.load_files(daemon.pki.ca_crt, daemon.pki.ca_key).issue_child(
        "spiffe://unsafe.aurae.io/auraed/vm", "floor", dns_names=[dns.SERVER_NAME])
    (guest / "ca.crt").write_bytes(daemon.pki.ca_crt.read_bytes())
    (guest / "server.crt").write_bytes(identity.certificate_pem())
    (guest / "server.key").write_bytes(identity.private_key_pem())
    environment = project_environment()
    shares = [Share("aurae", str(guest)), Share("hostusr", "/usr")]
    shares += [Share(f"env{i}", path) for i, path in enumerate(environment)]
    launcher = guest / "floor.sh"
    launcher.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} "
                        f"{shlex.quote(str(ROOT / 'bench' / 'vm_floor_guest.py'))} /aurae\n")
    launcher.chmod(0o755)
    (guest / "boot.env").write_text(
        f"AURAE_SHARES={shlex.quote(' '.join(f'{s.tag}:{s.path}' for s in shares[2:]))}\n"
        "AURAE_PYTHON=/aurae/floor.sh\nAURAE_PID1_CONFIG=/dev/null\n")
    begin = time.perf_counter()
    device = tap.create_tap()
    machine = QemuMachine(kernel=str(image.kernel), initramfs=str(image.initramfs),
                          kernel_args=tuple(default_kernel_args()), mem_size_mb=512, vcpu_count=1,
                          accelerator=accelerator, qmp_socket=str(work / "qmp.sock"),
                          tap=device.name, shares=tuple(shares))
    qemu = subprocess.Popen(machine.argv(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        address = f"[{tap.GUEST_ADDRESS}%{device.name}]:8080"
        deadline = time.monotonic() + DEADLINE
        while True:
            # A fresh channel per attempt: one channel's reconnect backoff grows to seconds
            # while the guest boots, and would count against the floor. (Ours is polled by the
            # host daemon with a 250 ms backoff cap: auraed/runtime/vms.py.)
            try:
                with aurae_sdk.Client(daemon.config, socket=address, timeout=2) as client:
                    if client.discovery.discover().healthy:
                        break
            except aurae_sdk.AuraeError:
                if time.monotonic() > deadline or qemu.poll() is not None:
                    raise
            time.sleep(0.05)
        return time.perf_counter() - begin
    finally:
        qemu.kill()
        qemu.wait()
        tap.remove_tap(device.name)
        (work / "qmp.sock").unlink(missing_ok=True)


def run(mode: Mode) -> list[Result]:
    runs = mode.pick(full=3, quick=1, smoke=1)
    image = guest_image.build(guest_image.default_cache_dir())
    ours = Series("VM Allocate + Start + guest Discover (SDK, mTLS)", "s")
    floor = Series("same kernel+initramfs, minimal gRPC server as pid 1, Discover", "s")
    counter = iter(range(10**6))
    with tempfile.TemporaryDirectory(prefix="aurae-bench-vm-") as tmp, \
            running_daemon("--vm-boot-timeout", str(DEADLINE),
                           "--vm-image-dir", str(guest_image.default_cache_dir()), vms=True) as daemon, \
            daemon.client(timeout=DEADLINE + 30) as client:
        # The first Start probes the accelerator; keep that out of the samples.
        client.vms.allocate(machine={"id": "probe"})
        client.vms.start(vm_id="probe")
        accelerator = client.vms.list().machines[0].accelerator
        client.vms.free(vm_id="probe")
        interleave(runs, (ours, lambda: _ours(daemon, client, f"b{next(counter)}")),
                   (floor, lambda: _floor(daemon, image, accelerator, Path(tmp))), warmup=0)
    load = os.getloadavg()[0]
    return [
        Comparison("vm_boot_vs_floor", f"VM boot to a serving guest auraed vs its floor "
                   f"({accelerator})", ours, floor, goal="<= 1.25x floor",
                   notes=f"accelerator {accelerator}; cold boots, 512 MiB, 1 vCPU; load average "
                         f"{load:.1f} at the end"),
        Figure("vm_boot_seconds", f"VM boot to a serving guest ({accelerator})", ours.median,
               "s", notes="on a KVM host the goal is <= 1 s"),
    ]
