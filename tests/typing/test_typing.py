"""mypy over the generated SDK and typed usage: clean where it should be,
and catching wrongly typed calls."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).parent


def mypy(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-error-summary",
         "--cache-dir", str(ROOT / ".mypy_cache"), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)


@pytest.mark.slow
def test_generated_sdk_and_typed_usage_are_clean() -> None:
    result = mypy("aurae_sdk", str(HERE / "usage_ok.py"))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_examples_type_check() -> None:
    """Examples import their names from aurae_sdk.script, so mypy sees them;
    top-level await is what aurae-py scripts may use."""
    result = mypy("--disable-error-code", "top-level-await", str(ROOT / "examples"))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_wrongly_typed_calls_are_caught() -> None:
    bad = HERE / "usage_bad.py"
    result = mypy(str(bad))
    assert result.returncode == 1
    expected = {
        number: match.group(1)
        for number, line in enumerate(bad.read_text().splitlines(), start=1)
        if (match := re.search(r"# E: ([\w-]+)", line))
    }
    reported: dict[int, set[str]] = {}
    for line in result.stdout.splitlines():
        match = re.match(rf".*{bad.name}:(\d+): error: .*\[([\w-]+)\]$", line)
        if match:
            reported.setdefault(int(match.group(1)), set()).add(match.group(2))
    for number, code in expected.items():
        assert code in reported.get(number, set()), (number, code, result.stdout)
