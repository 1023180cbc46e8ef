"""The generator end to end: protoc → schema → render → files.

`generate` is pure (inputs in, {path: text} out) so that writing, drift
checking and the tests all share it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from codegen.layout import Layout
from codegen.protoc import python_module_of, relocate, run_protoc
from codegen.render import MARKER, format_python, render_templates
from codegen.schema import Api, build_api


@dataclass(frozen=True)
class Generation:
    api: Api
    files: Mapping[str, str]  # output path (relative to the project root) -> text

    def generated_dirs(self) -> tuple[str, ...]:
        """Directories that hold only generated files (stale files there get removed)."""
        layout = self.api.layout
        return tuple(
            layout.package_dir(p)
            for p in (
                layout.sdk_package, layout.daemon_package, layout.cli_package, layout.wire_package
            )
        )


def find_protos(proto_root: Path) -> list[str]:
    return sorted(p.relative_to(proto_root).as_posix() for p in proto_root.rglob("*.proto"))


def generate(
    proto_root: Path,
    template_root: Path,
    layout: Layout | None = None,
    files: Sequence[str] | None = None,
) -> Generation:
    layout = layout or Layout()
    targets = list(files) if files is not None else find_protos(proto_root)
    output = run_protoc(proto_root, targets)
    api = build_api(output.descriptors, set(targets), layout)

    generated: dict[str, str] = {}
    module_map = {python_module_of(name): f"{layout.pb_package}.{python_module_of(name)}"
                  for name in targets if name not in layout.external_modules}
    module_map.update({python_module_of(name): module
                       for name, module in layout.external_modules.items()})
    pb_dir = layout.package_dir(layout.pb_package)
    for name in targets:
        if name in layout.external_modules:
            continue
        stem = name[: -len(".proto")].replace("-", "_")
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi"):
            text = relocate(output.modules[stem + suffix], module_map)
            generated[f"{pb_dir}/{stem}{suffix}"] = f"# {MARKER}\n{text}"

    # Every directory of generated Python is a regular package, up to and
    # including the wire package itself.
    wire_parent = Path(layout.package_dir(layout.wire_package)).parent.as_posix()
    for path in list(generated):
        parent = Path(path).parent
        while parent.as_posix() not in (wire_parent, "."):
            generated.setdefault(f"{parent.as_posix()}/__init__.py", f"# {MARKER}\n")
            parent = parent.parent

    generated.update(format_python(render_templates(template_root, api)))
    return Generation(api=api, files=dict(sorted(generated.items())))


def differences(generation: Generation, root: Path) -> list[str]:
    """Paths whose committed content differs from a fresh generation."""
    problems = []
    for path, text in generation.files.items():
        target = root / path
        if not target.exists():
            problems.append(f"missing: {path}")
        elif target.read_text() != text:
            problems.append(f"differs: {path}")
    for stale in _stale_files(generation, root):
        problems.append(f"stale: {stale}")
    return problems


def write(generation: Generation, root: Path) -> list[str]:
    """Write the generation under `root`; returns the paths that changed."""
    changed = []
    for path, text in generation.files.items():
        target = root / path
        if target.exists() and target.read_text() == text:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        changed.append(path)
    for stale in _stale_files(generation, root):
        (root / stale).unlink()
        changed.append(stale)
    return changed


def _stale_files(generation: Generation, root: Path) -> list[str]:
    stale = []
    for directory in generation.generated_dirs():
        base = root / directory
        if not base.is_dir():
            continue
        for path in sorted(base.rglob("*")):
            relative = path.relative_to(root).as_posix()
            if path.is_file() and "__pycache__" not in path.parts and relative not in generation.files:
                stale.append(relative)
    return stale
