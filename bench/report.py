"""The benchmark report: docs/benchmarks.md with a table per benchmark and
PNG charts, all drawn from the results JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _fmt(value: float) -> str:
    if value >= 1000:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def _series(s: dict[str, Any]) -> str:
    return f"{_fmt(s['median'])} {s['unit']} ({_fmt(s['p10'])}–{_fmt(s['p90'])}, n={s['n']})"


def _chart(results: list[dict[str, Any]], path: Path) -> bool:
    comparisons = [r for r in results if r["kind"] == "comparison"]
    if not comparisons:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    # Cost ratios: how many times the peer's time (or the inverse of a rate ratio).
    labels = [r["title"] for r in comparisons]
    costs = [1 / r["ratio"] if r["higher_is_better"] else r["ratio"] for r in comparisons]
    figure, axes = plt.subplots(figsize=(10, 0.45 * len(labels) + 1.2))
    bars = axes.barh(range(len(labels)), costs, color=["#3b7dd8" if c <= 2 else "#d8863b" for c in costs])
    axes.axvline(1.0, color="black", linewidth=0.8)
    axes.set_yticks(range(len(labels)), [label[:70] for label in labels], fontsize=8)
    axes.invert_yaxis()
    axes.set_xscale("log")
    axes.set_xlabel("cost relative to the peer or floor (1 = equal; lower is better)")
    for bar, cost in zip(bars, costs, strict=True):
        axes.text(bar.get_width() * 1.03, bar.get_y() + bar.get_height() / 2, f"{cost:.2f}x",
                  va="center", fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def write_report(document: dict[str, Any], path: Path) -> None:
    results = document["results"]
    chart = path.parent / "benchmarks" / "ratios.png"
    lines = [
        "<!-- Written by `python -m bench` from bench/results/latest.json; do not edit. -->",
        "# Benchmarks",
        "",
        "Every figure is measured against a peer or a physical floor in the same run; ratios",
        "are what count (absolute numbers move with the machine's load). Medians, with the",
        "10th–90th percentile and the number of samples. Regenerate with `make bench`",
        "(or `make bench-quick`).",
        "",
        (
            f"Machine: {document['machine']['cpu']}, {document['machine']['cpus']} CPUs, "
            f"{document['machine']['memory_gib']} GiB, Linux {document['machine']['kernel']}, "
            f"Python {document['machine']['python']}; run {document['machine']['time']}"
            f"{_mode(document)}, {document['seconds']} s."
        ),
        "",
    ]
    if _chart(results, chart):
        lines += [f"![cost ratios]({chart.relative_to(path.parent).as_posix()})", ""]
    lines += ["| Benchmark | Subject | Peer / floor | Ratio | Goal |", "|---|---|---|---|---|"]
    for r in results:
        if r["kind"] != "comparison":
            continue
        ratio = f"{r['ratio']:.2f}" + (" (rate)" if r["higher_is_better"] else "")
        lines.append(
            f"| {r['title']} | {r['subject']['label']}: {_series(r['subject'])} | "
            f"{r['peer']['label']}: {_series(r['peer'])} | {ratio} | {r['goal']} |"
        )
    figures = [r for r in results if r["kind"] == "figure"]
    if figures:
        lines += ["", "| Figure | Value | Notes |", "|---|---|---|"]
        lines += [f"| {f['title']} | {_fmt(f['value'])} {f['unit']} | {f['notes']} |" for f in figures]
    notes = [r for r in results if r["kind"] == "comparison" and r["notes"]]
    if notes:
        lines += ["", "Notes:", ""]
        lines += [f"- {r['title']}: {r['notes']}" for r in notes]
    if document["failures"]:
        lines += ["", "Failed benchmarks (see the run's output):", ""]
        lines += [f"- {name}" for name in document["failures"]]
    path.write_text("\n".join(lines) + "\n")


def _mode(document: dict[str, Any]) -> str:
    """The run's mode as the report names it: nothing for a full run (a document written
    before smoke mode has only "quick")."""
    mode = str(document.get("mode", "quick" if document["quick"] else "full"))
    return "" if mode == "full" else f" ({mode} mode)"
