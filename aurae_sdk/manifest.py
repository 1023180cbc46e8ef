"""YAML manifests: the declarative front end of `aurae_sdk.declared`.

    owner: web-stack            # recorded on every cell this manifest makes (default: file name)
    cells:
      - name: web
        cpu: {weight: 200, max: 50000, period: 100000}   # max and period in microseconds
        cpuset: {cpus: "0-1", mems: "0"}
        memory: {max: 256M, low: 64M}                      # bytes, or 512K, 256M, 1G
        isolation: {process: true, network: false}
        labels: {team: payments}
        executables:
          - name: app
            command: python3 -m http.server 8080
            uid: 1000
            gid: 1000
            restart: on-failure                            # or {policy: always, delay_ms: 200,
                                                           #  max_delay_ms: 5000,
                                                           #  start_limit: {burst: 5, interval_ms: 10000}}
        cells:                                             # nested: web/cache
          - name: cache
    executables:                # host level, in no cell (owned through their own labels)
      - {name: agent, command: sleep infinity, restart: always}
    instances:                  # spawned instances, with cells and executables inside
      - name: build-1
        limits: {cpu_weight: 200, cpu_max: 50000, cpuset_cpus: "0", memory_max: 512M,
                 pids_max: 300}
        cells: [{name: job}]
        executables: [{name: cache, command: sleep infinity}]
    vms:
      - id: ci-vm
        memory_mb: 256
        vcpus: 1
        kernel: /srv/vmlinux                               # default: the daemon's
        kernel_args: [quiet]
        root_drive: {image: /srv/root.ext4, read_only: true}
        drives: [{image: /srv/cache.ext4, vm_path: /cache, fs_type: ext4, read_only: false}]
        running: true                                      # false: allocated, not booted

Every error names the file and line it comes from: the document is composed into YAML nodes,
which keep their marks, and read from those rather than from plain dicts.
"""

from __future__ import annotations

import os
import re
from typing import Any

import yaml

from aurae_sdk.declared import (
    Cell,
    DeclaredStateError,
    Drive,
    Executable,
    Instance,
    Node,
    Source,
    VirtualMachine,
)

_CONTROLLERS: dict[str, dict[str, type]] = {
    "cpu": {"weight": int, "max": int, "period": int},
    "cpuset": {"cpus": str, "mems": str},
    "memory": {"min": str, "low": str, "high": str, "max": str},
}
_CELL_KEYS = ("name", *_CONTROLLERS, "isolation", "labels", "executables", "cells")
_EXECUTABLE_KEYS = ("name", "command", "uid", "gid", "description", "restart")
_RESTART_KEYS = ("policy", "delay_ms", "max_delay_ms", "start_limit")
_NODE_KEYS = ("owner", "cells", "executables", "instances", "vms")
_INSTANCE_KEYS = ("name", "limits", "cells", "executables")
_INSTANCE_LIMITS: dict[str, type] = {"cpu_weight": int, "cpu_max": int, "cpuset_cpus": str,
                                     "memory_max": str, "pids_max": int}
_VM_KEYS = ("id", "memory_mb", "vcpus", "kernel", "kernel_args", "root_drive", "drives",
            "running")
_DRIVE_KEYS = ("image", "vm_path", "fs_type", "read_only")


class ManifestError(DeclaredStateError):
    """A manifest is malformed; the message starts with file:line."""


