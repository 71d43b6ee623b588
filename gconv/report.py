"""Sweep reports: markdown tables and PNG plots from the `summary.json` and `metrics.jsonl` of each run under a
workdir (a sweep point's seeds as mean ± std, tested against the first point; see `gconv.stats`), and for each run
what its groups learned (`analyze_run`, from a checkpoint)."""
from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
from etils import epath

from gconv import checkpoints, metrics_log, plots, stats, storage, tensorboard

__all__ = ["load_summaries", "report_table", "point_table", "results", "analyze_run", "design_space_section",
           "by_class_section", "write_report"]

FIRST_COLUMNS = [("point", "name", "{}"), ("model", "model", "{}")]  # (header, summary key, format)
ANALYSIS_COLUMNS = [  # from each run's analysis (gconv.analysis)
    ("block-diag. score", "block_diagonality", "{:.3f}"), ("chance", "chance", "{:.3f}"),
    ("mean abs corr in / out", "inside_outside", "{}"), ("colour score by group", "colour_scores", "{}"),
    ("learned groups: abs corr in / out", "learned_inside_outside", "{}")]
COLUMNS = [  # after the model's own fields (each family's `fields_of`: cardinality, groups, width, ...)
    ("params", "params", "{:,}"), ("MMACs", "mmacs", "{:,.1f}"), ("acts", "acts", "{:,}"),
    ("final top-1 err (%)", "final_top1_error", "{:.2f}"), ("best top-1 err (%)", "best_top1_error", "{:.2f}"),
    ("paper top-1 err (%)", "paper_top1_error", "{:.1f}"),
    ("final top-5 err (%)", "final_top5_error", "{:.2f}"), ("paper top-5 err (%)", "paper_top5_error", "{:.1f}"),
    *ANALYSIS_COLUMNS,
    ("img/s", "img_per_sec", "{:,.0f}"),
    ("wall time (s)", "wall_time", "{:,.1f}"),
]


def load_summaries(workdir: Any) -> list[dict[str, Any]]:
    """The `summary.json` of each run directory directly under `workdir`, in directory order."""
    workdir = storage.as_path(workdir)
    if not workdir.is_dir():
        raise FileNotFoundError(f"workdir {str(workdir)!r} does not exist: pass the --workdir of a finished sweep.")
    summaries = []
    natural = lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.parent.name)]  # noqa: E731
    for path in sorted(workdir.glob("*/summary.json"), key=natural):
        s = storage.read_json(path)
        if "fields" not in s:  # a summary from before summaries named their model's fields
            s["fields"] = {k: s[k] for k in ("cardinality", "base_width", "groups", "width_multiplier", "shuffle")
                           if s.get(k) is not None}
            s["sweep_axis"] = next((k for k in ("cardinality", "groups") if k in s["fields"]), None)
            s["mmacs"] = s.get("mflops")
        s.update({f"field:{k}": v for k, v in s["fields"].items()})
        analysis_path = path.parent / "analysis" / "analysis.json"
        if storage.exists(analysis_path):
            s.update(storage.read_json(analysis_path)["summary"])
            if s.get("inside") is not None:
                s["inside_outside"] = f"{s['inside']:.3f} / {s['outside']:.3f}"
        summaries.append(s)
    return summaries


def _cell(summary: dict, key: str, fmt: str) -> str:
    value = summary.get(key)
    if value is None or (isinstance(value, float) and (math.isnan(value) or (key.startswith("paper_") and value < 0))):
        return "-"
    return fmt.format(value)


def _markdown(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    """A markdown table of `rows`: the point and model, each model field (a family's `fields_of`), then `columns`;
    columns that are empty for every row are left out."""
    fields = list(dict.fromkeys(k for r in rows for k in r.get("fields", {})))
    columns = FIRST_COLUMNS + [(k, f"field:{k}", "{}") for k in fields] + columns
    columns = [c for c in columns if any(_cell(r, c[1], c[2]) != "-" for r in rows)]
    lines = ["| " + " | ".join(c[0] for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r, key, fmt) for _, key, fmt in columns) + " |" for r in rows]
    return "\n".join(lines)


def report_table(summaries: list[dict[str, Any]]) -> str:
    """Markdown table, one row per run; columns that are empty for every run are left out."""
    return _markdown(summaries, COLUMNS)


