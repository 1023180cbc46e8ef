"""Virtual machines: QEMU guests whose pid 1 is auraed, and their lifecycle.

Each VM is a cell of the daemon's own (`vm-<id>`, owned: clients see it in List but cannot free it
or start in it) holding one executable, `qemu`, started through the same spawner as every
workload: its cgroup accounts and limits QEMU, its captured stdout is the guest's serial console
(Observe reads it like any executable's output), and its exit is reported like any exit.

Start writes the VM's runtime directory (`<runtime>/vms/<id>/`): `guest/` is shared read-only
into the guest (tag `aurae`) with the CA certificate, the guest's own server certificate and key
(minted here; the host's key never enters a guest), `boot.env` for the initramfs and
`pid1.json` for auraed.pid1; `qmp.sock` is QEMU's monitor. Then it creates the TAP, boots QEMU,
connects QMP and waits until the guest's auraed answers a health check over mTLS at
`[fe80::2%<tap>]:8080`, which is the address it returns.

Status follows upstream's spelling: "Created" (allocated, or never booted), "Running", "Shutdown"
(ended: by Stop, by the guest powering off, or by QEMU dying; `stop_reason` says which, from the
QMP events and QEMU's exit status). A machine a restarted daemon re-adopted is "Restoring" until
its guest's auraed answers a health check (checked in the background: the daemon serves
meanwhile), then "Running"; one whose guest has not answered within `--vm-health-timeout` is
"Unresponsive" (QEMU runs; `status_detail` says what the checks got) and turns "Running" when
it answers. Both are Running to the lifecycle: Stop and Free work, Start is refused.

Locking: `_lock` guards the registry and each VM's state changes; booting, waiting for health
and waiting for power-off happen outside it, with the VM marked `busy` so a second Start, Stop or
Free of it is refused (FAILED_PRECONDITION) rather than interleaved.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import shlex
import shutil
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from auraed.errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from auraed.kernel import guest_image
from auraed.kernel.cgroups import CgroupLimits
from auraed.runtime.executables import Executable
from auraed.runtime.names import CellName
from auraed.runtime.workloads import CellSpec, Workloads

if TYPE_CHECKING:
    from auraed.kernel.qemu import QmpLoop, QmpSession

# QEMU's QMP client, netlink and X.509 minting are imported where a VM first needs them: a
# daemon that never boots one (as every guest's auraed) does not pay their ~0.2 s of imports.

log = logging.getLogger("auraed.vms")
# The service whose health Start waits for: the first a guest's auraed serves (--serve-early).
GUEST_READY = "aurae.discovery.v0.DiscoveryService"

CREATED, RUNNING, SHUTDOWN = "Created", "Running", "Shutdown"
# What List says of a re-adopted machine until its guest's auraed answered (aurae-py additions).
RESTORING, UNRESPONSIVE = "Restoring", "Unresponsive"
# Between health checks of a re-adopted guest: while Restoring, and once Unresponsive.
RESTORING_POLL = 0.5
UNRESPONSIVE_POLL = 5.0
HEALTH_CHECK_TIMEOUT = 2.0
GUEST_PORT = 8080
QEMU_EXECUTABLE = "qemu"
# QEMU's own memory beyond the guest's RAM is small; the guest's RAM is the bound that matters.
MAX_MEMORY_MB = 1024 * 1024
MAX_VCPUS = 64
DEFAULT_MEMORY_MB = 512
DEFAULT_VCPUS = 1
# 60 chars leaves room for the "vm-" of the cell name within one 63-character DNS label.
MAX_ID_LENGTH = 60
GUEST_DIRECTORY = "/aurae"
QMP_CONNECT_TIMEOUT = 30.0
GUEST_IDENTITY_VALIDITY = dt.timedelta(days=30)
# Where the machines' records are kept for the next daemon (the spawner's state-file format).
RECORDS_FILE = "vms.state"
RECORDS_VERSION = 1


@dataclass(frozen=True)
class DriveSpec:
    image_path: str
    vm_path: str
    fs_type: str
    read_only: bool


@dataclass(frozen=True)
class MachineSpec:
    id: str
    mem_size_mb: int
    vcpu_count: int
    kernel_img_path: str  # "" for the project's guest kernel
    kernel_args: tuple[str, ...]
    root_drive: str  # "" for the project's default root: initramfs + the host's /usr over 9p
    root_read_only: bool
    drive_mounts: tuple[DriveSpec, ...]
    # What the caller recorded with it (VirtualMachine.labels), sorted by key.
    labels: tuple[tuple[str, str], ...] = ()


@dataclass(eq=False)
class VirtualMachine:
    spec: MachineSpec
    status: str = CREATED
    busy: bool = False
    accelerator: str = ""
    tap: str | None = None
    address: str = ""
    stop_reason: str = ""
    shutdown_event: str = ""  # the QMP SHUTDOWN reason, when one came
    qemu: Executable | None = None
    qmp: QmpSession | None = None
    kernel: str = ""  # the kernel the running boot uses
    started: list[float] = field(default_factory=list)
    # A Running machine's guest as last checked: "" (it answered: Start saw it, or the check
    # after a re-adoption did), RESTORING or UNRESPONSIVE; and what the check got.
    guest: str = ""
    status_detail: str = ""

    @property
    def cell(self) -> CellName:
        return CellName(f"vm-{self.spec.id}")

    @property
    def owner(self) -> str:
        return f"vm {self.spec.id}"


@dataclass(frozen=True)
class VmSettings:
    runtime_dir: Path
    image_cache: Path
    ca_crt: Path
    ca_key: Path | None
    server_crt: Path
    accelerator: str = "auto"  # "auto" (probe), "kvm" or "tcg"
    boot_timeout: float = 120.0
    grace_period: float = 30.0
    # The project's environment shared into the guest: what sys.path needs besides /usr.
    environment: tuple[str, ...] = ()
    # The host's --authz-policy, which the guest's auraed enforces too.
    authz_policy: Path | None = None
    # Where the names of the TAPs in use are kept, so that the next start removes what a
    # daemon killed outright left (in the library dir: it must outlive the daemon).
    tap_registry: Path | None = None
    # How long a re-adopted guest may take to answer its health check before it is listed
    # Unresponsive (the checks go on; it is Running once it answers).
    health_timeout: float = 30.0


def project_environment() -> tuple[str, ...]:
    """The host directories the guest's auraed runs from (outside /usr), outermost only."""
    import auraed

    # sys.base_prefix: the interpreter itself when it is not Debian's (pyenv, a venv of it).
    candidates = {os.path.realpath(sys.prefix), os.path.realpath(sys.base_prefix),
                  os.path.dirname(os.path.dirname(os.path.realpath(auraed.__file__)))}
    roots = sorted(p for p in candidates if not p.startswith("/usr/") and p != "/usr")
    return tuple(p for p in roots if not any(p != q and p.startswith(q + "/") for q in roots))


