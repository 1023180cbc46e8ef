"""Code generation: a full regeneration (protoc, schema, render, format)
against its floor, the protoc run alone."""

from __future__ import annotations

import time
from pathlib import Path

from bench.core import Comparison, Mode, Result, Series, interleave
from codegen.generate import find_protos, generate
from codegen.protoc import run_protoc

ROOT = Path(__file__).resolve().parent.parent


def run(mode: Mode) -> list[Result]:
    runs = mode.pick(full=8, quick=3, smoke=1)
    full = Series("aurae-codegen: protoc + schema + render + ruff format", "s")
    protoc = Series("protoc alone (grpcio-tools, same inputs and plugins)", "s")
    protos = find_protos(ROOT / "proto")

    def generate_once() -> float:
        begin = time.perf_counter()
        generate(ROOT / "proto", ROOT / "templates")
        return time.perf_counter() - begin

    def protoc_once() -> float:
        begin = time.perf_counter()
        run_protoc(ROOT / "proto", protos)
        return time.perf_counter() - begin

    interleave(runs, (full, generate_once), (protoc, protoc_once), warmup=mode.warmup(1))
    return [Comparison("codegen_vs_protoc", "Full regeneration vs protoc alone", full, protoc)]
