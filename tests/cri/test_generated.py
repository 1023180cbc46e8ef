"""The committed CRI modules are what the vendored api.proto compiles to."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_cri_modules_are_current() -> None:
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "generate_cri.py"),
                             "--check"], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


def test_vendored_proto_keeps_its_licence() -> None:
    vendored = ROOT / "third_party" / "cri-api"
    assert "Apache License" in (vendored / "LICENSE").read_text()
    assert "package runtime.v1;" in (vendored / "runtime" / "v1" / "api.proto").read_text()