def remove_stale_taps(listed: list[str], in_use: set[str]) -> None:
    """Remove the TAPs a previous run listed (its registry) that no re-adopted machine uses."""
    if not listed:
        return
    from auraed.kernel import tap

    for name in listed:
        if name not in in_use and tap.tap_exists(name):
            log.warning("removing a TAP left by a previous run", extra={"tap": name})
            tap.remove_tap(name)


def validate_machine(spec: MachineSpec, *, check_files: bool = True) -> None:
    """Refuse what no VM can be, naming the field; nothing on the node is looked at but paths
    (`check_files`: that they name files; a record of a VM that booted is not re-checked)."""
    from auraed.runtime.names import _LABEL

    if not spec.id:
        raise InvalidArgument("a virtual machine id is required", field="machine.id")
    if len(spec.id) > MAX_ID_LENGTH or not _LABEL.fullmatch(spec.id) or spec.id != spec.id.lower():
        raise InvalidArgument(
            f"vm id {spec.id[:64]!r} must be lowercase letters, digits and '-', at most "
            f"{MAX_ID_LENGTH} characters, not starting or ending with '-'", field="machine.id")
    if not 64 <= spec.mem_size_mb <= MAX_MEMORY_MB:
        raise InvalidArgument(f"mem_size_mb {spec.mem_size_mb} is outside 64..{MAX_MEMORY_MB}",
                              field="machine.mem_size_mb")
    if not 1 <= spec.vcpu_count <= MAX_VCPUS:
        raise InvalidArgument(f"vcpu_count {spec.vcpu_count} is outside 1..{MAX_VCPUS}",
                              field="machine.vcpu_count")
    for argument in spec.kernel_args:
        if not argument or any(c.isspace() for c in argument) or not argument.isprintable():
            raise InvalidArgument(f"kernel argument {argument[:64]!r} must be one printable "
                                  "word without spaces", field="machine.kernel_args")
    paths = [("machine.kernel_img_path", spec.kernel_img_path),
             ("machine.root_drive.image_path", spec.root_drive)]
    paths += [(f"machine.drive_mounts[{i}].image_path", d.image_path)
              for i, d in enumerate(spec.drive_mounts)]
    for name, path in paths:
        if not path:
            continue
        if not os.path.isabs(path) or "," in path:
            raise InvalidArgument(f"{path!r} must be an absolute path without ','", field=name)
        if check_files and not os.path.isfile(path):
            raise InvalidArgument(f"{path} does not exist or is not a file", field=name)
    for i, drive in enumerate(spec.drive_mounts):
        blamed = f"machine.drive_mounts[{i}]"
        if not drive.vm_path.startswith("/") or drive.vm_path == "/" or ".." in drive.vm_path.split("/"):
            raise InvalidArgument(f"vm_path {drive.vm_path!r} must be an absolute path below /",
                                  field=f"{blamed}.vm_path")
        if not drive.fs_type or not drive.fs_type.replace("_", "").isalnum():
            raise InvalidArgument(f"fs_type {drive.fs_type!r} must name a filesystem, e.g. ext4",
                                  field=f"{blamed}.fs_type")


