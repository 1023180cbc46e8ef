"""Benchmarks: every figure is a ratio against a peer or a physical floor
measured in the same run, reported with its median and spread.

    python -m bench            full run, writes bench/results/latest.json and docs/benchmarks.md
    python -m bench --quick    the same, fewer repetitions (under two minutes)
    python -m bench --smoke    every code path once at the smallest sizes (tests/test_bench_smoke.py)
    python -m bench --only start,logs

Benchmarks never decide whether a test passes.
"""
