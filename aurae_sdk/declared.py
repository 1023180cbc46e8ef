"""Declared state, applied: what a node should run, the plan that gets it there, and its execution.

One engine, two front ends. A script builds a `Node` in Python (loops and functions welcome); a
manifest (`aurae_sdk.manifest`) builds the same `Node` from YAML. Either way

    plan = aurae_sdk.plan(client, node)         # what would change, changes nothing
    aurae_sdk.apply(client, node, prune=True)   # make it so; returns the plan it carried out
    aurae_sdk.delete(client, node)              # remove what the node declares

The node itself records who owns what, in the labels of each cell: `aurae-py.io/owner` names the
owner (a manifest, a CI job), and `exe.aurae-py.io/<executable>` records the spec each executable
was started with (uid, gid, a digest of its command line, its restart policy). So two operators,
or two CI runs, planning against the same node see the same truth, and `prune` removes only cells
this owner made. What has no cell to hold its records keeps its own labels: a host-level
executable (`aurae-py.io/owner` and `aurae-py.io/spec`, kept by the daemon with the process), a
spawned instance and a virtual machine. What runs inside a spawned instance is planned against
that instance's own API, and its steps say which instance (`[build-1] web`).

What the node can change in place (limits, labels) is an update; what it cannot (isolation, a limit
going back to unset, an executable's command or restart policy, an instance's limits, a VM's
hardware) is a replace: free and allocate again, or stop and start again. The plan says which,
and why.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

from aurae_sdk.errors import AuraeError, NotFound
from aurae_sdk.units import format_bytes, parse_bytes

if TYPE_CHECKING:
    from aurae_sdk.client import Client
    from aurae_sdk.wire.generated.pb.cells import cells_pb2

OWNER_LABEL = "aurae-py.io/owner"
EXECUTABLE_LABEL_PREFIX = "exe.aurae-py.io/"
# On a host-level executable's own labels: the spec it was started with (Executable.record).
SPEC_LABEL = "aurae-py.io/spec"
# How plans name host-level executables: no cell before the colon.
HOST = ""
RESERVED_LABEL_DOMAIN = "aurae-py.io"

Action = Literal["create", "update", "replace", "delete", "no-op"]
Kind = Literal["cell", "executable", "instance", "vm"]

# Limits in the API's dotted terms, in the order plans show them.
LIMITS = ("cpu.weight", "cpu.max", "cpu.period", "cpuset.cpus", "cpuset.mems",
          "memory.min", "memory.low", "memory.high", "memory.max")
_MEMORY = frozenset(name for name in LIMITS if name.startswith("memory."))


class DeclaredStateError(ValueError):
    """The declared state is invalid, or the node holds something it must not take over.

    `source` is where it was declared (`file:line` for manifests), when known.
    """

    def __init__(self, message: str, source: Source | None = None) -> None:
        super().__init__(f"{source}: {message}" if source else message)
        self.source = source


@dataclass(frozen=True)
class Source:
    """Where something was declared: a manifest file and line (1-based)."""

    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


RestartPolicy = Literal["no", "on-failure", "always"]
RESTART_POLICIES: tuple[RestartPolicy, ...] = ("no", "on-failure", "always")
# The wire enum's names, by the manifest's; its numbers are the index in RESTART_POLICIES.
_RESTART_ENUM = {"no": "EXECUTABLE_RESTART_POLICY_NO",
                 "on-failure": "EXECUTABLE_RESTART_POLICY_ON_FAILURE",
                 "always": "EXECUTABLE_RESTART_POLICY_ALWAYS"}
# The restart fields in the order a record keeps them (after the policy's letter).
RESTART_TUNING = ("restart_delay_ms", "restart_max_delay_ms", "start_limit_burst",
                  "start_limit_interval_ms")
# How plans (and manifests) name them.
RESTART_FIELD_NAMES = {"restart": "restart.policy", "restart_delay_ms": "restart.delay_ms",
                       "restart_max_delay_ms": "restart.max_delay_ms",
                       "start_limit_burst": "restart.start_limit.burst",
                       "start_limit_interval_ms": "restart.start_limit.interval_ms"}


@dataclass(frozen=True)
class Executable:
    """A process a cell should run: a shell command line under a name unique in its cell.

    `restart`: what the node does when it exits ("no", "on-failure", "always"); the delay
    before the first restart, the longest delay backing off reaches, and the start limit
    (at most `start_limit_burst` starts within `start_limit_interval_ms`) tune it.
    """

    name: str
    command: str
    uid: int | None = None
    gid: int | None = None
    description: str = ""
    restart: RestartPolicy = "no"
    restart_delay_ms: int | None = None
    restart_max_delay_ms: int | None = None
    start_limit_burst: int | None = None
    start_limit_interval_ms: int | None = None
    source: Source | None = field(default=None, compare=False, repr=False)
    field_sources: Mapping[str, Source] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.restart not in RESTART_POLICIES:
            raise DeclaredStateError(
                f"executable {self.name}: restart must be one of {', '.join(RESTART_POLICIES)}, "
                f"not {self.restart!r}", self.field_sources.get("restart", self.source))

    @property
    def record(self) -> str:
        """The label value recording this spec on the node (at most 63 characters):
        uid.gid.digest, then, with a restart policy, .P_delay_max_burst_interval (P its first
        letter, numbers in base 36; x: unset)."""
        digest = hashlib.sha256(f"{self.command}\0{self.description}".encode()).hexdigest()[:16]
        uid = "x" if self.uid is None else str(self.uid)
        gid = "x" if self.gid is None else str(self.gid)
        if self.restart == "no" and not any(getattr(self, t) is not None
                                            for t in RESTART_TUNING):
            return f"{uid}.{gid}.{digest}"
        tuning = "_".join(_base36(getattr(self, t)) for t in RESTART_TUNING)
        return f"{uid}.{gid}.{digest}.{self.restart[0]}_{tuning}"

    def restart_fields(self) -> dict[str, Any]:
        """The Executable message's restart fields for Start."""
        fields: dict[str, Any] = {"restart_policy": _RESTART_ENUM[self.restart]}
        for name in ("restart_delay_ms", "restart_max_delay_ms"):
            if getattr(self, name) is not None:
                fields[name] = getattr(self, name)
        if self.start_limit_burst is not None or self.start_limit_interval_ms is not None:
            fields["start_limit"] = {"burst": self.start_limit_burst or 0,
                                     "interval_ms": self.start_limit_interval_ms or 0}
        return fields