class VirtualMachines:
    def __init__(self, workloads: Workloads, settings: VmSettings) -> None:
        self.workloads = workloads
        self.settings = settings
        self._lock = threading.Lock()
        self._machines: dict[str, VirtualMachine] = {}
        self._closing = False
        self._closed = threading.Event()  # wakes the health checks of re-adopted guests
        # The artefacts, the accelerator's probe and the QMP loop: made once, by the first
        # Start (concurrent Starts wait for it).
        self._prepare_lock = threading.Lock()
        self._image: guest_image.GuestImage | None = None
        self._accelerator: tuple[str, str] | None = None
        self._qmp: QmpLoop | None = None
        self._client_identity: tuple[bytes, bytes] | None = None
        self._directory = settings.runtime_dir / "vms"
        self._records = settings.runtime_dir / RECORDS_FILE

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Take back the machines a previous daemon left (see adopt()), then remove what is left
        of the others: their runtime directories (sockets, guest keys) and their TAPs."""
        registry = self.settings.tap_registry
        # Read first: adopting rewrites the registry with the TAPs still in use.
        listed = registry.read_text().split() if registry is not None and registry.exists() else []
        if not (listed or self._records.exists() or self._directory.exists()
                or self._owns_cells()):
            # Nothing to take back or clean, and nothing to record: a daemon that never ran a
            # machine (every pod's) skips the records' writes, 13-27 ms of a pod's start.
            return
        self._adopt()
        kept = {vm.spec.id for vm in self._machines.values() if vm.status == RUNNING}
        if self._directory.exists():
            for directory in self._directory.iterdir():
                if directory.name not in kept:
                    shutil.rmtree(directory, ignore_errors=True)
        remove_stale_taps(listed, in_use={vm.tap for vm in self._machines.values()
                                          if vm.tap is not None})
        with self._lock:
            self._record_taps()
            self._persist()
        for vm in self._machines.values():
            if vm.guest == RESTORING and vm.qemu is not None:
                threading.Thread(target=self._check_adopted, args=(vm, vm.qemu), daemon=True,
                                 name=f"check-{vm.spec.id}").start()

    def _owns_cells(self) -> bool:
        return any(owner.startswith("vm ") for owner in self.workloads.owned_cells().values())

    def _adopt(self) -> None:
        """Re-adopt the machines of the records a previous daemon wrote (it crashed, or detached
        with --live-restore). The workloads were adopted first: a machine whose cell came back
        is known again; one whose QEMU still runs (the same pid, its TAP and QMP socket there)
        is Running again, its QMP session reopened; one whose QEMU ended meanwhile is Shutdown.
        Owned cells no record claims are freed (their QEMU killed): nothing could reach them."""
        from auraed.kernel.spawner.state import StateTorn, read_state

        records: list[dict[str, Any]] = []
        if self._records.exists():
            try:
                records = list(read_state(str(self._records), RECORDS_VERSION)["machines"])
            except (StateTorn, KeyError, TypeError) as error:
                log.error("ignoring the VM records of the previous daemon", extra={
                    "path": str(self._records), "error": str(error)})
        owned = self.workloads.owned_cells()
        adopted: list[str] = []
        for record in records:
            try:
                vm = _machine_from_record(record)
            except (KeyError, TypeError, ValueError) as error:
                log.error("dropping a VM record that does not parse", extra={"error": repr(error)})
                continue
            if owned.get(vm.cell) != vm.owner:
                log.warning("dropping the record of a VM whose cell is gone",
                            extra={"vm": vm.spec.id})
                continue
            del owned[vm.cell]
            self._machines[vm.spec.id] = vm
            if vm.status == RUNNING:
                self._adopt_running(vm, int(record.get("qemu_pid") or 0))
            adopted.append(f"{vm.spec.id} ({vm.status})")
        for cell, owner in owned.items():
            if owner.startswith("vm "):
                log.warning("freeing the cell of a VM no record names", extra={"cell": str(cell)})
                try:
                    self.workloads.free(cell, grace=0.0, owner=owner)
                except Exception:
                    log.exception("freeing an unclaimed VM cell failed", extra={"cell": str(cell)})
        if adopted:
            log.info("adopted the virtual machines of the previous daemon",
                     extra={"machines": ", ".join(adopted)})

    def _adopt_running(self, vm: VirtualMachine, qemu_pid: int) -> None:
        from auraed.kernel import tap
        from auraed.kernel.qemu import QmpSession

        try:
            qemu = self.workloads.find_executable(cell_name=vm.cell, name=QEMU_EXECUTABLE)
        except NotFound:
            qemu = None
        vm.qemu = qemu
        monitor = self._directory / vm.spec.id / "qmp.sock"
        if qemu is None or not qemu.running or qemu.process.host_pid != qemu_pid:
            vm.stop_reason = ("QEMU ended while no daemon ran" +
                              (f" ({self._ended_reason(vm)})" if qemu is not None else ""))
        elif vm.tap is None or not tap.tap_exists(vm.tap) or not monitor.exists():
            vm.stop_reason = "its TAP or QMP socket was gone when the daemon restarted"
        else:
            vm.qmp = QmpSession(self._qmp_loop(), str(monitor),
                                lambda name, data: self._on_event(vm, name, data))
            try:
                vm.qmp.connect(time.monotonic() + QMP_CONNECT_TIMEOUT, alive=lambda: qemu.running)
                log.info("vm adopted", extra={"vm": vm.spec.id, "pid": qemu_pid, "tap": vm.tap,
                                              "address": vm.address})
                # QEMU runs; whether its guest's auraed does is checked behind the start.
                vm.guest = RESTORING
                vm.status_detail = (f"re-adopted by a restarted daemon; checking that the "
                                    f"guest's auraed answers at {vm.address}")
                return
            except ConnectionError as error:
                vm.stop_reason = f"its QMP monitor did not answer the new daemon: {error}"
        log.warning("vm not re-adopted: hard stop", extra={"vm": vm.spec.id,
                                                            "why": vm.stop_reason})
        self._teardown_boot(vm)  # kills a QEMU that still runs: nothing could reach it
        vm.status = SHUTDOWN

    def _check_adopted(self, vm: VirtualMachine, qemu: Executable) -> None:
        try:
            self._check_guest(vm, qemu)
        except Exception as error:  # a thread of its own: say it, never hang
            log.exception("vm guest check failed", extra={"vm": vm.spec.id})
            with self._lock:
                if vm.qemu is qemu and vm.status == RUNNING and vm.guest:
                    vm.guest = UNRESPONSIVE
                    vm.status_detail = f"the check of the guest's auraed failed: {error!r}"

    def _check_guest(self, vm: VirtualMachine, qemu: Executable) -> None:
        """Health-check a re-adopted guest's auraed until it answers (Running), as long as this
        boot runs; Unresponsive after the health timeout without an answer."""
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        from aurae_sdk.wire.targets import parse_target

        began = time.monotonic()

        def current() -> bool:  # call under _lock
            return vm.qemu is qemu and vm.status == RUNNING and vm.guest != ""

        try:
            certificate, key = self._supervisor_identity()
        except FailedPrecondition as error:
            with self._lock:
                if current():
                    vm.guest = UNRESPONSIVE
                    vm.status_detail = f"cannot check the guest's auraed: {error.message}"
            log.error("vm guest not checked", extra={"vm": vm.spec.id, "error": error.message})
            return
        credentials = grpc.ssl_channel_credentials(self.settings.ca_crt.read_bytes(), key,
                                                   certificate)
        options = [("grpc.ssl_target_name_override", "server.unsafe.aurae.io"),
                   ("grpc.default_authority", "server.unsafe.aurae.io"),
                   ("grpc.initial_reconnect_backoff_ms", 100),
                   ("grpc.max_reconnect_backoff_ms", 1000)]
        target = parse_target(vm.address).grpc_target
        last = "no answer yet"
        with grpc.secure_channel(target, credentials, options) as channel:
            stub = health_pb2_grpc.HealthStub(channel)  # type: ignore[no-untyped-call]
            while not self._closing and qemu.running:
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=GUEST_READY),
                                       timeout=HEALTH_CHECK_TIMEOUT)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        with self._lock:
                            if current():
                                vm.guest, vm.status_detail = "", ""
                        log.info("vm guest answers", extra={
                            "vm": vm.spec.id, "address": vm.address,
                            "seconds": round(time.monotonic() - began, 2)})
                        return
                    last = f"{GUEST_READY} is {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"
                except grpc.RpcError as error:
                    last = f"{error.code().name}: {error.details()}"
                waited = time.monotonic() - began
                with self._lock:
                    if not current():
                        return
                    if waited >= self.settings.health_timeout:
                        if vm.guest == RESTORING:
                            log.warning("vm guest does not answer", extra={
                                "vm": vm.spec.id, "address": vm.address, "last": last})
                        vm.guest = UNRESPONSIVE
                        vm.status_detail = (
                            f"QEMU runs, but the guest's auraed has not answered a health check "
                            f"at {vm.address} for {waited:.0f} s (last: {last}); still checking")
                    poll = RESTORING_POLL if vm.guest == RESTORING else UNRESPONSIVE_POLL
                self._closed.wait(poll)

    def _supervisor_identity(self) -> tuple[bytes, bytes]:
        """(certificate, key) PEM of the client identity the host checks guests with, minted
        at first use (a restarted daemon has none until it checks a re-adopted guest)."""
        if self._client_identity is None:
            from aurae_sdk.wire.pki import CertificateAuthority, PkiError
            from auraed.runtime.instances import own_spiffe_id

            if self.settings.ca_key is None:
                raise FailedPrecondition("this daemon has no --ca-key to mint the identity it "
                                         "checks guests with")
            try:
                authority = CertificateAuthority.load_files(self.settings.ca_crt,
                                                            self.settings.ca_key)
                host = own_spiffe_id(self.settings.server_crt.read_bytes())
                until = min(dt.datetime.now(dt.UTC) + GUEST_IDENTITY_VALIDITY,
                            authority.certificate.not_valid_after_utc)
                supervisor = authority.issue_child(host, "vm-supervisor", not_after=until)
            except (OSError, PkiError) as error:
                raise FailedPrecondition(f"cannot mint the supervisor's identity: {error}") from None
            with self._lock:
                if self._client_identity is None:
                    self._client_identity = (supervisor.certificate_pem(),
                                             supervisor.private_key_pem())
        return self._client_identity

    def _persist(self) -> None:
        """Write every machine's record, atomically (call under _lock): what a next daemon
        re-adopts after a crash or a --live-restore restart."""
        from auraed.kernel.spawner.state import write_state

        machines = [_machine_record(vm) for vm in sorted(self._machines.values(),
                                                         key=lambda vm: vm.spec.id)]
        self._records.parent.mkdir(parents=True, exist_ok=True)
        try:
            write_state(str(self._records), RECORDS_VERSION, {"machines": machines})
        except OSError as error:
            log.error("cannot write the VM records", extra={"path": str(self._records),
                                                            "error": str(error)})

    def _record_taps(self) -> None:
        """Rewrite the registry of TAPs in use (call under _lock)."""
        registry = self.settings.tap_registry
        if registry is None:
            return
        names = sorted(vm.tap for vm in self._machines.values() if vm.tap is not None)
        temporary = registry.with_suffix(".new")
        temporary.write_text("".join(f"{name}\n" for name in names))
        temporary.replace(registry)

    def shutdown(self) -> None:
        """Power every running guest off (in parallel, each with its grace), then free them all."""
        with self._lock:
            self._closing = True
            machines = list(self._machines.values())
        self._closed.set()
        stoppers = [threading.Thread(target=self._stop_quietly, args=(vm,), name=f"stop-{vm.spec.id}")
                    for vm in machines]
        for thread in stoppers:
            thread.start()
        for thread in stoppers:
            thread.join()
        for vm in machines:
            try:
                self._release(vm)
            except Exception:
                log.exception("freeing a VM during shutdown failed", extra={"vm": vm.spec.id})
        if self._qmp is not None:
            self._qmp.close()

    def detach(self) -> None:
        """Leave every guest running for the next daemon (--live-restore): close the QMP
        sessions only; QEMU, its TAP and runtime directory stay, and the records say where."""
        with self._lock:
            self._closing = True
            machines = list(self._machines.values())
            self._persist()
        self._closed.set()
        for vm in machines:
            if vm.qmp is not None:
                vm.qmp.close()
                vm.qmp = None
        if self._qmp is not None:
            self._qmp.close()
        log.info("detached from the virtual machines; their guests keep running",
                 extra={"running": sum(vm.status == RUNNING for vm in machines)})

    def _stop_quietly(self, vm: VirtualMachine) -> None:
        try:
            self._power_off(vm, self.settings.grace_period, "the host daemon shut down")
        except Exception:
            log.exception("stopping a VM during shutdown failed", extra={"vm": vm.spec.id})

    # ------------------------------------------------------------------ API

    def allocate(self, spec: MachineSpec) -> VirtualMachine:
        validate_machine(spec)
        vm = VirtualMachine(spec)
        with self._lock:
            self._check_open()
            if spec.id in self._machines:
                raise AlreadyExists(f"virtual machine {spec.id} already exists", field="machine.id")
            # The cell holds QEMU: limits and accounting of the VMM itself.
            try:
                self.workloads.allocate(vm.cell, CellSpec(limits=CgroupLimits()), owner=vm.owner)
            except AlreadyExists:
                raise AlreadyExists(f"a cell {vm.cell} exists already; the VM needs that name",
                                    field="machine.id") from None
            self._machines[spec.id] = vm
            self._persist()
        log.info("vm allocated", extra={"vm": spec.id, "mem_mb": spec.mem_size_mb,
                                        "vcpus": spec.vcpu_count})
        return vm

    def default_kernel(self) -> str:
        return str(self._image.kernel) if self._image is not None else ""

    def list(self) -> list[VirtualMachine]:
        with self._lock:
            return sorted(self._machines.values(), key=lambda vm: vm.spec.id)

    def start_machine(self, vm_id: str, progress: Callable[[str], None] = lambda line: None) -> str:
        vm = self._claim(vm_id, "start", allowed=(CREATED, SHUTDOWN))
        try:
            address = self._boot(vm, progress)
        except BaseException as error:
            vm.stop_reason = f"the boot failed: {getattr(error, 'message', error)}"
            self._teardown_boot(vm)
            with self._lock:
                if vm.status == RUNNING:
                    vm.status = SHUTDOWN
                vm.busy = False
            raise
        with self._lock:
            vm.busy = False
            self._persist()
        return address

    def stop_machine(self, vm_id: str) -> None:
        vm = self._claim(vm_id, "stop", allowed=(RUNNING,))
        try:
            self._power_off(vm, self.settings.grace_period, "stopped by Stop")
        finally:
            with self._lock:
                vm.busy = False

    def free(self, vm_id: str) -> None:
        vm = self._claim(vm_id, "free", allowed=(CREATED, RUNNING, SHUTDOWN))
        try:
            self._power_off(vm, self.settings.grace_period, "freed")
            self._release(vm)
        except BaseException:
            with self._lock:
                vm.busy = False
            raise
        log.info("vm freed", extra={"vm": vm_id})

    # ------------------------------------------------------------------ internals

    def _check_open(self) -> None:
        if self._closing:
            raise Unavailable("the daemon is shutting down")

    def _claim(self, vm_id: str, action: str, allowed: tuple[str, ...]) -> VirtualMachine:
        if not vm_id:
            raise InvalidArgument("a virtual machine id is required", field="vm_id")
        with self._lock:
            self._check_open()
            vm = self._machines.get(vm_id)
            if vm is None:
                raise NotFound(f"no virtual machine {vm_id}", field="vm_id")
            self._refresh(vm)
            if vm.busy:
                raise FailedPrecondition(f"virtual machine {vm_id} is busy starting or stopping",
                                         field="vm_id")
            if vm.status not in allowed:
                raise FailedPrecondition(f"cannot {action} virtual machine {vm_id}: it is "
                                         f"{self._reported(vm)}", field="vm_id")
            vm.busy = True
            return vm

    def status_of(self, vm: VirtualMachine) -> tuple[str, str]:
        """What List says of `vm`: its status and what that rests on (status_detail)."""
        with self._lock:
            self._refresh(vm)
            return self._reported(vm), vm.status_detail if vm.status == RUNNING else ""

    @staticmethod
    def _reported(vm: VirtualMachine) -> str:
        """A Running machine whose guest is not known to answer says so (call under _lock)."""
        return vm.guest if vm.status == RUNNING and vm.guest else vm.status

    def _refresh(self, vm: VirtualMachine) -> None:
        """Fold QEMU's exit into the status (call under _lock)."""
        if vm.status == RUNNING and vm.qemu is not None and not vm.qemu.running:
            vm.status = SHUTDOWN
            vm.guest = vm.status_detail = ""
            if not vm.stop_reason:
                vm.stop_reason = self._ended_reason(vm)
            self._persist()

    def _ended_reason(self, vm: VirtualMachine) -> str:
        status = vm.qemu.exit_status if vm.qemu is not None else None
        code = status.exit_code if status is not None else None
        if vm.shutdown_event == "guest-shutdown" and code == 0:
            return "the guest powered off"
        if vm.shutdown_event == "guest-panic":
            return "the guest kernel panicked"
        if vm.shutdown_event:
            return f"shut down ({vm.shutdown_event})"
        what = (f"exit status {code}" if code is not None
                else f"signal {status.signal}" if status is not None else "no status")
        return f"crashed: QEMU ended with {what} and no shutdown event"

    def _qmp_loop(self) -> QmpLoop:
        """The one event loop of every QMP session, made at first use."""
        from auraed.kernel.qemu import QmpLoop

        with self._prepare_lock:
            if self._qmp is None:
                self._qmp = QmpLoop()
            return self._qmp

    def _image_and_accelerator(self, progress: Callable[[str], None]) -> tuple[guest_image.GuestImage, str]:
        # One builder and one probe, however many Starts come at once.
        with self._prepare_lock:
            return self._prepare(progress)

    def _prepare(self, progress: Callable[[str], None]) -> tuple[guest_image.GuestImage, str]:
        if self._image is None:
            try:
                self._image = guest_image.build(self.settings.image_cache, progress)
            except guest_image.ImageError as error:
                raise FailedPrecondition(f"guest artefacts: {error}") from None
        if self._accelerator is None:
            choice = self.settings.accelerator
            if choice == "auto":
                from auraed.kernel.qemu import probe_accelerator

                self._accelerator = probe_accelerator(str(self._image.kernel),
                                                      str(self._image.initramfs))
            else:
                self._accelerator = (choice, f"--vm-accelerator {choice}")
            log.info("vm accelerator chosen", extra={"accelerator": self._accelerator[0],
                                                     "why": self._accelerator[1]})
        return self._image, self._accelerator[0]

    def _identities(self, vm_id: str) -> tuple[bytes, bytes, bytes]:
        """(CA, certificate, key) PEM of the guest's server identity, `<host>/vm/<id>`."""
        from aurae_sdk.wire import dns
        from aurae_sdk.wire.pki import CertificateAuthority, PkiError
        from auraed.kernel.tap import GUEST_ADDRESS
        from auraed.runtime.instances import own_spiffe_id

        if self.settings.ca_key is None:
            raise FailedPrecondition(
                "this daemon cannot mint guest identities: start it with --ca-key (the key of "
                "--ca-crt) to run virtual machines")
        try:
            authority = CertificateAuthority.load_files(self.settings.ca_crt, self.settings.ca_key)
            host = own_spiffe_id(self.settings.server_crt.read_bytes())
            # As long as the guest may run (a child's default day is for short-lived ones),
            # within the CA's own life.
            until = min(dt.datetime.now(dt.UTC) + GUEST_IDENTITY_VALIDITY,
                        authority.certificate.not_valid_after_utc)
            guest = authority.issue_child(host.child("vm"), vm_id, dns_names=[dns.SERVER_NAME],
                                          server_names=[GUEST_ADDRESS], not_after=until)
            if self._client_identity is None:
                supervisor = authority.issue_child(host, "vm-supervisor", not_after=until)
                self._client_identity = (supervisor.certificate_pem(),
                                         supervisor.private_key_pem())
        except (OSError, PkiError) as error:
            raise FailedPrecondition(f"cannot mint the guest's identity: {error}") from None
        return authority.certificate_pem(), guest.certificate_pem(), guest.private_key_pem()

    def _boot(self, vm: VirtualMachine, progress: Callable[[str], None]) -> str:
        from auraed.kernel import tap
        from auraed.kernel.qemu import (
            Disk,
            QemuMachine,
            QmpSession,
            Share,
            default_kernel_args,
        )

        spec = vm.spec
        started = time.monotonic()
        self._teardown_boot(vm)  # what the previous boot left, if the guest ended by itself
        ca, certificate, key = self._identities(spec.id)  # first: the cheapest refusal
        image, accelerator = self._image_and_accelerator(progress)
        directory = self._directory / spec.id
        shutil.rmtree(directory, ignore_errors=True)
        guest = directory / "guest"
        guest.mkdir(parents=True, mode=0o700)
        (guest / "ca.crt").write_bytes(ca)
        (guest / "server.crt").write_bytes(certificate)
        (guest / "server.key").write_bytes(key)
        policy_flags: list[str] = []
        if self.settings.authz_policy is not None:
            policy = f"policy{self.settings.authz_policy.suffix}"
            shutil.copyfile(self.settings.authz_policy, guest / policy)
            policy_flags = ["--authz-policy", f"{GUEST_DIRECTORY}/{policy}"]
        environment = self.settings.environment or project_environment()
        project = [Share(f"env{i}", path) for i, path in enumerate(environment)]
        # A root drive is the guest's /usr too; without one the host's is shared.
        system = [] if spec.root_drive else [Share(guest_image.USR_SHARE_TAG, "/usr")]
        shares = [Share(guest_image.VM_SHARE_TAG, str(guest)), *system, *project]
        disks = [Disk(d.image_path, d.read_only) for d in spec.drive_mounts]
        if spec.root_drive:
            disks.insert(0, Disk(spec.root_drive, spec.root_read_only))
        root = (f"AURAE_ROOT=/dev/vda\nAURAE_ROOT_RO={int(spec.root_read_only)}\n"
                if spec.root_drive else "")
        (guest / "boot.env").write_text(
            f"AURAE_SHARES={shlex.quote(' '.join(f'{s.tag}:{s.path}' for s in project))}\n"
            f"AURAE_PYTHON={shlex.quote(sys.executable)}\n"
            f"AURAE_PID1_CONFIG={GUEST_DIRECTORY}/pid1.json\n{root}")
        first = len(disks) - len(spec.drive_mounts)  # virtio-blk names disks in order: vda, vdb…
        drives = [{"device": f"/dev/vd{chr(ord('a') + first + i)}", "path": d.vm_path,
                   "fs_type": d.fs_type, "read_only": d.read_only}
                  for i, d in enumerate(spec.drive_mounts)]
        import json

        (guest / "pid1.json").write_text(json.dumps({
            "daemon": [sys.executable, "-m", "auraed", "--socket", f"[::]:{GUEST_PORT}",
                       "--ca-crt", f"{GUEST_DIRECTORY}/ca.crt",
                       "--server-crt", f"{GUEST_DIRECTORY}/server.crt",
                       "--server-key", f"{GUEST_DIRECTORY}/server.key",
                       "--runtime-dir", "/run/aurae", "--library-dir", "/var/lib/aurae",
                       "--cgroup-root", "aurae", "--serve-early", *policy_flags],
            "hostname": spec.id,
            "drives": drives,
        }, indent=1) + "\n")
        for path in guest.iterdir():
            path.chmod(0o400)
        try:
            vm.tap = tap.create_tap().name
        except tap.TapError as error:
            raise FailedPrecondition(str(error)) from None
        with self._lock:
            self._record_taps()
        machine = QemuMachine(
            kernel=spec.kernel_img_path or str(image.kernel),
            initramfs=str(image.initramfs),
            kernel_args=(*default_kernel_args(), *spec.kernel_args),
            mem_size_mb=spec.mem_size_mb,
            vcpu_count=spec.vcpu_count,
            accelerator=accelerator,
            qmp_socket=str(directory / "qmp.sock"),
            tap=vm.tap,
            shares=tuple(shares),
            disks=tuple(disks),
        )
        vm.accelerator = accelerator
        vm.kernel = machine.kernel
        vm.shutdown_event = ""
        vm.stop_reason = ""
        progress(f"booting {spec.id} under {accelerator}")
        vm.qemu = self.workloads.start_executable(
            vm.cell, QEMU_EXECUTABLE, machine.shell_command(),
            description=f"QEMU of vm {spec.id} ({accelerator})", owner=vm.owner)
        with self._lock:
            vm.status = RUNNING
        deadline = started + self.settings.boot_timeout
        vm.qmp = QmpSession(self._qmp_loop(), machine.qmp_socket,
                            lambda name, data: self._on_event(vm, name, data))
        qemu = vm.qemu
        try:
            # Its own bound: QEMU opens the socket within a second; one that does not is broken,
            # whatever the boot timeout.
            vm.qmp.connect(time.monotonic() + QMP_CONNECT_TIMEOUT, alive=lambda: qemu.running)
        except ConnectionError as error:
            raise FailedPrecondition(f"vm {spec.id}: {error}; see its console in Observe") from None
        address = f"[{tap.GUEST_ADDRESS}%{vm.tap}]:{GUEST_PORT}"
        # gRPC connects once and waits, so its first SYN, if lost before the guest's address
        # was up, costs 1-3 s (measured: in a third of boots Start returned 1.5-3 s after the
        # guest listened). Its connect timeout cannot be cut instead: it also bounds the TLS
        # handshake, which a TCG guest on a loaded host can make long.
        tap.await_listener(vm.tap, tap.GUEST_ADDRESS, GUEST_PORT, deadline,
                           alive=lambda: qemu.running)
        self._wait_for_guest(vm, address, deadline)
        vm.address = address
        vm.started.append(time.monotonic() - started)
        log.info("vm started", extra={"vm": spec.id, "address": address,
                                      "accelerator": accelerator,
                                      "seconds": round(time.monotonic() - started, 2)})
        return address

    def _wait_for_guest(self, vm: VirtualMachine, address: str, deadline: float) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        from aurae_sdk.wire.targets import parse_target

        assert self._client_identity is not None and vm.qemu is not None
        ca = self.settings.ca_crt.read_bytes()
        credentials = grpc.ssl_channel_credentials(ca, self._client_identity[1],
                                                   self._client_identity[0])
        target = parse_target(address).grpc_target
        options = [("grpc.ssl_target_name_override", "server.unsafe.aurae.io"),
                   ("grpc.default_authority", "server.unsafe.aurae.io"),
                   ("grpc.initial_reconnect_backoff_ms", 100),
                   ("grpc.max_reconnect_backoff_ms", 250),
                   # gRPC's connect timeout (20 s unless set): a connect that hangs all the
                   # same is retried after 1 s, still long enough for a slow guest's handshake.
                   ("grpc.min_reconnect_backoff_ms", 1000)]
        with grpc.secure_channel(target, credentials, options) as channel:
            stub = health_pb2_grpc.HealthStub(channel)  # type: ignore[no-untyped-call]
            while True:
                if not vm.qemu.running:
                    raise FailedPrecondition(
                        f"vm {vm.spec.id} ended while booting ({self._ended_reason(vm)}); see "
                        f"its console: Observe of cell {vm.cell}, executable {QEMU_EXECUTABLE}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise DeadlineExceeded(
                        f"vm {vm.spec.id}: the guest's auraed did not answer at {address} within "
                        f"{self.settings.boot_timeout:.0f} s; see its console: Observe of cell "
                        f"{vm.cell}, executable {QEMU_EXECUTABLE}")
                try:
                    # Discovery, not "" (the daemon as a whole): a guest's auraed answers it
                    # before its other services are wired, and their calls wait for them.
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=GUEST_READY),
                                       timeout=min(2.0, remaining), wait_for_ready=True)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.05)

    def _on_event(self, vm: VirtualMachine, name: str, data: dict[str, Any]) -> None:
        # On the QMP loop thread: record only, never block.
        if name == "SHUTDOWN":
            vm.shutdown_event = str(data.get("reason", "shutdown"))
        elif name == "GUEST_PANICKED":
            vm.shutdown_event = "guest-panic"
        log.info("vm event", extra={"vm": vm.spec.id, "event": name,
                                    "data": ",".join(f"{k}={v}" for k, v in sorted(data.items()))})

    def _power_off(self, vm: VirtualMachine, grace: float, reason: str) -> None:
        """ACPI power button through QMP; after `grace`, QMP quit; then the process is killed."""
        from auraed.kernel.qemu import QMP_FAILURES

        qemu = vm.qemu
        if qemu is not None and qemu.running:
            log.info("vm stopping", extra={"vm": vm.spec.id, "grace": grace})
            asked = False
            if vm.qmp is not None:
                try:
                    vm.qmp.execute("system_powerdown")
                    asked = True
                except QMP_FAILURES as error:
                    log.warning("system_powerdown failed", extra={"vm": vm.spec.id,
                                                                  "error": str(error)})
            if not (asked and qemu.wait(grace)):
                log.warning("vm did not power off in its grace period: hard stop",
                            extra={"vm": vm.spec.id})
                if vm.qmp is not None:
                    try:
                        vm.qmp.execute("quit")
                    except QMP_FAILURES as error:
                        log.info("QMP quit failed; killing QEMU", extra={"error": repr(error)})
                if not qemu.wait(5.0):
                    self.workloads.stop_executable(vm.cell, QEMU_EXECUTABLE, 0.0, owner=vm.owner)
                reason += " (hard stop after the grace period)"
            qemu.wait(10.0)
            with self._lock:
                vm.stop_reason = reason
        self._teardown_boot(vm)
        with self._lock:
            if vm.status == RUNNING:
                vm.status = SHUTDOWN
            self._persist()

    def _teardown_boot(self, vm: VirtualMachine) -> None:
        """What one boot made: QMP session, TAP, runtime directory (QEMU itself must be gone)."""
        from auraed.kernel import tap

        if vm.qemu is not None and vm.qemu.running:
            self.workloads.stop_executable(vm.cell, QEMU_EXECUTABLE, 0.0, owner=vm.owner)
        if vm.qmp is not None:
            vm.qmp.close()
            vm.qmp = None
        if vm.tap is not None:
            try:
                tap.remove_tap(vm.tap)
            except tap.TapError as error:
                log.error("cannot remove TAP", extra={"vm": vm.spec.id, "error": str(error)})
            vm.tap = None
            with self._lock:
                self._record_taps()
        vm.address = ""
        vm.guest = vm.status_detail = ""
        shutil.rmtree(self._directory / vm.spec.id, ignore_errors=True)
        with self._lock:
            self._refresh(vm)

    def _release(self, vm: VirtualMachine) -> None:
        self._teardown_boot(vm)
        try:
            self.workloads.free(vm.cell, grace=0.0, owner=vm.owner)
        except NotFound:
            pass
        with self._lock:
            self._machines.pop(vm.spec.id, None)
            self._persist()


