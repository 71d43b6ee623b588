"""Experiment configs: load `experiments/*.py`, apply `key=value` overrides, expand sweeps.

An experiment file defines `get_config(arg=None) -> ml_collections.ConfigDict`, `VARIANTS` (the `:arg` names it
takes) and optionally `get_sweep(arg=None) -> list[dict]`, each point a dict with a `name` and dotted-key overrides
(`{"name": "c4", "model.cardinality": 4, "model.base_width": 24}`).
"""
from __future__ import annotations

import ast
import contextlib
import difflib
import importlib.util
import json
import os
from typing import Any, Iterable

import ml_collections
from etils import epath

from gconv import checkpoints, storage

__all__ = ["load_experiment", "apply_overrides", "expand_sweep", "flat_keys", "flat_items", "parse_value", "base_config",
           "make_local", "cardinality_sweep", "check_config"]


def load_experiment(spec: str) -> tuple[ml_collections.ConfigDict, list[dict[str, Any]]]:
    """`PATH[:arg]` -> (locked config, sweep points). Without a `get_sweep`, the sweep is one point named "run"."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} does not exist (from --config={spec!r}); "
                                f"experiments live in experiments/*.py.")
    module_spec = importlib.util.spec_from_file_location(f"gconv_experiment_{os.path.basename(path)[:-3]}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    variants = getattr(module, "VARIANTS", ())
    if arg and arg not in variants:
        raise ValueError(f"{path} has no variant {arg!r}: use one of {list(variants)} after the ':' "
                         f"(or none for the full experiment).")
    config = module.get_config(arg or None)
    sweep = module.get_sweep(arg or None) if hasattr(module, "get_sweep") else [{"name": "run"}]
    config.lock()
    for point in sweep:  # a typo in a sweep fails at load time, not hours into the sweep
        apply_overrides(config.copy_and_resolve_references(), {k: v for k, v in point.items() if k != "name"})
    return config, sweep


def flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """Every leaf key, dotted: `["data.batch_size", "model.cardinality", ...]`."""
    keys = []
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            keys += flat_keys(value, f"{prefix}{key}.")
        else:
            keys.append(f"{prefix}{key}")
    return keys


def parse_value(text: str, current: Any) -> Any:
    """A command-line string as the type of the value it replaces (`"8"` -> 8 for an int field)."""
    if isinstance(current, bool):
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise ValueError(f"{text!r} is not a boolean: use true or false.")
    if isinstance(current, str):
        return text
    if isinstance(current, float):
        try:
            return float(text)  # also "nan" and "inf", which the run's checks then refuse by name
        except ValueError:
            pass
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if current is None:
            return text
        raise ValueError(f"{text!r} is not a valid {type(current).__name__}.") from None
    if isinstance(current, float) and isinstance(value, int):
        value = float(value)
    if isinstance(current, tuple) and isinstance(value, list):
        value = tuple(value)
    return value


def closest_keys(key: str, valid: list[str], n: int = 3) -> list[str]:
    """Valid keys a typo most likely meant: abbreviations (`optim.lr` -> `optim.learning_rate`) and spellings."""
    section, _, leaf = key.rpartition(".")
    initials = [k for k in valid if k.rpartition(".")[0] == section
                and "".join(w[0] for w in k.rpartition(".")[2].split("_")) == leaf]
    spelled = difflib.get_close_matches(key, valid, n=n, cutoff=0.5)
    return list(dict.fromkeys(initials + spelled))[:n] or valid[:10]


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, Any]) -> ml_collections.ConfigDict:
    """Sets dotted keys in place (string values are parsed by the field's type). Unknown keys raise `KeyError`
    naming the closest valid keys; a value of the wrong type raises `ValueError`."""
    valid = flat_keys(config)
    for key, value in overrides.items():
        if key not in valid:
            raise KeyError(f"unknown config key {key!r}; closest valid keys: {closest_keys(key, valid)}.")
        *parents, leaf = key.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        current = node[leaf]
        if isinstance(value, str) and not isinstance(current, str):
            try:
                value = parse_value(value, current)
            except ValueError as e:
                raise ValueError(f"config key {key!r}: {e}") from None
        try:
            with node.ignore_type() if current is None else contextlib.nullcontext():
                node[leaf] = value
        except TypeError as e:
            raise ValueError(f"config key {key!r}: {e}") from e
    return config


def expand_sweep(config: ml_collections.ConfigDict, sweep: list[dict[str, Any]], overrides: dict[str, Any],
                 points: Iterable[str] | None = None) -> list[tuple[str, ml_collections.ConfigDict]]:
    """One `(name, config)` per run: base config <- point <- command-line overrides, then one run per seed.

    `points`: names or indices to keep (all when None); an unknown one raises `KeyError`. With `seeds` N > 1 each
    point becomes N runs, `{point}_seed{s}` for s = seed, seed + 1, ..., each resumable on its own.
    """
    names = [p["name"] for p in sweep]
    if len(set(names)) != len(names):
        raise ValueError(f"sweep point names must be unique: {names}.")
    selected = list(range(len(sweep)))
    if points:
        selected = []
        for p in points:
            if p in names:
                selected.append(names.index(p))
            elif p.isdigit() and int(p) < len(sweep):
                selected.append(int(p))
            else:
                raise KeyError(f"unknown sweep point {p!r}: this experiment has {names} (or indices 0..{len(names) - 1}).")
    out = []
    for i in selected:
        point_config = config.copy_and_resolve_references()
        apply_overrides(point_config, {k: v for k, v in sweep[i].items() if k != "name"})
        apply_overrides(point_config, overrides)
        if point_config.seeds < 1:
            raise ValueError(f"seeds={point_config.seeds} must be >= 1 (runs per sweep point).")
        for k in range(point_config.seeds):
            run_config = point_config.copy_and_resolve_references()
            run_config.seed = point_config.seed + k
            run_config.lock()
            out.append((names[i] if point_config.seeds == 1 else f"{names[i]}_seed{run_config.seed}", run_config))
    return out


def base_config() -> ml_collections.ConfigDict:
    """Defaults every experiment starts from; experiment files change only what differs."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.seeds = 1  # runs per sweep point, with seeds seed, seed + 1, ...; the report gives mean ± std over them
    config.members = "auto"  # runs that differ only in seed or optimizer values train as one program (gconv.members):
    # "auto" joins them on an accelerator, "on" everywhere, "off" never, N at most N per program
    config.member_vmap = 0  # members computed at once by vmap (0: all; fewer hold less memory, in blocks one by one)
    # A family's bare name plus its fields (or a full registry name such as "resnext50_32x4d" alone).
    config.model = ml_collections.ConfigDict(dict(name="resnext11", cardinality=1, base_width=16, dtype="float32"))
    config.data = ml_collections.ConfigDict(dict(
        name="digits", data_dir="", batch_size=64, eval_batch_size=256, augment=True, image_size=32, num_classes=10,
        num_workers=-1,  # input threads per process; -1: every core of the host
        worker_processes=0,  # grain worker processes, each with num_workers threads (0: threads in this process)
        crop_size=0,  # ImageNet-size datasets: the crop's side (0: 224; AlexNet's Caffe layout takes 227)
        # any TFDS dataset (gconv.data): splits with slicing ("" = its own), the training crop, RGB mean and std of
        # pixels in [0, 1] (empty: measured once on the training split, cached beside the data)
        train_split="", eval_split="", crop="auto", mean=(), std=(),
        path=""))  # data.name="folder": DIR with train/CLASS/*.jpg and val/CLASS/*.jpg (local or gs://)
    config.optim = ml_collections.ConfigDict(dict(
        name="sgd", learning_rate=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4, schedule="cosine",
        warmup_epochs=0.0, decay_epochs=(), decay_factor=0.1, label_smoothing=0.0))
    config.mesh = ml_collections.ConfigDict(dict(  # -1: all remaining devices; member: blocks the members spread over
        data=-1, model=1, member=1, layout="data_major"))
    config.sharding = ml_collections.ConfigDict(dict(  # where parameters and optimizer state live (gconv.parallel)
        strategy="auto",  # "data", "group", "fsdp"; "auto": "group" when mesh.model > 1, else "data"
        rules=()))  # ((path regex, spec), ...) replacing the family's group rules (a user's module has none)
    config.parallel = "jit"  # or "pmap": data parallel under jax.pmap (BatchNorm statistics per device)
    config.num_epochs = 30.0
    config.num_steps = -1  # > 0 overrides num_epochs
    config.log_every_steps = 50
    config.eval_every_steps = 500
    config.checkpoint_every_steps = 500
    config.keep_checkpoints = 2
    config.precise_bn_images = 0  # > 0: BN statistics recomputed over this many training images before each eval
    config.storage_timeout_s = 300.0  # the longest wait on one storage operation before the run stops (one line)
    config.profile_steps = ""  # "a,b": a jax.profiler trace of training steps a..b in RUN_DIR/profile
    config.init_from = ""  # a PyTorch checkpoint (.pth/.safetensors) to start from, see gconv.convert
    config.design_space = ""  # the design space a sampled point comes from (gconv.designspace): the report's EDFs
    config.paper_top1_error = -1.0  # the published figure for this point, shown beside ours; < 0 = none
    config.paper_top5_error = -1.0
    return config


def make_local(config: ml_collections.ConfigDict, image_size: int = 32) -> ml_collections.ConfigDict:
    """The seconds-long debugging variant of an experiment: synthetic data, float32, 4 steps of batch 16, logs,
    evals and checkpoints every 2 steps. Model and optimizer are the experiment's own unless the caller changes them."""
    config.model.dtype = "float32"
    config.data.name = "synthetic"
    config.data.image_size = image_size
    config.data.batch_size = 16
    config.num_steps = 4
    config.log_every_steps = config.eval_every_steps = config.checkpoint_every_steps = 2
    return config


def cardinality_sweep(cardinalities: Iterable[int], channels: int = 256, base_width: int = 64) -> list[dict[str, Any]]:
    """Sweep points `c{C}` trading cardinality C for bottleneck width d at the complexity of the C=1, d=`base_width`
    block on `channels` (ResNeXt paper Table 2; see `gconv.complexity.preserving_width`)."""
    from gconv.complexity import preserving_width

    return [{"name": f"c{c}", "model.cardinality": c, "model.base_width": preserving_width(c, channels, base_width)}
            for c in cardinalities]


# Where and how a run executes, not what it computes (mesh, step transform, input threads, storage waits, joining
# other runs): free to change on resume.
_PLACEMENT = ("mesh", "sharding", "parallel", "storage_timeout_s", "members", "member_vmap")


def flat_items(tree: dict, prefix: str = "") -> dict[str, Any]:
    """A nested dict (a config as JSON) as `{dotted key: value}`."""
    out = {}
    for key, value in tree.items():
        out.update(flat_items(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


_INPUT_WORKERS = ("data.num_workers", "data.worker_processes")  # how fast batches come, not what they hold


def _what(config_json: dict) -> dict[str, Any]:
    """What a run trained with, as dotted keys: the config less placement, input threads and the published figures
    the report shows beside it (`paper_*`), with keys it lacks at gconv's defaults (a key added to gconv since the
    run was written, at its default, changes nothing)."""
    defaults = flat_items(json.loads(base_config().to_json_best_effort()))
    return {k: v for k, v in {**defaults, **flat_items(config_json)}.items()
            if k.split(".")[0] not in _PLACEMENT and k not in _INPUT_WORKERS and not k.startswith("paper_")}


def check_config(run_dir: epath.Path, config_json: dict) -> None:
    """Refuses a run directory whose training was done with a different configuration (`config_json`: the new
    config as JSON). A `config.json` left by a start that trained nothing (no checkpoint, no metrics) does not
    block, and neither do placement keys."""
    path = run_dir / "config.json"
    if not storage.exists(path):
        return
    old, new = _what(storage.read_json(path)), _what(config_json)
    differing = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    from gconv.metrics_log import read_metrics

    trained = checkpoints.readable_checkpoint_steps(run_dir / "checkpoints") or read_metrics(run_dir / "metrics.jsonl")
    if differing and trained:
        raise ValueError(f"{run_dir} holds a run with a different config (keys differing: {differing}). "
                         f"Resume it with the same config, or pass a new --workdir; nothing was changed.")