def _base36(value: int | None) -> str:
    if value is None:
        return "x"
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    text = ""
    while True:
        value, digit = divmod(value, 36)
        text = digits[digit] + text
        if not value:
            return text


def _recorded_restart(recorded: str | None) -> dict[str, Any] | None:
    """The restart spec a record keeps: policy and tuning; None for a record without one
    (an executable started with no restart policy, or by an older aurae-py)."""
    parts = (recorded or "").split(".")
    if len(parts) != 4:
        return None
    letter, *tuning = parts[3].split("_")
    policy = {p[0]: p for p in RESTART_POLICIES}.get(letter)
    if policy is None or len(tuning) != len(RESTART_TUNING):
        return None
    spec: dict[str, Any] = {"restart": policy}
    for name, text in zip(RESTART_TUNING, tuning):
        spec[name] = None if text == "x" else int(text, 36)
    return spec


@dataclass(frozen=True)
class Cell:
    """A cell the node should have. `name` is one label; nested `cells` live inside it.

    Limits use the API's units: CPU in microseconds per period, memory in bytes (or "256M").
    """

    name: str
    cpu_weight: int | None = None
    cpu_max: int | None = None
    cpu_period: int | None = None
    cpuset_cpus: str | None = None
    cpuset_mems: str | None = None
    memory_min: int | str | None = None
    memory_low: int | str | None = None
    memory_high: int | str | None = None
    memory_max: int | str | None = None
    isolate_process: bool = False
    isolate_network: bool = False
    labels: Mapping[str, str] = field(default_factory=dict)
    executables: Sequence[Executable] = ()
    cells: Sequence[Cell] = ()
    source: Source | None = field(default=None, compare=False, repr=False)
    # Where each field was declared ("memory.max" -> Source), so a node's error names its line.
    field_sources: Mapping[str, Source] = field(default_factory=dict, compare=False, repr=False)

    def limits(self) -> dict[str, int | str]:
        """The limits that are set, by dotted name, memory in bytes."""
        result: dict[str, int | str] = {}
        for name in LIMITS:
            value = getattr(self, name.replace(".", "_"))
            if value is None:
                continue
            if name in _MEMORY:
                try:
                    value = parse_bytes(value)
                except (TypeError, ValueError) as error:
                    raise DeclaredStateError(
                        f"cell {self.name}: {name}: {error}", self.field_sources.get(name, self.source)
                    ) from None
            result[name] = value
        return result


@dataclass(frozen=True)
class Instance:
    """A spawned instance the node should run (a nested auraed in an isolated cell of its
    own), with its limits and what runs inside it: `cells` and host-level `executables` of
    the instance, planned against the instance's own API (`client.instance(name)`).

    Memory in bytes (or "512M"); CPU max in microseconds per 100 ms period.
    """

    name: str
    cpu_weight: int | None = None
    cpu_max: int | None = None
    cpuset_cpus: str | None = None
    memory_max: int | str | None = None
    pids_max: int | None = None
    cells: Sequence[Cell] = ()
    executables: Sequence[Executable] = ()
    source: Source | None = field(default=None, compare=False, repr=False)
    field_sources: Mapping[str, Source] = field(default_factory=dict, compare=False, repr=False)

    def limits(self) -> dict[str, int | str]:
        """The limits that are set, by InstanceLimits field name, memory in bytes."""
        result: dict[str, int | str] = {}
        for name in INSTANCE_LIMITS:
            value = getattr(self, name)
            if value is None:
                continue
            if name == "memory_max":
                try:
                    value = parse_bytes(value)
                except (TypeError, ValueError) as error:
                    raise DeclaredStateError(
                        f"instance {self.name}: memory_max: {error}",
                        self.field_sources.get("limits.memory_max", self.source)) from None
            result[name] = value
        return result

    def inside(self, owner: str) -> Node:
        """What runs in the instance, as a node of the same owner."""
        return Node(owner=owner, cells=self.cells, executables=self.executables,
                    source=self.source)


INSTANCE_LIMITS = ("cpu_weight", "cpu_max", "cpuset_cpus", "memory_max", "pids_max")


@dataclass(frozen=True)
class Drive:
    """A disk image a virtual machine mounts at `vm_path`."""

    image: str
    vm_path: str
    fs_type: str = "ext4"
    read_only: bool = False


@dataclass(frozen=True)
class VirtualMachine:
    """A virtual machine the node should have (VmService): allocated, and booted unless
    `running` is False. `kernel` "" is the daemon's own guest kernel."""

    id: str
    memory_mb: int = 256
    vcpus: int = 1
    kernel: str = ""
    kernel_args: Sequence[str] = ()
    root_drive: str = ""
    root_read_only: bool = False
    drives: Sequence[Drive] = ()
    running: bool = True
    source: Source | None = field(default=None, compare=False, repr=False)
    field_sources: Mapping[str, Source] = field(default_factory=dict, compare=False, repr=False)

    @property
    def record(self) -> str:
        """A digest of what List does not report (kernel arguments, drives), kept in the
        machine's labels."""
        text = "\0".join([self.kernel, " ".join(self.kernel_args), self.root_drive,
                          str(self.root_read_only),
                          *(f"{d.image}\1{d.vm_path}\1{d.fs_type}\1{d.read_only}"
                            for d in self.drives)])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def message(self, owner: str) -> dict[str, Any]:
        return {"id": self.id, "mem_size_mb": self.memory_mb, "vcpu_count": self.vcpus,
                "kernel_img_path": self.kernel, "kernel_args": list(self.kernel_args),
                "root_drive": {"image_path": self.root_drive, "read_only": self.root_read_only},
                "drive_mounts": [{"image_path": d.image, "vm_path": d.vm_path,
                                  "fs_type": d.fs_type, "read_only": d.read_only}
                                 for d in self.drives],
                "labels": {OWNER_LABEL: owner, SPEC_LABEL: self.record}}


