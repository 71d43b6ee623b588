"""A finished run in one record, `summary.json`: what was built, its cost, its errors and speed. Reports read it."""
from __future__ import annotations

from typing import Any

import numpy as np

from gconv import storage
from gconv.checkpoints import best_step
from gconv.complexity import count_params, counts
from gconv.models import family_of

__all__ = ["run_summary", "run_classes", "BY_CLASS", "CLASSES"]

BY_CLASS = "eval_top1_error_by_class"  # in the final evaluation's record: per class index, None without images
CLASSES = "classes.json"  # a run's class names, where its data names them (gconv.loop.write_run_files)


def run_classes(run_dir: Any) -> list[str] | None:
    """The class names a run's data gave when it began (its `classes.json`), None where the data named none."""
    path = run_dir / CLASSES
    return storage.read_json(path) if storage.exists(path) else None


def run_summary(run_dir: Any, model: Any, config: Any, image_shape: tuple[int, ...], params: Any,
                history: list[dict], throughput: list[float], total_steps: int) -> dict[str, Any]:
    """A finished run in one record (`summary.json`, what reports read): what was built, its cost, its errors
    (from the `metrics.jsonl` records `history`) and speed (`throughput`: img/s of the session's log intervals)."""
    evals = {r["step"]: r["eval_top1_error"] for r in history if "eval_top1_error" in r}
    previous = storage.read_json(run_dir / "summary.json") if storage.exists(run_dir / "summary.json") else {}
    family, seeds = family_of(model), config.get("seeds", 1)
    cost = counts(model, image_shape)  # MACs and activations, one shape-only pass
    return {
        "name": run_dir.name, "point": run_dir.name.removesuffix(f"_seed{config.seed}") if seeds > 1 else run_dir.name,
        "seed": config.seed, "model": family.name_of(model), "family": family.name, "steps": total_steps,
        "fields": family.fields_of(model), "sweep_axis": family.sweep_axis,
        "params": count_params(params), "mmacs": cost.macs / 1e6, "acts": cost.acts,
        "design_space": config.get("design_space") or None,
        "final_top1_error": evals[max(evals)] if evals else None, "best_top1_error": min(evals.values(), default=None),
        "best_step": best_step(evals),
        "img_per_sec": float(np.median(throughput)) if throughput else previous.get("img_per_sec"),
        "wall_time": max((r.get("wall_time") or 0.0 for r in history), default=0.0),
        "paper_top1_error": config.get("paper_top1_error"), "paper_top5_error": config.get("paper_top5_error"),
        "final_top5_error": [r["eval_top5_error"] for r in history if "eval_top5_error" in r][-1] if evals else None,
        "final_top1_error_by_class": _by_class(run_dir, history),
    }


def _by_class(run_dir: Any, history: list[dict]) -> dict[str, float] | None:
    """`{class name: top-1 error %}` of the final evaluation (names from the run's `classes.json`, else indices);
    classes without evaluation images left out."""
    final = [r[BY_CLASS] for r in history if BY_CLASS in r]
    if not final:
        return None
    names = run_classes(run_dir) or [str(i) for i in range(len(final[-1]))]
    return {name: error for name, error in zip(names, final[-1]) if error is not None}