def load(path: str | os.PathLike[str]) -> Node:
    """Read the manifest at `path` ("-" reads stdin)."""
    import sys

    name = os.fspath(path)
    if name == "-":
        return loads(sys.stdin.read(), "<stdin>", default_owner=None)
    try:
        with open(name, encoding="utf-8") as file:
            text = file.read()
    except OSError as error:
        raise ManifestError(f"cannot read manifest {name}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise ManifestError(f"manifest {name} is not UTF-8 text") from None
    stem = os.path.splitext(os.path.basename(name))[0]
    return loads(text, name, default_owner=re.sub(r"[^A-Za-z0-9_.-]", "-", stem).strip("-._"))


def loads(text: str, filename: str = "<manifest>", *, default_owner: str | None = None) -> Node:
    """Parse a manifest from text; `filename` is what errors name."""
    reader = _Reader(filename)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        line = mark.line + 1 if mark is not None else 1
        raise ManifestError(f"not valid YAML: {error.problem}", Source(filename, line)) from None
    except yaml.YAMLError as error:
        raise ManifestError(f"not valid YAML: {error}", Source(filename, 1)) from None
    if root is None:
        raise ManifestError("the manifest is empty: declare `owner` and `cells`",
                            Source(filename, 1))
    entries = reader.mapping(root, "the manifest", _NODE_KEYS)
    owner_node = entries.get("owner")
    if owner_node is not None:
        owner = reader.scalar(owner_node, "owner", str)
    elif default_owner:
        owner = default_owner
    else:
        raise ManifestError("`owner` is required when the manifest has no file name",
                            reader.source(root))
    cells = [reader.cell(item) for item in reader.sequence(entries.get("cells"), "cells")]
    host = [reader.executable(item, None)
            for item in reader.sequence(entries.get("executables"), "executables")]
    instances = [reader.instance(item)
                 for item in reader.sequence(entries.get("instances"), "instances")]
    vms = [reader.vm(item) for item in reader.sequence(entries.get("vms"), "vms")]
    return Node(owner=owner, cells=cells, executables=host, instances=instances, vms=vms,
                source=reader.source(owner_node or root))


class _Reader:
    def __init__(self, filename: str) -> None:
        self.filename = filename
        # Only its scalar constructors are used: YAML's own typing of 1, true, "1".
        self._loader = yaml.SafeLoader("")

    def source(self, node: yaml.Node) -> Source:
        return Source(self.filename, node.start_mark.line + 1)

    def fail(self, node: yaml.Node, message: str) -> ManifestError:
        return ManifestError(message, self.source(node))

    def mapping(self, node: yaml.Node, what: str, allowed: tuple[str, ...]) -> dict[str, yaml.Node]:
        if not isinstance(node, yaml.MappingNode):
            raise self.fail(node, f"{what} must be a mapping of {', '.join(allowed)}")
        entries: dict[str, yaml.Node] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if key not in allowed:
                raise self.fail(key_node, f"unknown key {key!r} in {what}; expected one of "
                                          f"{', '.join(allowed)}")
            if key in entries:
                raise self.fail(key_node, f"{key!r} is given twice in {what}")
            entries[key] = value_node
        return entries

    def sequence(self, node: yaml.Node | None, what: str) -> list[yaml.Node]:
        if node is None or (isinstance(node, yaml.ScalarNode) and node.tag.endswith(":null")):
            return []
        if not isinstance(node, yaml.SequenceNode):
            raise self.fail(node, f"{what} must be a list")
        return list(node.value)

    def scalar(self, node: yaml.Node, what: str, kind: type) -> Any:
        if not isinstance(node, yaml.ScalarNode):
            raise self.fail(node, f"{what} must be a {_KIND_NAMES[kind]}")
        value = self._loader.construct_object(node)
        if kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = node.value  # "0-1" or 256 written bare: keep the text
        if (kind is int and isinstance(value, bool)) or not isinstance(value, kind):
            raise self.fail(node, f"{what} must be a {_KIND_NAMES[kind]}, not {node.value!r}")
        return value

    def cell(self, node: yaml.Node) -> Cell:
        entries = self.mapping(node, "a cell", _CELL_KEYS)
        if "name" not in entries:
            raise self.fail(node, "a cell needs a name")
        name = self.scalar(entries["name"], "the cell name", str)
        values: dict[str, Any] = {}
        sources: dict[str, Source] = {"name": self.source(entries["name"])}
        for controller, keys in _CONTROLLERS.items():
            if controller not in entries:
                continue
            limits = self.mapping(entries[controller], f"{controller} of cell {name}", tuple(keys))
            for key, value_node in limits.items():
                values[f"{controller}_{key}"] = self.scalar(
                    value_node, f"{controller}.{key} of cell {name}", keys[key])
                sources[f"{controller}.{key}"] = self.source(value_node)
            sources.setdefault(controller, self.source(entries[controller]))
        if "isolation" in entries:
            isolation = self.mapping(entries["isolation"], f"isolation of cell {name}",
                                     ("process", "network"))
            for key, value_node in isolation.items():
                values[f"isolate_{key}"] = self.scalar(
                    value_node, f"isolation.{key} of cell {name}", bool)
                sources[f"isolation.{key}"] = self.source(value_node)
        labels: dict[str, str] = {}
        if "labels" in entries:
            label_node = entries["labels"]
            if not isinstance(label_node, yaml.MappingNode):
                raise self.fail(label_node, f"labels of cell {name} must be a mapping")
            for key_node, value_node in label_node.value:
                key = self.scalar(key_node, f"a label key of cell {name}", str)
                labels[key] = self.scalar(value_node, f"label {key} of cell {name}", str)
                sources[f"labels.{key}"] = self.source(key_node)
            sources["labels"] = self.source(label_node)
        executables = [self.executable(item, name)
                       for item in self.sequence(entries.get("executables"), "executables")]
        cells = [self.cell(item) for item in self.sequence(entries.get("cells"), "cells")]
        try:
            return Cell(name=name, labels=labels, executables=executables, cells=cells,
                        source=self.source(node), field_sources=sources, **values)
        except TypeError as error:  # pragma: no cover - keys are checked above
            raise self.fail(node, str(error)) from None

    def executable(self, node: yaml.Node, cell: str | None) -> Executable:
        """An executable of `cell`, or at host level (cell None)."""
        where = "at host level" if cell is None else f"of cell {cell}"
        entries = self.mapping(node, f"an executable {where}", _EXECUTABLE_KEYS)
        for required in ("name", "command"):
            if required not in entries:
                raise self.fail(node, f"an executable {where} needs a {required}")
        name = self.scalar(entries["name"], f"an executable name {where}", str)
        cell = "" if cell is None else cell
        values: dict[str, Any] = {
            "command": self.scalar(entries["command"], f"command of {cell}:{name}", str)}
        for key in ("uid", "gid"):
            if key in entries:
                value = self.scalar(entries[key], f"{key} of {cell}:{name}", int)
                if not 0 <= value < 2**32:
                    raise self.fail(entries[key], f"{key} of {cell}:{name} must be 0 to 4294967295")
                values[key] = value
        if "description" in entries:
            values["description"] = self.scalar(
                entries["description"], f"description of {cell}:{name}", str)
        sources: dict[str, Source] = {}
        if "restart" in entries:
            values.update(self.restart(entries["restart"], f"{cell}:{name}", sources))
        return Executable(name=name, source=self.source(node), field_sources=sources, **values)

    def restart(self, node: yaml.Node, owner: str, sources: dict[str, Source]) -> dict[str, Any]:
        """`restart: on-failure`, or a mapping of policy, delay_ms, max_delay_ms and
        start_limit: {burst, interval_ms}."""
        from aurae_sdk.declared import RESTART_POLICIES

        def policy(value_node: yaml.Node) -> str:
            value = self.scalar(value_node, f"restart policy of {owner}", str)
            if value not in RESTART_POLICIES:
                raise self.fail(value_node, f"restart policy of {owner} must be one of "
                                            f"{', '.join(RESTART_POLICIES)}, not {value!r}")
            sources["restart.policy"] = self.source(value_node)
            return str(value)

        if isinstance(node, yaml.ScalarNode):
            return {"restart": policy(node)}
        entries = self.mapping(node, f"restart of {owner}", _RESTART_KEYS)
        values: dict[str, Any] = {"restart": policy(entries["policy"]) if "policy" in entries
                                  else "on-failure"}
        numbers = {"delay_ms": "restart_delay_ms", "max_delay_ms": "restart_max_delay_ms"}
        for key, attribute in numbers.items():
            if key in entries:
                values[attribute] = self.count(entries[key], f"restart.{key} of {owner}")
                sources[f"restart.{key}"] = self.source(entries[key])
        if "start_limit" in entries:
            limit = self.mapping(entries["start_limit"], f"restart.start_limit of {owner}",
                                 ("burst", "interval_ms"))
            for key, value_node in limit.items():
                values[f"start_limit_{key}"] = self.count(
                    value_node, f"restart.start_limit.{key} of {owner}")
                sources[f"restart.start_limit.{key}"] = self.source(value_node)
        return values

    def instance(self, node: yaml.Node) -> Instance:
        entries = self.mapping(node, "an instance", _INSTANCE_KEYS)
        if "name" not in entries:
            raise self.fail(node, "an instance needs a name")
        name = self.scalar(entries["name"], "the instance name", str)
        values: dict[str, Any] = {}
        sources: dict[str, Source] = {"name": self.source(entries["name"])}
        if "limits" in entries:
            limits = self.mapping(entries["limits"], f"limits of instance {name}",
                                  tuple(_INSTANCE_LIMITS))
            for key, value_node in limits.items():
                values[key] = self.scalar(value_node, f"limits.{key} of instance {name}",
                                          _INSTANCE_LIMITS[key])
                sources[f"limits.{key}"] = self.source(value_node)
        cells = [self.cell(item) for item in self.sequence(entries.get("cells"), "cells")]
        host = [self.executable(item, None)
                for item in self.sequence(entries.get("executables"), "executables")]
        return Instance(name=name, cells=cells, executables=host, source=self.source(node),
                        field_sources=sources, **values)

    def vm(self, node: yaml.Node) -> VirtualMachine:
        entries = self.mapping(node, "a virtual machine", _VM_KEYS)
        if "id" not in entries:
            raise self.fail(node, "a virtual machine needs an id")
        vm_id = self.scalar(entries["id"], "the virtual machine id", str)
        values: dict[str, Any] = {}
        sources: dict[str, Source] = {"id": self.source(entries["id"])}
        for key, kind in (("memory_mb", int), ("vcpus", int), ("kernel", str),
                          ("running", bool)):
            if key in entries:
                values[key] = self.scalar(entries[key], f"{key} of vm {vm_id}", kind)
                sources[key] = self.source(entries[key])
        if "kernel_args" in entries:
            values["kernel_args"] = tuple(
                self.scalar(item, f"a kernel argument of vm {vm_id}", str)
                for item in self.sequence(entries["kernel_args"], "kernel_args"))
            sources["kernel_args"] = self.source(entries["kernel_args"])
        if "root_drive" in entries:
            root = entries["root_drive"]
            sources["root_drive"] = self.source(root)
            if isinstance(root, yaml.ScalarNode):
                values["root_drive"] = self.scalar(root, f"root_drive of vm {vm_id}", str)
            else:
                drive = self.mapping(root, f"root_drive of vm {vm_id}", ("image", "read_only"))
                if "image" in drive:
                    values["root_drive"] = self.scalar(drive["image"],
                                                       f"root_drive.image of vm {vm_id}", str)
                if "read_only" in drive:
                    values["root_read_only"] = self.scalar(
                        drive["read_only"], f"root_drive.read_only of vm {vm_id}", bool)
        drives = []
        for item in self.sequence(entries.get("drives"), "drives"):
            drive = self.mapping(item, f"a drive of vm {vm_id}", _DRIVE_KEYS)
            for required in ("image", "vm_path"):
                if required not in drive:
                    raise self.fail(item, f"a drive of vm {vm_id} needs {required}")
            drives.append(Drive(
                image=self.scalar(drive["image"], f"a drive image of vm {vm_id}", str),
                vm_path=self.scalar(drive["vm_path"], f"a drive vm_path of vm {vm_id}", str),
                fs_type=self.scalar(drive["fs_type"], f"a drive fs_type of vm {vm_id}", str)
                if "fs_type" in drive else "ext4",
                read_only=self.scalar(drive["read_only"], f"a drive's read_only of vm {vm_id}",
                                      bool) if "read_only" in drive else False))
        if "drives" in entries:
            sources["drives"] = self.source(entries["drives"])
        return VirtualMachine(id=vm_id, drives=drives, source=self.source(node),
                              field_sources=sources, **values)

    def count(self, node: yaml.Node, what: str) -> int:
        value: int = self.scalar(node, what, int)
        if not 0 <= value < 2**32:
            raise self.fail(node, f"{what} must be 0 to 4294967295")
        return value


_KIND_NAMES: dict[type, str] = {str: "string", int: "whole number", bool: "true or false"}