@dataclass(frozen=True)
class Node:
    """Everything one owner declares for a node. `owner` is recorded on every cell it makes.

    `executables` run at host level, in no cell; their ownership is recorded in their own
    labels (Executable.labels), which the daemon keeps with each process.
    """

    owner: str
    cells: Sequence[Cell] = ()
    executables: Sequence[Executable] = ()
    instances: Sequence[Instance] = ()
    vms: Sequence[VirtualMachine] = ()
    source: Source | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Change:
    """One field that differs: its dotted name, the node's value and the declared one."""

    field: str
    before: Any
    after: Any

    def __str__(self) -> str:
        return f"{self.field}: {_show(self.field, self.before)} -> {_show(self.field, self.after)}"


@dataclass(frozen=True)
class Step:
    """One thing the plan does to one cell or executable."""

    action: Action
    kind: Kind
    # A cell's path ("web/worker"), or an executable's cell path and name ("web/worker:app").
    name: str
    changes: tuple[Change, ...] = ()
    reason: str = ""
    source: Source | None = field(default=None, compare=False, repr=False)
    # The spawned instance the step happens in ("" for the node itself).
    instance: str = ""

    @property
    def cell(self) -> str:
        return self.name.partition(":")[0]

    def __str__(self) -> str:
        symbol = _SYMBOLS[self.action]
        where = f"[{self.instance}] " if self.instance else ""
        text = f"{symbol} {self.action:<8} {self.kind:<10} {where}{self.name}"
        if self.reason:
            text += f"  ({self.reason})"
        return "\n".join([text, *(f"      {change}" for change in self.changes)])


_SYMBOLS = {"create": "+", "update": "~", "replace": "±", "delete": "-", "no-op": "="}


@dataclass(frozen=True)
class Plan:
    """The steps that take the node from what it runs to what is declared, in order."""

    owner: str
    steps: tuple[Step, ...]
    # Desired cells by path, for the executor (not part of what a plan compares equal on).
    _cells: Mapping[str, _FlatCell] = field(default_factory=dict, compare=False, repr=False)
    # Desired host-level executables by name, for the executor.
    _host: Mapping[str, Executable] = field(default_factory=dict, compare=False, repr=False)
    # Spawned instances: declared, and the plans of what runs inside each (by name).
    _instances: Mapping[str, Instance] = field(default_factory=dict, compare=False, repr=False)
    _inside: Mapping[str, Plan] = field(default_factory=dict, compare=False, repr=False)
    _vms: Mapping[str, VirtualMachine] = field(default_factory=dict, compare=False, repr=False)

    @property
    def changes(self) -> list[Step]:
        return [step for step in self.steps if step.action != "no-op"]

    @property
    def changed(self) -> bool:
        return bool(self.changes)

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(("create", "update", "replace", "delete", "no-op"), 0)
        for step in self.steps:
            counts[step.action] += 1
        return counts

    def summary(self) -> str:
        counts = self.counts()
        if not self.changed:
            return f"No changes: the node matches ({counts['no-op']} unchanged)."
        return (f"Plan: {counts['create']} to create, {counts['update']} to update, "
                f"{counts['replace']} to replace, {counts['delete']} to delete, "
                f"{counts['no-op']} unchanged.")

    def render(self, *, verbose: bool = False) -> str:
        """The plan as people read it: one block per change, then the counts."""
        shown = self.steps if verbose else tuple(self.changes)
        return "\n".join([*(str(step) for step in shown), self.summary()])

    def __str__(self) -> str:
        return self.render()


# ---------------------------------------------------------------------------------- the node


@dataclass(frozen=True)
class _FlatCell:
    path: str
    cell: Cell
    limits: dict[str, int | str]
    labels: dict[str, str]  # user labels plus the ownership records

    @property
    def parent(self) -> str | None:
        head, _, _ = self.path.rpartition("/")
        return head or None


@dataclass
class _Observed:
    cell: cells_pb2.Cell
    executables: dict[str, cells_pb2.ExecutableStatus]

    @property
    def path(self) -> str:
        return self.cell.name

    @property
    def labels(self) -> dict[str, str]:
        return dict(self.cell.labels)

    @property
    def owner(self) -> str | None:
        return self.cell.labels.get(OWNER_LABEL)

    def limits(self) -> dict[str, int | str]:
        result: dict[str, int | str] = {}
        for name in LIMITS:
            controller, _, attribute = name.partition(".")
            message = getattr(self.cell, controller)
            if message.HasField(attribute):
                result[name] = getattr(message, attribute)
        return result


def observe(client: Client) -> dict[str, _Observed]:
    """Every cell of the node by path, parents before children."""
    return _observe_node(client)[0]


def _observe_node(client: Client
                  ) -> tuple[dict[str, _Observed], dict[str, cells_pb2.ExecutableStatus]]:
    """Every cell by path, parents before children; and the host-level executables by name."""
    from aurae_sdk.cell_tree import list_pages, merge_pages

    found: dict[str, _Observed] = {}

    def walk(nodes: Iterator[cells_pb2.CellGraphNode]) -> None:
        for node in nodes:
            found[node.cell.name] = _Observed(
                node.cell, {e.name: e for e in node.executables}
            )
            walk(iter(node.children))

    # Every page of List: a plan must see the whole node.
    pages = list(list_pages(client))
    walk(iter(merge_pages(pages)))
    return found, {e.name: e for page in pages for e in page.host_executables}


