"""Sweep reports: a markdown table and PNG plots from the `summary.json` of each run under a workdir."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

__all__ = ["load_summaries", "report_table", "write_report"]

COLUMNS = [  # (header, summary key, format)
    ("point", "name", "{}"), ("model", "model", "{}"), ("cardinality", "cardinality", "{}"),
    ("groups", "groups", "{}"), ("width", "width", "{}"), ("shuffle", "shuffle", "{}"),
    ("params", "params", "{:,}"), ("MFLOPs", "mflops", "{:,.1f}"),
    ("final top-1 err (%)", "final_top1_error", "{:.2f}"), ("best top-1 err (%)", "best_top1_error", "{:.2f}"),
    ("paper top-1 err (%)", "paper_top1_error", "{:.1f}"), ("img/s", "img_per_sec", "{:,.0f}"),
    ("wall time (s)", "wall_time", "{:,.1f}"),
]


def load_summaries(workdir: str | Path) -> list[dict[str, Any]]:
    """The `summary.json` of each run directory directly under `workdir`, in directory order."""
    workdir = Path(workdir)
    if not workdir.is_dir():
        raise FileNotFoundError(f"workdir {str(workdir)!r} does not exist: pass the --workdir of a finished sweep.")
    summaries = []
    natural = lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.parent.name)]  # noqa: E731
    for path in sorted(workdir.glob("*/summary.json"), key=natural):
        s = json.loads(path.read_text())
        s["width"] = s.get("base_width") if s.get("base_width") is not None else s.get("width_multiplier")
        summaries.append(s)
    return summaries


def _cell(summary: dict, key: str, fmt: str) -> str:
    value = summary.get(key)
    if value is None or (isinstance(value, float) and (math.isnan(value) or (key == "paper_top1_error" and value < 0))):
        return "-"
    return fmt.format(value)


def report_table(summaries: list[dict[str, Any]]) -> str:
    """Markdown table, one row per run; columns that are empty for every run are left out."""
    columns = [c for c in COLUMNS if any(_cell(s, c[1], c[2]) != "-" for s in summaries)]
    lines = ["| " + " | ".join(c[0] for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(s, key, fmt) for _, key, fmt in columns) + " |" for s in summaries]
    return "\n".join(lines)


def _plot(summaries: list[dict], x_key: str, x_label: str, path: Path, log_x: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4), dpi=120)
    series: dict[str, list] = {}
    for s in summaries:  # one line per model family / shuffle setting
        label = f"{s['model'].split('_')[0]}" + ("" if s.get("shuffle") in (None, True) else " (no shuffle)")
        if s.get(x_key) is not None and not math.isnan(s.get("final_top1_error", math.nan)):
            series.setdefault(label, []).append((s[x_key], s["final_top1_error"], s["name"]))
    for label, points in series.items():
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label=label)
        for x, y, name in points:
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
    if log_x:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(x_label)
    ax.set_ylabel("top-1 error (%)")
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(workdir: str | Path) -> Path:
    """Writes `report.md`, `error_vs_cardinality.png` (or `error_vs_groups.png`) and `error_vs_mflops.png`."""
    workdir = Path(workdir)
    summaries = load_summaries(workdir)
    if not summaries:
        raise FileNotFoundError(f"no finished runs (*/summary.json) under {workdir}: run the sweep first.")
    x_key = "cardinality" if any(s.get("cardinality") is not None for s in summaries) else "groups"
    plots = [(x_key, x_key, f"error_vs_{x_key}.png", True), ("mflops", "MFLOPs (multiply-adds)", "error_vs_mflops.png", False)]
    for key, label, name, log_x in plots:
        _plot(summaries, key, label, workdir / name, log_x)
    text = [f"# Report: {workdir.name}", "", report_table(summaries), ""]
    text += [f"![{name}]({name})" for _, _, name, _ in plots]
    path = workdir / "report.md"
    path.write_text("\n".join(text) + "\n")
    return path
