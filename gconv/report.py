"""Sweep reports: a markdown table and PNG plots from the `summary.json` of each run under a workdir, and for each
run what its groups learned (`analyze_run`, from its last checkpoint)."""
from __future__ import annotations

import io
import math
import re
from typing import Any

import numpy as np
from etils import epath

from gconv import rundir

__all__ = ["load_summaries", "report_table", "analyze_run", "write_report"]

COLUMNS = [  # (header, summary key, format)
    ("point", "name", "{}"), ("model", "model", "{}"), ("cardinality", "cardinality", "{}"),
    ("groups", "groups", "{}"), ("width", "width", "{}"), ("shuffle", "shuffle", "{}"),
    ("params", "params", "{:,}"), ("MFLOPs", "mflops", "{:,.1f}"),
    ("final top-1 err (%)", "final_top1_error", "{:.2f}"), ("best top-1 err (%)", "best_top1_error", "{:.2f}"),
    ("paper top-1 err (%)", "paper_top1_error", "{:.1f}"),
    ("block-diag. score", "block_diagonality", "{:.3f}"), ("chance", "chance", "{:.3f}"),
    ("img/s", "img_per_sec", "{:,.0f}"),
    ("wall time (s)", "wall_time", "{:,.1f}"),
]


def load_summaries(workdir: Any) -> list[dict[str, Any]]:
    """The `summary.json` of each run directory directly under `workdir`, in directory order."""
    workdir = rundir.as_path(workdir)
    if not workdir.is_dir():
        raise FileNotFoundError(f"workdir {str(workdir)!r} does not exist: pass the --workdir of a finished sweep.")
    summaries = []
    natural = lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.parent.name)]  # noqa: E731
    for path in sorted(workdir.glob("*/summary.json"), key=natural):
        s = rundir.read_json(path)
        s["width"] = s.get("base_width") if s.get("base_width") is not None else s.get("width_multiplier")
        analysis_path = path.parent / "analysis" / "analysis.json"
        if analysis_path.exists():
            s.update(rundir.read_json(analysis_path)["summary"])
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


def _save(fig, path: epath.Path) -> None:
    """A figure as a PNG at `path` (any storage), then closed."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    _pyplot().close(fig)
    path.write_bytes(buffer.getvalue())


def _plot(summaries: list[dict], x_key: str, x_label: str, path: epath.Path, log_x: bool) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4), dpi=120)
    series: dict[str, list] = {}
    for s in summaries:  # one line per model family / shuffle setting
        label = f"{s['model'].split('_')[0]}" + ("" if s.get("shuffle") in (None, True) else " (no shuffle)")
        if s.get(x_key) is not None and s.get("final_top1_error") is not None:
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
    _save(fig, path)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def analyze_run(run_dir: Any, num_images: int = 128) -> dict[str, Any]:
    """For one finished run: filter-correlation heatmaps and block-diagonality scores of its grouped layer pairs,
    first-layer and per-group kernel views, and its compute breakdown, as PNGs and `analysis.json` in
    `RUN_DIR/analysis/`. Returns the JSON's content."""
    from gconv import autotune

    with autotune.static():  # one pass over a few images: timing lowerings would cost more than it saves
        return _analyze_run(rundir.as_path(run_dir), num_images)


