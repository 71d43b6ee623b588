"""Seeds and confidence: a sweep point's runs (one per seed) summarised as mean ± std, and each point compared with
the first by Welch's t-test, with a verdict in words.

A point's top-1 error on a small test set moves in steps of one image (0.28 % of the 360 digits), so a difference
of a few images between points is what reseeding alone produces; the test says when a difference is larger than
the seed-to-seed spread.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

__all__ = ["ALPHA", "group_by_point", "mean_std", "welch", "holm", "point_rows", "noise_verdict"]

ALPHA = 0.05  # a difference is called real when its Holm-adjusted two-sided Welch p-value is below this


def group_by_point(summaries: Sequence[dict]) -> dict[str, list[dict]]:
    """Run summaries grouped by sweep point (`point`, else the run's name), in first-seen order."""
    points: dict[str, list[dict]] = {}
    for s in summaries:
        points.setdefault(s.get("point") or s["name"], []).append(s)
    return points


def mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    """`(mean, sample std (ddof=1; 0.0 for one value), n)` of the values that are not None."""
    x = np.asarray([v for v in values if v is not None], np.float64)
    if not len(x):
        return math.nan, math.nan, 0
    return float(x.mean()), float(x.std(ddof=1)) if len(x) > 1 else 0.0, len(x)


def welch(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Two-sided p-value of Welch's t-test (unequal variances) that `a` and `b` have the same mean; None when a side
    has fewer than two values. Two constant samples give 1.0 when equal and 0.0 when not."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) < 2 or len(b) < 2:
        return None
    if a.var() == 0 and b.var() == 0:
        return 1.0 if a.mean() == b.mean() else 0.0
    from scipy import stats

    return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjustment of several p-values (None stays None): the family-wise error stays below α when
    each adjusted p is compared with α, however many points an ablation has."""
    order = sorted((p, i) for i, p in enumerate(p_values) if p is not None)
    adjusted: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p))
        adjusted[i] = running
    return adjusted


def point_rows(summaries: Sequence[dict], metric: str = "final_top1_error") -> list[dict[str, Any]]:
    """One row per sweep point: its first run's descriptive keys, `n`, `mean`/`std` of `metric` and of
    `best_top1_error`, and against the first point `delta` (of the means), `p` (Welch on `metric`) and `p_holm`
    (adjusted for the number of comparisons; the verdict uses it)."""
    groups = group_by_point(summaries)
    rows, reference = [], None
    for point, runs in groups.items():
        values = [r.get(metric) for r in runs if r.get(metric) is not None]
        mean, std, n = mean_std(values)
        best_mean, best_std, _ = mean_std([r.get("best_top1_error") for r in runs])
        row = {**runs[0], "name": point, "n": n, "mean": mean, "std": std, "best_mean": best_mean,
               "best_std": best_std, "values": values}
        for key in ("img_per_sec", "block_diagonality"):  # means over the seeds of what the point table shows
            row[key] = mean_std([r.get(key) for r in runs])[0] if any(r.get(key) is not None for r in runs) else None
        if reference is None:
            reference = row
            row["delta"], row["p"] = None, None
        else:
            row["delta"], row["p"] = row["mean"] - reference["mean"], welch(values, reference["values"])
        rows.append(row)
    for row, adjusted in zip(rows, holm([r["p"] for r in rows])):
        row["p_holm"] = adjusted
    return rows


def noise_verdict(rows: Sequence[dict], metric_name: str = "final top-1 error") -> str:
    """A paragraph saying, point by point, whether each differs from the first beyond seed-to-seed noise."""
    if len(rows) < 2:
        return ""
    first = rows[0]
    if min(r["n"] for r in rows) < 2:
        return ("One run per point: differences between points cannot be told from seed-to-seed noise. Run with "
                "`--config.seeds=3` (or more) for means, standard deviations and a test.")
    parts, real = [], []
    for r in rows[1:]:
        if r["p"] is None:
            parts.append(f"{r['name']}: no test (n={r['n']})")
            continue
        within = r["p_holm"] >= ALPHA
        parts.append(f"{r['name']} {r['delta']:+.2f} pp (p = {r['p']:.2f}, Holm-adjusted {r['p_holm']:.2f}: "
                     f"{'within noise' if within else 'differs'})")
        if not within:
            real.append(r["name"])
    n = sorted({r["n"] for r in rows})
    seeds = f"{n[0]} seeds" if len(n) == 1 else f"{n[0]}-{n[-1]} seeds"
    tests = sum(r["p"] is not None for r in rows[1:])
    head = (f"Against {first['name']} ({first['mean']:.2f} ± {first['std']:.2f} %), Welch's t-test on the {metric_name} "
            f"over {seeds} per point, two-sided, p-values Holm-adjusted for the {tests} comparisons, α = {ALPHA}: "
            + "; ".join(parts) + ". ")
    if not real:
        return head + (f"No point differs from {first['name']} beyond seed-to-seed noise: on this evidence the "
                       f"ablation's differences are noise.")
    return head + (f"{', '.join(real)} differ{'s' if len(real) == 1 else ''} from {first['name']} beyond "
                   f"seed-to-seed noise; the other differences are within it.")