def _machine_record(vm: VirtualMachine) -> dict[str, Any]:
    spec = vm.spec
    return {
        "spec": {"id": spec.id, "mem_size_mb": spec.mem_size_mb, "vcpu_count": spec.vcpu_count,
                 "kernel_img_path": spec.kernel_img_path, "kernel_args": list(spec.kernel_args),
                 "root_drive": spec.root_drive, "root_read_only": spec.root_read_only,
                 "drive_mounts": [{"image_path": d.image_path, "vm_path": d.vm_path,
                                   "fs_type": d.fs_type, "read_only": d.read_only}
                                  for d in spec.drive_mounts],
                 "labels": dict(spec.labels)},
        "status": vm.status, "accelerator": vm.accelerator, "tap": vm.tap,
        "address": vm.address, "stop_reason": vm.stop_reason, "kernel": vm.kernel,
        "qemu_pid": vm.qemu.process.host_pid if vm.qemu is not None and vm.status == RUNNING
        else None,
    }


def _machine_from_record(record: dict[str, Any]) -> VirtualMachine:
    raw = record["spec"]
    spec = MachineSpec(
        id=str(raw["id"]), mem_size_mb=int(raw["mem_size_mb"]), vcpu_count=int(raw["vcpu_count"]),
        kernel_img_path=str(raw["kernel_img_path"]),
        kernel_args=tuple(str(a) for a in raw["kernel_args"]),
        root_drive=str(raw["root_drive"]), root_read_only=bool(raw["root_read_only"]),
        drive_mounts=tuple(DriveSpec(str(d["image_path"]), str(d["vm_path"]), str(d["fs_type"]),
                                     bool(d["read_only"])) for d in raw["drive_mounts"]),
        # A manifest's ownership; absent from the records of older daemons.
        labels=tuple(sorted((str(k), str(v)) for k, v in dict(raw.get("labels", {})).items())))
    status = str(record["status"])
    if status not in (CREATED, RUNNING, SHUTDOWN):
        raise ValueError(f"status {status!r}")
    # A record is what this daemon wrote; validate it anyway as a request would be.
    validate_machine(spec, check_files=False)
    return VirtualMachine(spec, status=status, accelerator=str(record["accelerator"]),
                          tap=None if record["tap"] is None else str(record["tap"]),
                          address=str(record["address"]), stop_reason=str(record["stop_reason"]),
                          kernel=str(record.get("kernel") or ""))