def _analyze_run(run_dir: epath.Path, num_images: int) -> dict[str, Any]:
    import jax
    import ml_collections

    from gconv import analysis, data
    from gconv.train import build_model

    config_path, ckpt_dir = run_dir / "config.json", run_dir / "checkpoints"
    steps = rundir.readable_checkpoint_steps(ckpt_dir)
    if not config_path.exists() or not steps:
        raise FileNotFoundError(f"{run_dir} has no config.json and checkpoint: pass the directory of a run "
                                f"(WORKDIR/POINT) that has trained.")
    config = ml_collections.ConfigDict(rundir.read_json(config_path))
    source, info = data.get_source(config.data, "eval")
    batch = next(data.eval_batches(source, info, min(num_images, len(source))))["image"]
    model = build_model(config, info.num_classes)
    _, restored = rundir.restore_newest_readable(
        ckpt_dir, lambda step: rundir.restore_on_host(ckpt_dir / str(step) / "default"), steps)
    variables = {"params": restored["params"], "batch_stats": restored["batch_stats"]}
    out_dir = run_dir / "analysis"
    out_dir.mkdir(parents=True, exist_ok=True)
    plt = _pyplot()

    pairs = []
    layer_pairs = analysis.default_layer_pairs(model)
    for (layer_a, layer_b), (corr, score, groups) in zip(
            layer_pairs, analysis.filter_correlations(model, variables, batch, layer_pairs)):
        name = f"corr_{layer_b.split('/')[0]}.png"
        fig, ax = plt.subplots(figsize=(4, 4), dpi=110)
        ax.imshow(corr, cmap="viridis", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
        ax.set_title(f"{layer_b.split('/')[0]}: |corr|, {groups} groups, score {score:.2f}", fontsize=8)
        ax.set_xlabel(layer_b.split("/")[-1], fontsize=8)
        ax.set_ylabel(layer_a.split("/")[-1], fontsize=8)
        fig.tight_layout()
        _save(fig, out_dir / name)
        pairs.append({"layer_a": layer_a, "layer_b": layer_b, "groups": groups, "score": score, "png": name})

    params = jax.tree.map(np.asarray, variables["params"])
    fig, ax = plt.subplots(figsize=(5, 3), dpi=110)
    ax.imshow(analysis.first_layer_view(params["stem_conv"]["kernel"]), cmap="gray", interpolation="nearest")
    ax.set_title("first-layer filters", fontsize=8)
    ax.axis("off")
    _save(fig, out_dir / "first_layer.png")
    if pairs:
        *parents, leaf = pairs[0]["layer_b"].split("/")
        kernel = params
        for key in parents + [leaf, "kernel"]:
            kernel = kernel[key]
        views = analysis.kernel_views(kernel, pairs[0]["groups"])[:16]
        fig, axes = plt.subplots(1, len(views), figsize=(1.2 * len(views) + 1, 3), dpi=110, squeeze=False)
        for g, (ax, view) in enumerate(zip(axes[0], views)):
            ax.imshow(view, cmap="gray", vmin=0, vmax=1, interpolation="nearest", aspect="auto")
            ax.set_title(f"group {g}", fontsize=7)
            ax.axis("off")
        fig.suptitle(f"{pairs[0]['layer_b']} kernels by group", fontsize=8)
        _save(fig, out_dir / "kernels_by_group.png")

    stages = analysis.compute_breakdown(model, info.image_shape)
    scores = [p["score"] for p in pairs]
    result = {"pairs": pairs, "breakdown": stages, "summary": {
        "block_diagonality": float(np.mean(scores)) if scores else None,
        "chance": float(np.mean([1 / p["groups"] for p in pairs])) if pairs else None}}
    rundir.write_json(out_dir / "analysis.json", result)
    return result


def _plot_breakdown(workdir: epath.Path, names: list[str]) -> None:
    """Stacked bars of MACs per layer kind, one bar per sweep point."""
    plt = _pyplot()
    per_point = {}
    for name in names:
        path = workdir / name / "analysis" / "analysis.json"
        if path.exists():
            kinds: dict[str, float] = {}
            for stage in rundir.read_json(path)["breakdown"].values():
                for kind, cost in stage.items():
                    kinds[kind] = kinds.get(kind, 0.0) + cost["macs"] / 1e6
            per_point[name] = kinds
    if not per_point:
        return
    all_kinds = sorted({k for kinds in per_point.values() for k in kinds})
    fig, ax = plt.subplots(figsize=(1.0 * len(per_point) + 3, 4), dpi=120)
    bottom = np.zeros(len(per_point))
    for kind in all_kinds:
        values = np.array([per_point[n].get(kind, 0.0) for n in per_point])
        ax.bar(list(per_point), values, bottom=bottom, label=kind)
        bottom += values
    ax.set_ylabel("MFLOPs (multiply-adds)")
    ax.set_title("compute by layer kind", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, workdir / "compute_breakdown.png")


def write_report(workdir: Any, analyze: bool = True) -> epath.Path:
    """Writes `report.md`, `error_vs_cardinality.png` (or `error_vs_groups.png`) and `error_vs_mflops.png`; with
    `analyze`, first runs `analyze_run` on each run and adds its scores, pictures and `compute_breakdown.png`."""
    workdir = rundir.as_path(workdir)
    if analyze:
        for summary in load_summaries(workdir):
            analyze_run(workdir / summary["name"])
    summaries = load_summaries(workdir)
    if not summaries:
        raise FileNotFoundError(f"no finished runs (*/summary.json) under {workdir}: run the sweep first.")
    x_key = "cardinality" if any(s.get("cardinality") is not None for s in summaries) else "groups"
    plots = [(x_key, x_key, f"error_vs_{x_key}.png", True), ("mflops", "MFLOPs (multiply-adds)", "error_vs_mflops.png", False)]
    for key, label, name, log_x in plots:
        _plot(summaries, key, label, workdir / name, log_x)
    text = [f"# Report: {workdir.name}", "", report_table(summaries), ""]
    text += [f"![{name}]({name})" for _, _, name, _ in plots]
    if analyze:
        _plot_breakdown(workdir, [s["name"] for s in summaries])
        text += ["", "![compute_breakdown.png](compute_breakdown.png)", "", "## What the groups learn",
                 "Block-diagonality: the share of |correlation| between a layer's filter responses and the next "
                 "(grouped) layer's that falls inside the group blocks; `chance` is 1/groups. See docs/analysis.md."]
        for s in summaries:
            pngs = sorted((workdir / s["name"] / "analysis").glob("*.png"))
            text += ["", f"### {s['name']}"] + [f"![{p.name}]({s['name']}/analysis/{p.name})" for p in pngs]
    path = workdir / "report.md"
    rundir.write_text(path, "\n".join(text) + "\n")
    return path