def _flatten(node: Node) -> dict[str, _FlatCell]:
    if not isinstance(node, Node):
        raise TypeError(f"expected an aurae_sdk.declared.Node, got {type(node).__name__}")
    _check_label_value("owner", node.owner, node.source)
    flat: dict[str, _FlatCell] = {}

    def visit(cell: Cell, parent: str | None) -> None:
        if not cell.name or "/" in cell.name:
            raise DeclaredStateError(
                f"cell name {cell.name!r} must be one name; nest cells with `cells`", cell.source)
        path = f"{parent}/{cell.name}" if parent else cell.name
        if path in flat:
            raise DeclaredStateError(f"cell {path} is declared twice", cell.source)
        labels = dict(cell.labels)
        for key in labels:
            domain = key.rpartition("/")[0]
            if domain == RESERVED_LABEL_DOMAIN or domain.endswith("." + RESERVED_LABEL_DOMAIN):
                raise DeclaredStateError(
                    f"cell {path}: label {key!r}: the {RESERVED_LABEL_DOMAIN} prefix is aurae-py's "
                    "own", cell.field_sources.get(f"labels.{key}", cell.source))
        labels[OWNER_LABEL] = node.owner
        seen: set[str] = set()
        for executable in cell.executables:
            if executable.name in seen:
                raise DeclaredStateError(
                    f"executable {executable.name} is declared twice in cell {path}",
                    executable.source)
            seen.add(executable.name)
            labels[EXECUTABLE_LABEL_PREFIX + executable.name] = executable.record
        flat[path] = _FlatCell(path, cell, cell.limits(), labels)
        for child in cell.cells:
            visit(child, path)

    for cell in node.cells:
        visit(cell, None)
    return flat


def _host_executables(node: Node) -> dict[str, Executable]:
    declared: dict[str, Executable] = {}
    for executable in node.executables:
        if executable.name in declared:
            raise DeclaredStateError(
                f"executable {executable.name} is declared twice at host level",
                executable.source)
        declared[executable.name] = executable
    return declared


def _check_label_value(what: str, value: str, source: Source | None) -> None:
    import re

    if not re.fullmatch(r"[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?", value or ""):
        raise DeclaredStateError(
            f"{what} {value!r} must be 1-63 letters, digits, '-', '_' or '.', starting and ending "
            "with a letter or digit", source)


# ---------------------------------------------------------------------------------- planning


def plan(client: Client, node: Node, *, prune: bool = False) -> Plan:
    """What applying `node` would do to the node `client` talks to. Changes nothing.

    With `prune`, cells this owner made that `node` no longer declares are deleted.
    Raises DeclaredStateError when a declared cell exists but belongs to another owner.
    """
    return _plan_node(client, node, prune=prune)


def _plan_node(client: Client | None, node: Node, *, prune: bool, instance: str = "") -> Plan:
    """The plan of one daemon: the node's own, or (`instance`) a spawned instance's. A
    client of None stands for a daemon that does not exist yet (everything is created)."""
    desired = _flatten(node)
    declared = _host_executables(node)
    instances = _instances_of(node)
    vms = _vms_of(node)
    if instance and (instances or vms):
        raise DeclaredStateError(f"instance {instance}: instances and VMs are declared at the "
                                 "node's top level only", node.source)
    cells, host = _observe_node(client) if client is not None else ({}, {})
    planned = _plan(desired, cells, node.owner, prune=prune)
    steps = [*planned.steps, *_host_steps(declared, host, node.owner, prune)]
    if instance:
        steps = [replace(step, instance=instance) for step in steps]
        return Plan(node.owner, tuple(steps), planned._cells, declared)
    instance_steps, inside_plans = _instance_steps(client, node.owner, instances, prune)
    vm_steps = _vm_steps(client, node.owner, vms, prune) if vms or prune else []
    return Plan(node.owner, (*steps, *instance_steps, *vm_steps), planned._cells, declared,
                instances, inside_plans, vms)


def _instances_of(node: Node) -> dict[str, Instance]:
    from aurae_sdk.client import instance_path

    declared: dict[str, Instance] = {}
    for instance in node.instances:
        try:
            instance_path((), instance.name)
        except ValueError as error:
            raise DeclaredStateError(str(error), instance.source) from None
        if "/" in instance.name:
            raise DeclaredStateError(f"instance name {instance.name!r} must be one name",
                                     instance.source)
        if instance.name in declared:
            raise DeclaredStateError(f"instance {instance.name} is declared twice",
                                     instance.source)
        instance.limits()  # sizes checked now, with their lines
        declared[instance.name] = instance
    return declared


def _vms_of(node: Node) -> dict[str, VirtualMachine]:
    declared: dict[str, VirtualMachine] = {}
    for vm in node.vms:
        if vm.id in declared:
            raise DeclaredStateError(f"virtual machine {vm.id} is declared twice", vm.source)
        declared[vm.id] = vm
    return declared


