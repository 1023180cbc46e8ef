"""The import graph's rule: the daemon imports only the wire layer of the
client side, never the client nor the CLI; the client never imports the daemon.

Checked twice: statically over every import statement (those inside
functions too), and at run time in a fresh interpreter that imports every
module of a side and lists what got loaded.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Of the SDK package, the daemon may load the package itself, its package
# table (aurae_sdk.generated, pure data) and the wire layer.
DAEMON_MAY_LOAD = ("aurae_sdk", "aurae_sdk.generated")


def _daemon_may_import(module: str) -> bool:
    top = module.split(".")[0]
    if top == "aurae_cli":
        return False
    if top == "aurae_sdk":
        return module in DAEMON_MAY_LOAD or module.startswith("aurae_sdk.wire")
    return True


def _imports(path: Path) -> list[str]:
    """Every absolute module an import statement in `path` names."""
    modules = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            modules.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from aurae_sdk import wire` names aurae_sdk.wire, not all of aurae_sdk.
            modules.extend(f"{node.module}.{alias.name}" for alias in node.names)
    return modules


def _loaded(code: str) -> list[str]:
    """The aurae* modules a fresh interpreter holds after running `code`."""
    script = (
        "import importlib, json, pkgutil, sys\n"
        + code
        + "\nprint(json.dumps(sorted(m for m in sys.modules if m.startswith('aurae'))))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    loaded: list[str] = json.loads(result.stdout.splitlines()[-1])
    return loaded


def _every_module(package: str) -> str:
    """Code that imports `package` and every module under it."""
    return (
        f"import {package}\n"
        f"for info in pkgutil.walk_packages({package}.__path__, '{package}.'):\n"
        "    importlib.import_module(info.name)\n"
    )


@pytest.mark.parametrize("path", sorted((ROOT / "auraed").rglob("*.py")), ids=str)
def test_no_daemon_module_imports_the_client_or_the_cli(path: Path) -> None:
    wrong = [module for module in _imports(path) if not _daemon_may_import(module)]
    assert wrong == [], f"{path.relative_to(ROOT)} imports {wrong}"


@pytest.mark.parametrize(
    "path",
    sorted([*(ROOT / "aurae_sdk").rglob("*.py"), *(ROOT / "aurae_cli").rglob("*.py")]),
    ids=str,
)
def test_no_client_module_imports_the_daemon(path: Path) -> None:
    wrong = [module for module in _imports(path) if module.split(".")[0] == "auraed"]
    assert wrong == [], f"{path.relative_to(ROOT)} imports {wrong}"


@pytest.mark.parametrize("path", sorted((ROOT / "aurae_sdk" / "wire").rglob("*.py")), ids=str)
def test_the_wire_layer_imports_only_itself(path: Path) -> None:
    wrong = [
        module for module in _imports(path)
        if module.split(".")[0] in ("aurae_sdk", "aurae_cli", "auraed")
        and not module.startswith("aurae_sdk.wire")
    ]
    assert wrong == [], f"{path.relative_to(ROOT)} imports {wrong}"


def test_starting_the_daemon_loads_no_client_module() -> None:
    # Every daemon module, so also every servicer the registry could find, and
    # the default servicer of every registered service.
    loaded = _loaded(
        _every_module("auraed")
        + "from auraed.generated.registry import SERVICES\n"
        + "from auraed.server import StartupError, _default_servicer\n"
        + "for entry in SERVICES:\n"
        + "    try:\n"
        + "        _default_servicer(entry)\n"
        + "    except StartupError:\n"
        + "        pass  # needs the daemon's parts: Daemon._servicers makes it\n"
    )
    assert "auraed.server" in loaded and "auraed.services.cells" in loaded
    assert "aurae_sdk.wire.generated.pb.cells.cells_pb2" in loaded
    wrong = [module for module in loaded if not _daemon_may_import(module)]
    assert wrong == []


def test_the_client_and_the_cli_load_no_daemon_module() -> None:
    loaded = _loaded(
        _every_module("aurae_sdk")
        + _every_module("aurae_cli")
        + "import aurae_sdk\n"
        + "aurae_sdk.cells, aurae_sdk.Client\n"
    )
    assert "aurae_sdk.client" in loaded and "aurae_cli.app" in loaded
    assert [module for module in loaded if module.split(".")[0] == "auraed"] == []


def test_the_wire_layer_loads_nothing_of_the_client() -> None:
    loaded = _loaded(_every_module("aurae_sdk.wire"))
    assert "aurae_sdk.wire.pki" in loaded and "aurae_sdk.wire.targets" in loaded
    assert [m for m in loaded if not m.startswith("aurae_sdk.wire")] == list(DAEMON_MAY_LOAD)
