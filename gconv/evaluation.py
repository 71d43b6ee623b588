"""Evaluating what was trained: a run directory's checkpoint (latest, best or a step) or a converted PyTorch
weights file, on a dataset split, giving top-1/top-5 error and loss (`python launch.py eval ...`)."""
from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections

from gconv import data as data_lib
from gconv import checkpoints, storage
from gconv.models import family_of, model_from_config, model_state
from gconv.loop import error_scores
from gconv.summary import run_classes
from gconv.train import TrainState, eval_step

__all__ = ["evaluate_variables", "evaluate_run", "evaluate_weights"]


def evaluate_variables(model: Any, variables: dict, data: ml_collections.ConfigDict, split: str = "eval",
                       names: Sequence[str] = ()) -> dict:
    """`{eval_top1_error, eval_top5_error, eval_loss, images, classes}` of `model` with `variables` on every example
    of `split` ("eval" or "train", without augmentation) of the dataset `data` (a config's `data` block). `classes`:
    per class, `(name, top-1 error %, images)`, named as the data names them (an image folder's sub-folders, a TFDS
    dataset's label names; `names` when given: a run's `classes.json`), else by index."""
    source, info = data_lib.get_source(data, split)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                       batch_stats=variables.get("batch_stats", {}), opt_state=None, rng=None,
                       model_state=model_state(variables))

    step = functools.partial(eval_step, model=model)
    totals, jitted = None, jax.jit(data_lib.standardized(step, info))
    for batch in data_lib.eval_batches(source, info, data.eval_batch_size, data.num_workers):
        out = jitted(state, batch)
        totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    totals = jax.device_get(totals)
    per_class = totals.pop("per_class")
    names = names or info.classes or tuple(str(i) for i in range(info.num_classes))
    classes = [(name, 100.0 * (1.0 - correct / count), int(count))
               for name, (correct, count) in zip(names, per_class) if count > 0]
    return {**error_scores({k: float(v) for k, v in totals.items()}), "images": len(source), "classes": classes}


def _classes(variables: dict, model_name: str) -> int:
    """The number of classes of a model's variables: the outputs of the classifier its family declares."""
    family = family_of(model_name)
    return family.params_at(variables["params"], family.head)["kernel"].shape[-1]


def evaluate_run(run_dir: Any, checkpoint: str = "latest", split: str = "eval") -> dict:
    """Evaluates a run directory's checkpoint (`checkpoint`: latest, best or a step) with the run's own config."""
    run_dir = storage.as_path(run_dir)
    if not storage.exists(run_dir / "config.json"):
        raise FileNotFoundError(f"{run_dir} has no config.json: pass the directory of a run (WORKDIR/POINT).")
    config = ml_collections.ConfigDict(storage.read_json(run_dir / "config.json"))
    step = checkpoints.choose_checkpoint(run_dir, checkpoint)
    restored = checkpoints.restore_on_host(run_dir / "checkpoints" / str(step) / "default")
    model = model_from_config(config.model, _classes(restored, config.model.name))
    names = run_classes(run_dir) or ()
    scores = evaluate_variables(model, checkpoints.model_variables(restored), config.data, split, names)
    return {**scores, "model": family_of(model).name_of(model), "step": step, "split": split}


def evaluate_weights(path: str, model_name: str, data: ml_collections.ConfigDict, split: str = "eval") -> dict:
    """Evaluates a PyTorch weights file (torchvision/timm/imgclsmob layout, see `gconv.convert`) as `model_name`,
    keeping the checkpoint's classifier."""
    from gconv.convert import load_torch_weights

    variables = load_torch_weights(model_name, path)
    model = model_from_config({"name": model_name}, _classes(variables, model_name))
    return {**evaluate_variables(model, variables, data, split), "model": model_name, "split": split}