def _instance_steps(client: Client | None, owner: str, declared: Mapping[str, Instance],
                    prune: bool) -> tuple[list[Step], dict[str, Plan]]:
    steps: list[Step] = []
    inside: dict[str, Plan] = {}
    if not declared and not prune:
        return steps, inside
    observed = ({i.instance.name: i for i in _listed(client, "instances", bool(declared))}
                if client is not None else {})
    for name, want in declared.items():
        have = observed.get(name)
        limits = want.limits()
        fields = tuple(Change(f"limits.{k}", None, v) for k, v in limits.items())
        if have is None:
            steps.append(Step("create", "instance", name, fields, "", want.source))
            inside[name] = _plan_node(None, want.inside(owner), prune=prune, instance=name)
            continue
        holder = have.instance.labels.get(OWNER_LABEL)
        if holder != owner:
            held = f"owner {holder!r}" if holder else "no aurae-py owner"
            raise DeclaredStateError(
                f"instance {name} exists on the node with {held}, not {owner!r}: free it, or "
                "declare it under that owner", want.source)
        have_message: Any = have.instance.limits
        have_limits = {k: getattr(have_message, k) for k in INSTANCE_LIMITS
                       if have_message.HasField(k)}
        changes = tuple(Change(f"limits.{k}", have_limits.get(k), limits.get(k))
                        for k in INSTANCE_LIMITS if have_limits.get(k) != limits.get(k))
        if changes:
            steps.append(Step("replace", "instance", name, changes,
                              "an instance's limits cannot change in place: no call changes a "
                              "spawned instance", want.source))
            created = _plan_node(None, want.inside(owner), prune=prune, instance=name)
            inside[name] = replace(created, steps=tuple(
                replace(step, reason=step.reason or f"instance {name} is replaced")
                for step in created.steps))
            continue
        steps.append(Step("no-op", "instance", name, (), "", want.source))
        assert client is not None
        inside[name] = _plan_node(client.instance(name), want.inside(owner), prune=prune,
                                  instance=name)
    ordered: list[Step] = []
    for step in steps:
        ordered.append(step)
        ordered.extend(inside[step.name].steps)
    if prune:
        for name, have in observed.items():
            if name not in declared and have.instance.labels.get(OWNER_LABEL) == owner:
                ordered.append(Step("delete", "instance", name, (), "no longer declared"))
    return ordered, inside


def _listed(client: Client, service: str, needed: bool) -> list[Any]:
    """The instances or VMs a daemon runs. One that has no such service (a guest's auraed, a
    daemon built without it) runs none: that is only an error when some are declared."""
    from aurae_sdk.errors import Unimplemented

    try:
        if service == "instances":
            return list(client.instances.list().instances)
        return list(client.vms.list().machines)
    except Unimplemented:
        if needed:
            raise
        return []


def _vm_steps(client: Client | None, owner: str, declared: Mapping[str, VirtualMachine],
              prune: bool) -> list[Step]:
    observed = ({m.id: m for m in _listed(client, "vms", bool(declared))}
                if client is not None else {})
    steps: list[Step] = []
    for vm_id, want in declared.items():
        have = observed.get(vm_id)
        fields = [Change("memory_mb", None, want.memory_mb), Change("vcpus", None, want.vcpus)]
        if want.kernel:
            fields.append(Change("kernel", None, want.kernel))
        if not want.running:
            fields.append(Change("running", None, False))
        if have is None:
            steps.append(Step("create", "vm", vm_id, tuple(fields),
                              "" if want.running else "allocated, not started", want.source))
            continue
        holder = have.labels.get(OWNER_LABEL)
        if holder != owner:
            held = f"owner {holder!r}" if holder else "no aurae-py owner"
            raise DeclaredStateError(
                f"virtual machine {vm_id} exists on the node with {held}, not {owner!r}: free "
                "it, or declare it under that owner", want.source)
        changes: list[Change] = []
        if have.mem_size_mb != want.memory_mb:
            changes.append(Change("memory_mb", have.mem_size_mb, want.memory_mb))
        if have.vcpu_count != want.vcpus:
            changes.append(Change("vcpus", have.vcpu_count, want.vcpus))
        if want.kernel and have.kernel_img_path != want.kernel:
            changes.append(Change("kernel", have.kernel_img_path, want.kernel))
        if have.labels.get(SPEC_LABEL) != want.record and not changes:
            changes.append(Change("kernel_args, drives", "(recorded differs)", "(as declared)"))
        if changes:
            steps.append(Step("replace", "vm", vm_id, tuple(changes),
                              "a virtual machine's hardware cannot change in place", want.source))
            continue
        # Restoring and Unresponsive: re-adopted after a daemon restart, QEMU running.
        running = have.status in ("Running", "Restoring", "Unresponsive")
        if running != want.running:
            steps.append(Step("update", "vm", vm_id,
                              (Change("running", running, want.running),),
                              "" if want.running else "stopped", want.source))
            continue
        steps.append(Step("no-op", "vm", vm_id, (), "", want.source))
    if prune:
        for vm_id, have in observed.items():
            if vm_id not in declared and have.labels.get(OWNER_LABEL) == owner:
                steps.append(Step("delete", "vm", vm_id, (), "no longer declared"))
    return steps


def _host_steps(declared: Mapping[str, Executable],
                observed: Mapping[str, cells_pb2.ExecutableStatus], owner: str,
                prune: bool) -> list[Step]:
    steps: list[Step] = []
    for name, want in declared.items():
        key = f"{HOST}:{name}"
        status = observed.get(name)
        if status is None:
            steps.append(Step("create", "executable", key, _executable_fields(want), "",
                              want.source))
            continue
        holder = status.labels.get(OWNER_LABEL)
        if holder != owner:
            if status.state == 1:
                held = f"owner {holder!r}" if holder else "no aurae-py owner"
                raise DeclaredStateError(
                    f"executable {name} runs at host level with {held}, not {owner!r}: stop "
                    "it, or declare it under that owner", want.source)
            steps.append(Step("create", "executable", key, _executable_fields(want),
                              f"the name was used by an executable that {_ended(status)}",
                              want.source))
            continue
        changes = _executable_diff(status, status.labels.get(SPEC_LABEL), want)
        if changes:
            steps.append(Step("replace", "executable", key, changes, _replace_reason(changes),
                              want.source))
        else:
            note = "" if status.state == 1 else _ended(status)
            steps.append(Step("no-op", "executable", key, (), note, want.source))
    if prune:
        for name, status in observed.items():
            if name not in declared and status.labels.get(OWNER_LABEL) == owner:
                steps.append(Step("delete", "executable", f"{HOST}:{name}", (),
                                  "no longer declared"))
    return steps


