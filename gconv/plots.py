"""The report's figures (matplotlib, Agg), written as PNGs to any storage: error against the swept field with
seed spread, learning curves, compute by layer kind."""
from __future__ import annotations

import io
from typing import Any, Callable, Sequence

import numpy as np
from etils import epath

from gconv import storage

__all__ = ["pyplot", "save", "error_vs", "learning_curves", "compute_bars", "correlation_map", "correlation_maps",
           "error_edfs", "error_vs_mmacs_by_space"]


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: epath.Path) -> None:
    """A figure as a PNG at `path` (any storage), then closed."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    pyplot().close(fig)
    storage.write_bytes(path, buffer.getvalue())


def _series_label(row: dict) -> str:
    return row.get("family", row["model"].split("_")[0]) + (" (no shuffle)" if row.get("field:shuffle") is False else "")


def error_vs(rows: Sequence[dict], x_of: Callable[[dict], Any], x_label: str, path: epath.Path, log_x: bool) -> None:
    """Top-1 error of each sweep point (`rows` from `gconv.stats.point_rows`) against `x_of(row)`: the mean with a
    ± std bar and each seed's run as a dot when there are several; one line per family / shuffle setting."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4), dpi=120)
    series: dict[str, list] = {}
    for row in rows:
        if x_of(row) is not None and row["n"]:
            series.setdefault(_series_label(row), []).append(row)
    for label, points in series.items():
        points.sort(key=x_of)
        xs = [x_of(p) for p in points]
        line = ax.errorbar(xs, [p["mean"] for p in points], yerr=[p["std"] for p in points], fmt="o-", capsize=3,
                           label=label)
        for p in points:
            if p["n"] > 1:
                ax.scatter([x_of(p)] * p["n"], p["values"], s=8, alpha=0.4, color=line[0].get_color())
            ax.annotate(p["name"], (x_of(p), p["mean"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if log_x:
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(plt.matplotlib.ticker.ScalarFormatter())
    n = sorted({row["n"] for row in rows})
    ax.set_xlabel(x_label)
    ax.set_ylabel("top-1 error (%)" + (f", mean ± std over {n[-1]} seeds" if n and n[-1] > 1 else ""))
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    save(fig, path)


def error_edfs(errors: dict[str, Sequence[float]], path: epath.Path) -> None:
    """The empirical distribution function of each design space's model errors (`errors[space]`), in one plot:
    the fraction of its models with error <= x. A space whose curve lies above another's has more good models."""
    from gconv.designspace import edf

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4), dpi=120)
    for space, values in errors.items():
        xs = np.sort(np.asarray(values, float))
        ax.step(np.concatenate([[xs[0]], xs]), np.concatenate([[0.0], edf(values, xs)]), where="post",
                label=f"{space} (n={len(xs)}, mean {xs.mean():.2f}%)")
    ax.set_xlabel("top-1 error (%)")
    ax.set_ylabel("cumulative fraction of models")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save(fig, path)


def error_vs_mmacs_by_space(rows: Sequence[dict], path: epath.Path) -> None:
    """Each sampled model's top-1 error against its MMACs, coloured by its design space."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4), dpi=120)
    spaces = list(dict.fromkeys(r["design_space"] for r in rows))
    for space in spaces:
        points = [r for r in rows if r["design_space"] == space and r.get("mean") is not None]
        ax.scatter([r["mmacs"] for r in points], [r["mean"] for r in points], s=14, alpha=0.8, label=space)
    ax.set_xlabel("MMACs (multiply-adds)")
    ax.set_ylabel("top-1 error (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save(fig, path)


def learning_curves(curves: dict[str, list[list[dict]]], path: epath.Path) -> None:
    """Training loss and eval top-1 error against step: `curves[point]` holds each seed's `metrics.jsonl` records;
    one colour per point, one thin line per seed and their mean in bold when there are several."""
    plt = pyplot()
    fig, (ax_loss, ax_err) = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (point, runs) in enumerate(curves.items()):
        color = colors[i % len(colors)]
        for ax, key in ((ax_loss, "train_loss"), (ax_err, "eval_top1_error")):
            lines = [[(r["step"], r[key]) for r in records if r.get(key) is not None] for records in runs]
            lines = [line for line in lines if line]
            for line in lines:
                ax.plot(*zip(*line), color=color, alpha=0.35 if len(lines) > 1 else 1.0, linewidth=0.8, marker=".",
                        markersize=3, label=None if len(lines) > 1 else point)
            common = sorted(set.intersection(*(set(s for s, _ in line) for line in lines))) if lines else []
            if len(lines) > 1 and common:
                mean = [np.mean([dict(line)[s] for line in lines]) for s in common]
                ax.plot(common, mean, color=color, linewidth=1.8, label=point)
    ax_loss.set(xlabel="step", ylabel="training loss", yscale="log", title="training loss")
    ax_err.set(xlabel="step", ylabel="top-1 error (%)", title="eval top-1 error")
    for ax in (ax_loss, ax_err):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save(fig, path)


def compute_bars(per_point: dict[str, dict[str, float]], path: epath.Path) -> None:
    """Stacked bars of MMACs per layer kind (`per_point[point][kind]`), one bar per sweep point."""
    plt = pyplot()
    kinds = sorted({k for point in per_point.values() for k in point})
    fig, ax = plt.subplots(figsize=(1.0 * len(per_point) + 3, 4), dpi=120)
    bottom = np.zeros(len(per_point))
    for kind in kinds:
        values = np.array([per_point[n].get(kind, 0.0) for n in per_point])
        ax.bar(list(per_point), values, bottom=bottom, label=kind)
        bottom += values
    ax.set_ylabel("MMACs (multiply-adds)")
    ax.set_title("compute by layer kind", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save(fig, path)


def correlation_map(ax, corr: np.ndarray, blocks: int, title: str, layer_a: str, layer_b: str) -> None:
    """|corr| between two layers' filters as a heat map (rows `layer_a`, columns `layer_b`), with the boundaries
    of the `blocks` diagonal blocks drawn."""
    rows, cols = corr.shape
    ax.imshow(corr, cmap="viridis", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    for i in range(1, blocks):
        ax.axhline(i * rows / blocks - 0.5, color="white", lw=0.6)
        ax.axvline(i * cols / blocks - 0.5, color="white", lw=0.6)
    ax.set_title(title, fontsize=8)
    ax.set_xlabel(layer_b, fontsize=8)
    ax.set_ylabel(layer_a, fontsize=8)


def correlation_maps(by_point: dict[str, dict], path: epath.Path) -> None:
    """The first analysed layer pair of each sweep point side by side (`{point: analysis pair with its "corr"}`):
    the standard network beside its grouped variants, as Ioannou et al.'s figure shows them."""
    plt = pyplot()
    n = len(by_point)
    fig, axes = plt.subplots(1, n, figsize=(2.6 * n + 0.6, 3.0), dpi=110, squeeze=False)
    for ax, (point, pair) in zip(axes[0], by_point.items()):
        correlation_map(ax, pair["corr"], pair["blocks"], f"{point}: score {pair['score']:.2f} "
                        f"(chance {pair['chance']:.2f})", pair["layer_a"], pair["layer_b"])
    fig.tight_layout()
    save(fig, path)
