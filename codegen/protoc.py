"""Stage 1 of the generator: run protoc once through grpcio-tools.

One protoc run yields everything the later stages need: a FileDescriptorSet
with source info (comments) for the schema layer, and the `_pb2` / `_pb2_grpc`
modules with their mypy-protobuf stubs. protoc writes those modules as if each
proto directory were a top-level Python package (`from cells import cells_pb2`),
so `relocate` moves them under our own package and rewrites their imports —
which is also what keeps a generated `grpc.health` package from shadowing
grpcio's `grpc`.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import descriptor_pb2

GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


class ProtocError(RuntimeError):
    """protoc rejected the input; the message carries its diagnostics."""


@dataclass(frozen=True)
class ProtocOutput:
    descriptors: descriptor_pb2.FileDescriptorSet
    # Generated Python sources keyed by their path relative to the output
    # root as protoc names them, e.g. "cells/cells_pb2.py".
    modules: Mapping[str, str]


def _plugin(name: str) -> str:
    # mypy-protobuf installs its protoc plugins as console scripts next to the
    # interpreter; prefer those over whatever else is on PATH.
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise ProtocError(f"protoc plugin {name!r} not found; install aurae-py[codegen]")
    return found


def run_protoc(proto_root: Path, files: Sequence[str]) -> ProtocOutput:
    """Compile `files` (paths relative to `proto_root`) in one protoc run."""
    from grpc_tools import protoc

    well_known = Path(protoc.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory(prefix="aurae-codegen-") as tmp:
        out = Path(tmp) / "out"
        out.mkdir()
        descriptor_set = Path(tmp) / "descriptors.binpb"
        argv = [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"--proto_path={proto_root}",
            f"--proto_path={well_known}",
            f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
            f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            f"--mypy_out=quiet:{out}",
            f"--mypy_grpc_out=quiet:{out}",
            f"--descriptor_set_out={descriptor_set}",
            "--include_source_info",
            "--include_imports",
            *files,
        ]
        # In a process of its own: protoc forks its plugins, and a fork inside
        # a process where grpcio has started threads can hang in grpcio's fork
        # handlers (seen when the test suite had a client open).
        result = subprocess.run(argv, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise ProtocError(
                result.stderr.strip() or f"protoc exited with status {result.returncode}"
            )
        fds = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set.read_bytes())
        modules = {
            str(path.relative_to(out)): path.read_text()
            for path in sorted(out.rglob("*"))
            if path.is_file() and path.name.endswith(GENERATED_SUFFIXES)
        }
    return ProtocOutput(descriptors=fds, modules=modules)


def python_module_of(proto_file: str) -> str:
    """The module protoc generates for a .proto file: "cells/cells.proto" -> "cells.cells_pb2"."""
    return proto_file[: -len(".proto")].replace("/", ".").replace("-", "_") + "_pb2"


def relocate(source: str, module_map: Mapping[str, str]) -> str:
    """Rewrite a protoc-generated module's imports using `module_map`.

    `module_map` maps protoc's module names ("cells.cells_pb2") to where they
    really live ("aurae_sdk.wire.generated.pb.cells.cells_pb2"). Only imports of
    modules in the map change, so `import grpc` (grpcio) and the protobuf
    runtime imports stay as they are.
    """

    def from_import(match: re.Match[str]) -> str:
        package, name, rest = match.group(1), match.group(2), match.group(3)
        target = module_map.get(f"{package}.{name}")
        if target is None:
            return match.group(0)
        new_package, _, new_name = target.rpartition(".")
        if new_name != name:  # an external module with another file name
            return f"from {new_package} import {new_name}{rest or ' as ' + name}"
        return f"from {new_package} import {name}{rest}"

    source = re.sub(
        r"^from ([\w.]+) import (\w+_pb2)((?: as \w+)?)$",
        from_import,
        source,
        flags=re.MULTILINE,
    )

    def plain_import(match: re.Match[str]) -> str:
        target = module_map.get(match.group(1))
        return match.group(0) if target is None else f"import {target}{match.group(2)}"

    source = re.sub(r"^import ([\w.]+_pb2)((?: as \w+)?)$", plain_import, source, flags=re.MULTILINE)

    # The module name protobuf stamps into each message class (__module__),
    # which pickling and repr rely on.
    def builder_name(match: re.Match[str]) -> str:
        target = module_map.get(match.group(2))
        return match.group(0) if target is None else f"{match.group(1)}'{target}'"

    return re.sub(
        r"(BuildTopDescriptorsAndMessages\(DESCRIPTOR, )'([\w.]+)'",
        builder_name,
        source,
    )