def _plan(desired: dict[str, _FlatCell], observed: dict[str, _Observed], owner: str, *,
          prune: bool) -> Plan:
    steps: list[Step] = []
    # Cells freed by this plan (replaced or deleted): everything inside goes with them.
    freed: list[str] = []

    def inside_freed(path: str) -> str | None:
        for top in freed:
            if path.startswith(top + "/"):
                return top
        return None

    for path, want in desired.items():
        have = observed.get(path)
        gone_with = inside_freed(path)
        if have is not None and gone_with is None and have.owner != owner:
            held = f"owner {have.owner!r}" if have.owner else "no aurae-py owner"
            raise DeclaredStateError(
                f"cell {path} exists on the node with {held}, not {owner!r}: free it, or declare "
                "it under that owner", want.cell.source)
        if have is None or gone_with is not None:
            reason = f"{gone_with} is replaced" if have is not None else ""
            steps.append(Step("create", "cell", path, _cell_fields(want), reason, want.cell.source))
            steps.extend(Step("create", "executable", f"{path}:{e.name}", _executable_fields(e),
                              "", e.source) for e in want.cell.executables)
            continue
        changes, replace_reason = _cell_diff(have, want)
        if replace_reason:
            freed.append(path)
            steps.append(Step("replace", "cell", path, changes, replace_reason, want.cell.source))
            steps.extend(Step("create", "executable", f"{path}:{e.name}", _executable_fields(e),
                              f"{path} is replaced", e.source) for e in want.cell.executables)
            steps.extend(_freed_by(path, desired, observed))
            continue
        action: Action = "update" if changes else "no-op"
        steps.append(Step(action, "cell", path, changes, "", want.cell.source))
        steps.extend(_executable_steps(have, want))

    if prune:
        for path, have in observed.items():
            if path in desired or have.owner != owner or inside_freed(path):
                continue
            freed.append(path)
            steps.append(Step("delete", "cell", path, (), "no longer declared"))
    return Plan(owner, tuple(steps), desired)


def _freed_by(path: str, desired: Mapping[str, _FlatCell],
              observed: Mapping[str, _Observed]) -> list[Step]:
    """Delete steps for undeclared cells inside a cell being replaced: they go with it."""
    return [Step("delete", "cell", inner, (), f"inside {path}, which is replaced")
            for inner in observed if inner.startswith(path + "/") and inner not in desired]


def _cell_diff(have: _Observed, want: _FlatCell) -> tuple[tuple[Change, ...], str]:
    """The changes, and why they need a replace ("" when they can be made in place)."""
    changes: list[Change] = []
    reasons: list[str] = []
    for kind in ("process", "network"):
        before = getattr(have.cell, f"isolate_{kind}")
        after = getattr(want.cell, f"isolate_{kind}")
        if before != after:
            changes.append(Change(f"isolation.{kind}", before, after))
            reasons.append(f"isolation.{kind} cannot change in place")
    have_limits, want_limits = have.limits(), want.limits
    for name in LIMITS:
        before, after = have_limits.get(name), want_limits.get(name)
        if before != after:
            changes.append(Change(name, before, after))
            if after is None:
                reasons.append(f"{name} cannot be unset in place")
    have_labels = {k: v for k, v in have.labels.items() if not _is_record(k)}
    want_labels = {k: v for k, v in want.labels.items() if not _is_record(k)}
    for key in sorted(have_labels.keys() | want_labels.keys()):
        if have_labels.get(key) != want_labels.get(key):
            changes.append(Change(f"labels.{key}", have_labels.get(key), want_labels.get(key)))
    return tuple(changes), "; ".join(reasons)


def _is_record(key: str) -> bool:
    return key.startswith(EXECUTABLE_LABEL_PREFIX) or key == OWNER_LABEL


def _executable_steps(have: _Observed, want: _FlatCell) -> list[Step]:
    steps: list[Step] = []
    declared = {e.name: e for e in want.cell.executables}
    for name in have.executables:
        if name not in declared and EXECUTABLE_LABEL_PREFIX + name in have.labels:
            steps.append(Step("delete", "executable", f"{have.path}:{name}", (),
                              "no longer declared"))
    for name, executable in declared.items():
        key = f"{have.path}:{name}"
        status = have.executables.get(name)
        if status is None:
            steps.append(Step("create", "executable", key, _executable_fields(executable), "",
                              executable.source))
            continue
        recorded = have.labels.get(EXECUTABLE_LABEL_PREFIX + name)
        changes = _executable_diff(status, recorded, executable)
        if changes:
            steps.append(Step("replace", "executable", key, changes,
                              _replace_reason(changes), executable.source))
        else:
            note = "" if status.state == 1 else _ended(status)
            steps.append(Step("no-op", "executable", key, (), note, executable.source))
    return steps


def _ended(status: cells_pb2.ExecutableStatus) -> str:
    if status.HasField("exit_code"):
        return f"exited with {status.exit_code}"
    if status.HasField("signal"):
        return f"killed by signal {status.signal}"
    return "exited"


def _executable_diff(status: cells_pb2.ExecutableStatus, recorded: str | None,
                     want: Executable) -> tuple[Change, ...]:
    if recorded == want.record and status.command == want.command:
        return ()
    changes: list[Change] = []
    if status.command != want.command:
        changes.append(Change("command", status.command, want.command))
    uid, gid, _digest = (recorded or "?.?.?").split(".")[:3]
    for name, before in (("uid", uid), ("gid", gid)):
        after = getattr(want, name)
        before_value = None if before == "x" else (before if before == "?" else int(before))
        if before_value != after:
            changes.append(Change(name, before_value, after))
    restart = _recorded_restart(recorded) or {
        "restart": RESTART_POLICIES[status.restart_policy]
        if status.restart_policy < len(RESTART_POLICIES) else "no",
        **dict.fromkeys(RESTART_TUNING)}
    for name in ("restart", *RESTART_TUNING):
        if restart[name] != getattr(want, name):
            changes.append(Change(RESTART_FIELD_NAMES[name], restart[name],
                                  getattr(want, name)))
    if not changes:
        changes.append(Change("description", "(recorded differs)", want.description))
    return tuple(changes)