def analyze_run(run_dir: Any, num_images: int = 128, checkpoint: str = "latest") -> dict[str, Any]:
    """For one finished run: filter-correlation heatmaps and block-diagonality scores of its grouped layer pairs,
    first-layer and per-group kernel views, and its compute breakdown, as PNGs and `analysis.json` in
    `RUN_DIR/analysis/`, from its `checkpoint` (latest, best or a step). Returns the JSON's content."""
    from gconv import autotune

    with autotune.static():  # one pass over a few images: timing lowerings would cost more than it saves
        return _analyze_run(storage.as_path(run_dir), num_images, checkpoint)


def _analyze_run(run_dir: epath.Path, num_images: int, checkpoint: str) -> dict[str, Any]:
    import jax
    import ml_collections

    from gconv import analysis, data
    from gconv.models import family_of, model_from_config

    config_path, ckpt_dir = run_dir / "config.json", run_dir / "checkpoints"
    steps = checkpoints.readable_checkpoint_steps(ckpt_dir)
    if not storage.exists(config_path) or not steps:
        raise FileNotFoundError(f"{run_dir} has no config.json and checkpoint: pass the directory of a run "
                                f"(WORKDIR/POINT) that has trained.")
    config = ml_collections.ConfigDict(storage.read_json(config_path))
    source, info = data.get_source(config.data, "eval")
    batch = data.standardize(info)(next(data.eval_batches(source, info, min(num_images, len(source)))))["image"]
    model = model_from_config(config.model, info.num_classes)
    restore = lambda step: checkpoints.restore_on_host(ckpt_dir / str(step) / "default")  # noqa: E731
    if checkpoint == "latest":  # the newest readable one, setting damaged ones aside
        step, restored = checkpoints.restore_newest_readable(ckpt_dir, restore, steps)
    else:
        step = checkpoints.choose_checkpoint(run_dir, checkpoint)
        restored = restore(step)
    variables = checkpoints.model_variables(restored)
    out_dir = run_dir / "analysis"
    out_dir.mkdir(parents=True, exist_ok=True)
    plt = plots.pyplot()

    family = family_of(model)
    pairs = []
    layer_pairs = analysis.default_layer_pairs(model)
    for (layer_a, layer_b), (corr, _, groups) in zip(
            layer_pairs, analysis.filter_correlations(model, variables, batch, layer_pairs)):
        name = f"corr_{layer_b.split('/')[0]}"
        scores = analysis.score_blocks(corr, groups)
        fig, ax = plt.subplots(figsize=(4, 4), dpi=110)
        plots.correlation_map(ax, corr, scores["blocks"],
                              f"{layer_b}: |corr|, {groups} groups, score {scores['score']:.2f}", layer_a, layer_b)
        fig.tight_layout()
        plots.save(fig, out_dir / f"{name}.png")
        storage.write_npy(out_dir / f"{name}.npy", corr.astype(np.float32))
        pairs.append({"layer_a": layer_a, "layer_b": layer_b, "groups": groups, **scores, "png": f"{name}.png",
                      "npy": f"{name}.npy"})

    params = jax.tree.map(np.asarray, variables["params"])
    first_kernel = family.params_at(params, family.first_conv)["kernel"]
    first_groups = family.first_conv_groups(model)
    panels = analysis.first_layer_by_group(first_kernel, first_groups)
    colour = analysis.group_colour_scores(first_kernel, first_groups) if first_kernel.shape[2] == 3 else None
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3), dpi=110, squeeze=False)
    for g, (ax, panel) in enumerate(zip(axes[0], panels)):
        ax.imshow(panel, cmap="gray", interpolation="nearest")
        label = f"group {g} of {first_groups}" if first_groups > 1 else "first-layer filters"
        ax.set_title(label + (f": colour score {colour[g][0]:.2f} ± {colour[g][1]:.2f}" if colour else ""), fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    plots.save(fig, out_dir / "first_layer.png")
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
        plots.save(fig, out_dir / "kernels_by_group.png")

    stages = analysis.compute_breakdown(model, info.image_shape)
    learned = _learned_groups(model, variables, batch, out_dir, plt)
    mean = lambda key: float(np.mean([p[key] for p in pairs])) if pairs else None  # noqa: E731
    result = {"step": step, "pairs": pairs, "breakdown": stages, "first_layer": {
        "layer": family.first_conv, "groups": first_groups, "colour_scores": colour}, "learned_groups": learned,
        "summary": {"block_diagonality": mean("score"), "chance": mean("chance"), "inside": mean("inside"),
        "outside": mean("outside"), "learned_inside_outside": learned and learned["inside_outside"],
        "colour_scores": " / ".join(f"{m:.2f} ± {sd:.2f}" for m, sd in colour) if colour and first_groups > 1 else None}}
    storage.write_json(out_dir / "analysis.json", result)
    return result


def _learned_groups(model: Any, variables: dict, batch: Any, out_dir: epath.Path, plt: Any) -> dict | None:
    """What a network's learned group convs (CondenseNet) kept: `learned_groups.png` (each drawn layer's groups x
    inputs, inputs sorted by group), the kept share per stage, and per layer whether its groups keep correlated
    inputs together (`analysis.learned_group_score`). None for a network without them."""
    from gconv import analysis

    masks = analysis.learned_masks(variables)
    if not masks:
        return None
    corrs = analysis.learned_input_correlations(model, variables, batch)
    layers = [{"layer": path, "groups": keep.shape[0], "kept": float(keep.mean()),
               **analysis.learned_group_score(keep, corrs[path])} for path, keep in masks.items()]
    shown = list(masks.items())[::max(1, len(masks) // 8)][:8]
    fig, axes = plt.subplots(len(shown), 1, figsize=(6, 0.8 * len(shown) + 0.8), dpi=110, squeeze=False)
    for ax, (path, keep), layer in zip(axes[:, 0], shown, layers[::max(1, len(masks) // 8)]):
        ax.imshow(analysis.connectivity_view(keep), cmap="gray_r", vmin=0, vmax=1, interpolation="nearest",
                  aspect="auto")
        ax.set_title(f"{path}: {keep.shape[0]} groups x {keep.shape[1]} inputs, kept {layer['kept']:.2f}, "
                     f"|corr| in / out {layer['inside']:.2f} / {layer['outside']:.2f}", fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    plots.save(fig, out_dir / "learned_groups.png")
    inside = float(np.nanmean([layer["inside"] for layer in layers]))
    outside = float(np.nanmean([layer["outside"] for layer in layers]))
    return {"layers": layers, "kept_by_stage": analysis.kept_fractions(masks), "png": "learned_groups.png",
            "inside_outside": f"{inside:.3f} / {outside:.3f}"}


def _breakdown_of(run_dir: epath.Path) -> dict[str, float] | None:
    """MMACs per layer kind of an analysed run."""
    path = run_dir / "analysis" / "analysis.json"
    if not storage.exists(path):
        return None
    kinds: dict[str, float] = {}
    for stage in storage.read_json(path)["breakdown"].values():
        for kind, cost in stage.items():
            kinds[kind] = kinds.get(kind, 0.0) + cost["macs"] / 1e6
    return kinds


def _first_correlation(run_dir: epath.Path) -> dict[str, Any] | None:
    """The first analysed layer pair of a run: its |corr| matrix (from the saved .npy) and scores."""
    path = run_dir / "analysis" / "analysis.json"
    pairs = storage.read_json(path)["pairs"] if storage.exists(path) else []
    if not pairs or "npy" not in pairs[0]:
        return None
    return {**pairs[0], "corr": storage.read_npy(run_dir / "analysis" / pairs[0]["npy"])}


def _pm(mean: float, std: float, n: int) -> str:
    return "-" if not n else f"{mean:.2f} ± {std:.2f}" if n > 1 else f"{mean:.2f}"


def point_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table, one row per sweep point: its model, n seeds, final and best top-1 error as mean ± std, the
    difference from the first point with Welch's p-value, its Holm adjustment and the verdict."""
    cells = []
    for r in rows:
        verdict = "-" if r["p"] is None else "within noise" if r["p_holm"] >= stats.ALPHA else "differs"
        cells.append({**r, "final": _pm(r["mean"], r["std"], r["n"]), "best": _pm(r["best_mean"], r["best_std"], r["n"]),
                      "delta_pp": None if r["delta"] is None else f"{r['delta']:+.2f}",
                      "p_value": None if r["p"] is None else f"{r['p']:.2f}",
                      "p_holm_value": None if r["p"] is None else f"{r['p_holm']:.2f}", "verdict": verdict})
    return _markdown(cells, [
        ("params", "params", "{:,}"), ("MMACs", "mmacs", "{:,.1f}"), ("acts", "acts", "{:,}"), ("seeds", "n", "{}"),
        ("final top-1 err (%)", "final", "{}"), ("best top-1 err (%)", "best", "{}"),
        (f"Δ vs {rows[0]['name']} (pp)", "delta_pp", "{}"), ("p (Welch)", "p_value", "{}"),
        ("p (Holm)", "p_holm_value", "{}"), ("verdict", "verdict", "{}"),
        ("paper top-1 err (%)", "paper_top1_error", "{:.1f}"), ("paper top-5 err (%)", "paper_top5_error", "{:.1f}"),
        *ANALYSIS_COLUMNS, ("img/s", "img_per_sec", "{:,.0f}")])


def results(summaries: list[dict[str, Any]], rows: list[dict[str, Any]] | None = None) -> str:
    """The report's answer: one table row per sweep point (mean ± std when it has several seeds, else one per run)
    and the noise verdict in words. `rows`: `stats.point_rows(summaries)`, when already computed."""
    rows = rows if rows is not None else stats.point_rows(summaries)
    table = point_table(rows) if max(r["n"] for r in rows) > 1 else report_table(summaries)
    return table + "\n\n" + stats.noise_verdict(rows) if len(rows) > 1 else table


def design_space_section(rows: list[dict[str, Any]], edf_path: Any, scatter_path: Any) -> list[str]:
    """The report's comparison of design spaces (`rows`: one per sampled point, each with its `design_space`): the
    EDF of each space's errors and error against MMACs (written to the two paths), each space's best models, and
    the difference of each space's mean error from the first space's with its 95% bootstrap interval."""
    from gconv.designspace import bootstrap_difference

    by_space: dict[str, list[dict]] = {}
    for row in rows:
        if row.get("design_space") and row.get("mean") is not None:
            by_space.setdefault(row["design_space"], []).append(row)
    plots.error_edfs({space: [r["mean"] for r in members] for space, members in by_space.items()}, edf_path)
    plots.error_vs_mmacs_by_space([r for members in by_space.values() for r in members], scatter_path)
    text = ["## Design spaces", "",
            "| design space | models | mean top-1 err (%) | best model | its top-1 err (%) | Δ mean vs first (pp), "
            "95% bootstrap CI | verdict |", "|---|---:|---:|---|---:|---|---|"]
    first = next(iter(by_space.values()), [])
    for space, members in by_space.items():
        errors = [r["mean"] for r in members]
        best = min(members, key=lambda r: r["mean"])
        if members is first or len(members) < 2 or len(first) < 2:
            difference, verdict = "-", "-"
        else:
            delta, low, high = bootstrap_difference([r["mean"] for r in first], errors)
            difference = f"{delta:+.2f} [{low:+.2f}, {high:+.2f}]"
            verdict = "within noise" if low <= 0 <= high else "differs"
        text.append(f"| {space} | {len(members)} | {sum(errors) / len(errors):.2f} | {best['name']} "
                    f"({best['model']}) | {best['mean']:.2f} | {difference} | {verdict} |")
    text += ["", "The EDF of a space is the fraction of its models with error at most x: a curve above another "
             "means more good models at every error level (docs/design_spaces.md). A difference whose 95% bootstrap "
             "interval holds 0 is within the noise of sampling so few models.", ""]
    return text


def by_class_section(summaries: list[dict[str, Any]], classes: int = 20, points: int = 12) -> list[str]:
    """The final evaluation's top-1 error (%) by class, a column per sweep point (mean over its seeds): every class
    up to `classes` of them, else the `classes` of highest mean error; the first `points` points."""
    by_point = {point: [r["final_top1_error_by_class"] for r in runs if r.get("final_top1_error_by_class")]
                for point, runs in stats.group_by_point(summaries).items()}
    by_point = {point: errors for point, errors in by_point.items() if errors}
    if not by_point:
        return []
    names = list(dict.fromkeys(name for errors in by_point.values() for e in errors for name in e))
    cell = {(point, name): np.mean([e[name] for e in errors if name in e]) if any(name in e for e in errors)
            else math.nan for point, errors in by_point.items() for name in names}
    overall = {name: np.nanmean([cell[(p, name)] for p in by_point]) for name in names}
    shown = names if len(names) <= classes else sorted(names, key=lambda n: -overall[n])[:classes]
    columns = list(by_point)[:points]
    some = f"; the {classes} of {len(names)} classes with the highest mean error" if len(names) > classes else ""
    first = f"; the first {points} of {len(by_point)} points" if len(by_point) > points else ""
    text = ["## Top-1 error by class", "",
            f"The final evaluation's top-1 error (%) of each class (named as the data names them), mean over seeds"
            f"{some}{first}.", "",
            "| class | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for name in shown:
        text.append(f"| {name} | " + " | ".join("" if math.isnan(cell[(p, name)]) else f"{cell[(p, name)]:.1f}"
                                               for p in columns) + " |")
    return text


def write_report(workdir: Any, analyze: bool = True) -> epath.Path:
    """Writes `report.md` with a table per sweep point (mean ± std over seeds, with a test against the first point
    and its verdict in words), `error_vs_<sweep axis>.png`, `error_vs_mmacs.png` and `learning_curves.png`; with
    `analyze`, first runs `analyze_run` on each run and adds its scores, pictures and `compute_breakdown.png`.
    The pictures also go to `WORKDIR/tensorboard` as TensorBoard images."""
    workdir = storage.as_path(workdir)
    if analyze:
        for summary in load_summaries(workdir):
            analyze_run(workdir / summary["name"])
    summaries = load_summaries(workdir)
    if not summaries:
        raise FileNotFoundError(f"no finished runs (*/summary.json) under {workdir}: run the sweep first.")
    rows = stats.point_rows(summaries)
    seeded = max(r["n"] for r in rows) > 1
    axes = [s["sweep_axis"] for s in summaries if s.get("sweep_axis")]
    axis = max(set(axes), key=axes.count) if axes else "cardinality"  # the axis most points are swept along
    spaces_text = []
    if any(s.get("design_space") for s in summaries):  # sampled models: compared by design space, not by axis
        pictures = ["error_edf_by_design_space.png", "error_vs_mmacs_by_design_space.png", "learning_curves.png"]
        spaces_text = design_space_section(rows, workdir / pictures[0], workdir / pictures[1])
    else:
        pictures = [f"error_vs_{axis}.png", "error_vs_mmacs.png", "learning_curves.png"]
        plots.error_vs(rows, lambda r: r.get(f"field:{axis}"), axis, workdir / pictures[0], axis != "width")
        plots.error_vs(rows, lambda r: r.get("mmacs"), "MMACs (multiply-adds)", workdir / pictures[1], False)
    by_point = stats.group_by_point(summaries)
    curves = {point: [metrics_log.read_metrics(workdir / r["name"] / "metrics.jsonl") for r in runs]
              for point, runs in by_point.items()}
    plots.learning_curves(curves, workdir / pictures[2])
    text = [f"# Report: {workdir.name}", "", results(summaries, rows), ""] + spaces_text + [
        f"![{name}]({name})" for name in pictures]
    if seeded:
        text += ["", "## Runs", "", report_table(summaries)]
    by_class = by_class_section(summaries)
    text += ([""] + by_class) if by_class else []
    if analyze:
        first = {point: runs[0]["name"] for point, runs in by_point.items()}
        side_by_side = {point: _first_correlation(workdir / name) for point, name in first.items()}
        if any(side_by_side.values()):
            plots.correlation_maps({p: c for p, c in side_by_side.items() if c}, workdir / "correlation_by_point.png")
            pictures.append("correlation_by_point.png")
            text += ["", "![correlation_by_point.png](correlation_by_point.png)"]
        breakdowns = {point: _breakdown_of(workdir / name) for point, name in first.items()}
        if any(breakdowns.values()):
            plots.compute_bars({p: b for p, b in breakdowns.items() if b}, workdir / "compute_breakdown.png")
            pictures.append("compute_breakdown.png")
            text += ["", "![compute_breakdown.png](compute_breakdown.png)"]
        text += ["", "## What the groups learn",
                 "Block-diagonality: the share of |correlation| between a layer's filter responses and the next "
                 "(grouped) layer's that falls inside the group blocks; `chance` is 1/groups. See docs/analysis.md."
                 + (" Pictures of each point's first seed." if seeded else "")]
        for point, name in first.items():
            pngs = sorted((workdir / name / "analysis").glob("*.png"))
            text += ["", f"### {point}"] + [f"![{p.name}]({name}/analysis/{p.name})" for p in pngs]
    path = workdir / "report.md"
    storage.write_text(path, "\n".join(text) + "\n")
    tensorboard.write_images(workdir / "tensorboard", {name: workdir / name for name in pictures})
    return path
