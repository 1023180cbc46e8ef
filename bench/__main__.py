"""Run the benchmarks and write the report: `python -m bench [--quick | --smoke] [--only a,b]`."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from bench.core import Mode, machine
from bench.report import write_report

ROOT = Path(__file__).resolve().parent.parent
# In report order; each module has run(mode: Mode) -> list[Result].
BENCHMARKS = ["rpc", "start", "spawn", "logs", "streams", "events", "cells", "containers",
              "instances", "scale", "restore", "cli", "fleet", "codegen", "vms"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    sizes = parser.add_mutually_exclusive_group()
    sizes.add_argument("--quick", action="store_true", help="fewer repetitions (under 2 minutes)")
    sizes.add_argument("--smoke", action="store_true",
                       help="every code path once, smallest sizes; figures not meaningful "
                            "(the test suite's run)")
    parser.add_argument("--only", default="", help="comma-separated benchmark names")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "latest.json")
    parser.add_argument("--report", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args(argv)
    mode = Mode("smoke" if args.smoke else "quick" if args.quick else "full")
    chosen = [name for name in BENCHMARKS if not args.only or name in args.only.split(",")]
    available = [n for n in chosen if (ROOT / "bench" / f"{n}.py").exists()]

    results: list[dict[str, object]] = []
    failures: dict[str, str] = {}
    began = time.monotonic()
    for name in available:
        print(f"bench: {name} ...", flush=True)
        started = time.monotonic()
        try:
            module = importlib.import_module(f"bench.{name}")
            for result in module.run(mode):
                entry = {"benchmark": name, **result.as_dict()}
                results.append(entry)
                _print(entry)
        except Exception:  # noqa: BLE001 - one broken benchmark must not hide the others
            failures[name] = traceback.format_exc()
            print(failures[name], file=sys.stderr)
        print(f"bench: {name} took {time.monotonic() - started:.1f} s", flush=True)

    document = {
        "machine": machine(),
        "quick": mode.quick,
        "mode": mode.name,
        "seconds": round(time.monotonic() - began, 1),
        "results": results,
        "failures": failures,
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(document, indent=2) + "\n")
    write_report(document, args.report)
    print(f"bench: wrote {args.results} and {args.report} in {document['seconds']} s")
    return 1 if failures else 0


def _print(entry: dict[str, Any]) -> None:
    if entry["kind"] == "comparison":
        subject, peer = entry["subject"], entry["peer"]
        print(f"  {entry['title']}: ratio {entry['ratio']:.2f}"
              f"  ({subject['median']:.4g} vs {peer['median']:.4g} {subject['unit']})")
    else:
        print(f"  {entry['title']}: {entry['value']:.4g} {entry['unit']}")


if __name__ == "__main__":
    sys.exit(main())