def _replace_reason(changes: tuple[Change, ...]) -> str:
    """Why an executable's changes need a Stop and a Start."""
    if all(change.field.startswith("restart.") for change in changes):
        return "a restart policy cannot change in place: no call changes a running executable"
    return "a process cannot change in place"


def _cell_fields(want: _FlatCell) -> tuple[Change, ...]:
    changes = [Change(name, None, value) for name, value in want.limits.items()]
    for kind in ("process", "network"):
        if getattr(want.cell, f"isolate_{kind}"):
            changes.append(Change(f"isolation.{kind}", None, True))
    changes.extend(Change(f"labels.{k}", None, v) for k, v in sorted(want.cell.labels.items()))
    return tuple(changes)


def _executable_fields(executable: Executable) -> tuple[Change, ...]:
    changes = [Change("command", None, executable.command)]
    for name in ("uid", "gid"):
        if getattr(executable, name) is not None:
            changes.append(Change(name, None, getattr(executable, name)))
    if executable.restart != "no":
        changes.append(Change("restart.policy", None, executable.restart))
    for name in RESTART_TUNING:
        if getattr(executable, name) is not None:
            changes.append(Change(RESTART_FIELD_NAMES[name], None, getattr(executable, name)))
    return tuple(changes)


def _show(name: str, value: Any) -> str:
    if value is None:
        return "(unset)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if name in _MEMORY and isinstance(value, int):
        return format_bytes(value)
    if isinstance(value, str):
        return repr(value)
    return str(value)


# ---------------------------------------------------------------------------------- executing


# Told of each step once it is done (progress displays).
StepDone = Callable[[Step], None]


def apply(client: Client, node: Node, *, prune: bool = False, dry_run: bool = False,
          on_step: StepDone | None = None) -> Plan:
    """Make the node run what `node` declares; return the plan that was carried out.

    Applying the same declaration again finds nothing to do. With `dry_run`, only plans. A
    failing step raises its AuraeError, prefixed with where the failing thing was declared;
    the steps before it stay done (applying again continues from there).
    """
    planned = plan(client, node, prune=prune)
    if not dry_run:
        execute(client, planned, on_step=on_step)
    return planned


def delete(client: Client, node: Node, *, dry_run: bool = False,
           on_step: StepDone | None = None) -> Plan:
    """Free every declared cell this owner made (nested ones go with their parents)."""
    desired = _flatten(node)
    observed, host = _observe_node(client)
    declared_host = _host_executables(node)
    steps: list[Step] = []
    for path, want in desired.items():
        have = observed.get(path)
        if have is None:
            continue
        if have.owner != node.owner:
            steps.append(Step("no-op", "cell", path, (),
                              f"kept: owned by {have.owner or 'no aurae-py owner'}",
                              want.cell.source))
            continue
        if any(path.startswith(s.name + "/") for s in steps if s.action == "delete"):
            continue
        steps.append(Step("delete", "cell", path, (), "", want.cell.source))
    for name, executable in declared_host.items():
        status = host.get(name)
        if status is None:
            continue
        holder = status.labels.get(OWNER_LABEL)
        if holder != node.owner:
            steps.append(Step("no-op", "executable", f"{HOST}:{name}", (),
                              f"kept: owned by {holder or 'no aurae-py owner'}",
                              executable.source))
            continue
        steps.append(Step("delete", "executable", f"{HOST}:{name}", (), "", executable.source))
    instances = _instances_of(node)
    if instances:
        running = {i.instance.name: i for i in client.instances.list().instances}
        for name, instance in instances.items():
            if name not in running:
                continue
            holder = running[name].instance.labels.get(OWNER_LABEL)
            if holder != node.owner:
                steps.append(Step("no-op", "instance", name, (),
                                  f"kept: owned by {holder or 'no aurae-py owner'}",
                                  instance.source))
                continue
            # What runs inside goes with it.
            steps.append(Step("delete", "instance", name, (), "", instance.source))
    vms = _vms_of(node)
    if vms:
        machines = {m.id: m for m in client.vms.list().machines}
        for vm_id, vm in vms.items():
            if vm_id not in machines:
                continue
            holder = machines[vm_id].labels.get(OWNER_LABEL)
            if holder != node.owner:
                steps.append(Step("no-op", "vm", vm_id, (),
                                  f"kept: owned by {holder or 'no aurae-py owner'}", vm.source))
                continue
            steps.append(Step("delete", "vm", vm_id, (), "", vm.source))
    planned = Plan(node.owner, tuple(steps), desired, declared_host, instances, {}, vms)
    if not dry_run:
        execute(client, planned, on_step=on_step)
    return planned


# How long a spawned instance and a virtual machine get to come up: a loaded machine starts a
# nested daemon slowly, and a guest under TCG takes about a minute.
SPAWN_TIMEOUT = 120.0
BOOT_TIMEOUT = 600.0


def execute(client: Client, planned: Plan, *, on_step: StepDone | None = None,
            on_begin: StepDone | None = None) -> None:
    """Carry out a plan's steps in order. `on_begin` is told of each step before it runs
    (a VM's boot takes a while), `on_step` once it is done."""
    # Per daemon ("" the node's own, else an instance's): cells whose executables changed.
    touched: dict[str, dict[str, Action]] = {}
    for step in planned.steps:
        if on_begin is not None and step.action != "no-op":
            on_begin(step)
        plan_of = planned._inside.get(step.instance, planned) if step.instance else planned
        target = client.instance(step.instance) if step.instance else client
        try:
            if step.kind == "instance":
                _execute_instance(client, planned, step)
            elif step.kind == "vm":
                _execute_vm(client, planned, step)
            else:
                _execute_step(target, plan_of, step, touched.setdefault(step.instance, {}))
        except AuraeError as error:
            raise _located(error, step, plan_of) from None
        if on_step is not None:
            on_step(step)
    # Executables changed in a cell left as it was: record their new specs on it.
    for instance, cells_touched in touched.items():
        plan_of = planned._inside[instance] if instance else planned
        target = client.instance(instance) if instance else client
        for path, action in cells_touched.items():
            if action == "no-op" and path != HOST:
                _update(target, plan_of._cells[path])


def _execute_instance(client: Client, planned: Plan, step: Step) -> None:
    if step.action in ("replace", "delete"):
        try:
            client.instances.free(instance_name=step.name, timeout=SPAWN_TIMEOUT)
        except NotFound:
            pass
    if step.action in ("create", "replace"):
        want = planned._instances[step.name]
        client.instances.spawn(instance={
            "name": want.name, "limits": want.limits(),
            "labels": {OWNER_LABEL: planned.owner}}, timeout=SPAWN_TIMEOUT)


def _execute_vm(client: Client, planned: Plan, step: Step) -> None:
    if step.action in ("replace", "delete"):
        try:
            client.vms.free(vm_id=step.name, timeout=BOOT_TIMEOUT)
        except NotFound:
            pass
    if step.action == "delete":
        return
    want = planned._vms[step.name]
    if step.action in ("create", "replace"):
        client.vms.allocate(machine=want.message(planned.owner))
    if want.running and step.action != "no-op":
        client.vms.start(vm_id=want.id, timeout=BOOT_TIMEOUT)
    elif not want.running and step.action == "update":
        client.vms.stop(vm_id=want.id, timeout=BOOT_TIMEOUT)


def _execute_step(client: Client, planned: Plan, step: Step,
                  cells_touched: dict[str, Action]) -> None:
    if step.kind == "cell":
        if step.action == "delete":
            try:
                client.cells.free(cell_name=step.name)
            except NotFound:
                pass  # freed with a parent earlier in this plan
            return
        if step.action == "no-op":
            return
        want = planned._cells[step.name]
        if step.action == "replace":
            client.cells.free(cell_name=step.name)
        if step.action == "update":
            _update(client, want)
        else:
            client.cells.allocate(cell=_cell_message(want))
        cells_touched[step.name] = step.action
        return
    cell, _, name = step.name.partition(":")
    if step.action == "no-op":
        return
    cells_touched.setdefault(cell, "no-op")
    if step.action in ("replace", "delete"):
        try:
            client.cells.stop(cell_name=cell, executable_name=name)
        except NotFound:
            pass  # already stopped, or freed with its cell
    if step.action in ("create", "replace"):
        labels: dict[str, str] = {}
        if cell == HOST:
            declared = planned._host[name]
            # At host level there is no cell to keep the records: the executable keeps its own.
            labels = {OWNER_LABEL: planned.owner, SPEC_LABEL: declared.record}
        else:
            declared = {e.name: e for e in planned._cells[cell].cell.executables}[name]
        client.cells.start(
            cell_name=cell,
            executable={"name": name, "command": declared.command, "labels": labels,
                        "description": declared.description, **declared.restart_fields()},
            uid=declared.uid, gid=declared.gid,
        )


def _update(client: Client, want: _FlatCell) -> None:
    client.cells.update(cell=_cell_message(want))


def _cell_message(want: _FlatCell) -> dict[str, Any]:
    message: dict[str, Any] = {"name": want.path, "labels": want.labels,
                               "isolate_process": want.cell.isolate_process,
                               "isolate_network": want.cell.isolate_network}
    for name, value in want.limits.items():
        controller, _, attribute = name.partition(".")
        message.setdefault(controller, {})[attribute] = value
    return message


# The VirtualMachine message's fields, by the names manifests give them.
_VM_FIELDS = {"mem_size_mb": "memory_mb", "vcpu_count": "vcpus", "kernel_img_path": "kernel",
              "root_drive.image_path": "root_drive"}


def _located(error: AuraeError, step: Step, planned: Plan) -> AuraeError:
    """The error with where the failing thing was declared, down to the field's line."""
    source = step.source
    want = planned._cells.get(step.cell) if step.kind in ("cell", "executable") else None
    if step.kind in ("instance", "vm") and error.field:
        declared: Instance | VirtualMachine | Executable | None = (
            planned._instances.get(step.name) if step.kind == "instance"
            else planned._vms.get(step.name))
        if declared is not None:
            blamed = error.field.removeprefix("instance.").removeprefix("machine.")
            source = declared.field_sources.get(_VM_FIELDS.get(blamed, blamed), source)
    elif want is not None and error.field and step.kind == "cell":
        blamed = error.field.removeprefix("cell.")
        source = want.cell.field_sources.get(blamed.replace("isolate_", "isolation."), source)
    elif error.field and step.kind == "executable":
        name = step.name.partition(":")[2]
        declared = (planned._host.get(name) if step.cell == HOST else
                    {e.name: e for e in want.cell.executables}.get(name) if want else None)
        if declared is not None:
            blamed = error.field.removeprefix("executable.").replace("start_limit.", "start_limit_")
            blamed = {"restart_policy": "restart"}.get(blamed, blamed)
            source = declared.field_sources.get(RESTART_FIELD_NAMES.get(blamed, blamed), source)
    where = f"{source}: " if source else ""
    inside = f"[{step.instance}] " if step.instance else ""
    located = type(error)(f"{where}{step.action} {step.kind} {inside}{step.name}: "
                          f"{error.message}",
                          field=error.field, method=error.method)
    return located


__all__ = [
    "Cell",
    "Change",
    "DeclaredStateError",
    "Drive",
    "Executable",
    "Instance",
    "Node",
    "Plan",
    "Source",
    "Step",
    "VirtualMachine",
    "apply",
    "delete",
    "execute",
    "observe",
    "plan",
]
