"""Training and evaluation: small pure functions, and the loop that ties them to data, checkpoints and logs.

`train_and_evaluate(config, workdir)` trains one configuration. Relaunched on the same workdir it resumes from the
last checkpoint (step, params, batch stats, optimizer state, RNG; the data position is the step) and ends with
exactly the metrics of an uninterrupted run.
"""
from __future__ import annotations

import functools
import json
import math
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from gconv import data as data_lib
from gconv import parallel
from gconv.complexity import count_flops, count_params
from gconv.models import create_model

__all__ = ["TrainState", "build_model", "create_optimizer", "create_train_state", "train_step", "eval_step",
           "evaluate", "train_and_evaluate", "read_metrics"]


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array  # raw uint32 key, so checkpoints stay plain arrays


def build_model(config: ml_collections.ConfigDict, num_classes: int, **overrides: Any) -> nn.Module:
    """`config.model.name` with every other `config.model` key as an override (dtype given by name)."""
    kwargs = {k: v for k, v in config.model.items() if k != "name"}
    kwargs["dtype"] = jnp.dtype(kwargs.get("dtype", "float32"))
    return create_model(config.model.name, num_classes=num_classes, **kwargs, **overrides)


def create_optimizer(optim: ml_collections.ConfigDict, steps_per_epoch: int,
                     total_steps: int) -> tuple[optax.GradientTransformation, Callable]:
    """SGD (momentum, Nesterov) or AdamW with linear warmup then cosine or step decay. Weight decay skips BN
    parameters and biases (every parameter of rank < 2)."""
    warmup = int(optim.warmup_epochs * steps_per_epoch)
    boundaries = jnp.asarray([int(e * steps_per_epoch) for e in optim.decay_epochs] or [total_steps + 1])
    if optim.schedule not in ("cosine", "step", "constant"):
        raise ValueError(f"optim.schedule={optim.schedule!r}: use 'cosine', 'step' or 'constant'.")

    def schedule(step):
        warm = jnp.minimum(1.0, (step + 1) / warmup) if warmup else 1.0
        if optim.schedule == "cosine":
            progress = jnp.clip((step - warmup) / max(1, total_steps - warmup), 0.0, 1.0)
            decay = 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        elif optim.schedule == "step":
            decay = optim.decay_factor ** jnp.sum(step >= boundaries)
        else:
            decay = 1.0
        return optim.learning_rate * warm * decay

    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)  # noqa: E731
    if optim.name == "sgd":
        tx = optax.chain(optax.add_decayed_weights(optim.weight_decay, decay_mask),
                         optax.sgd(schedule, momentum=optim.momentum, nesterov=optim.nesterov))
    elif optim.name == "adamw":
        tx = optax.adamw(schedule, weight_decay=optim.weight_decay, mask=decay_mask)
    else:
        raise ValueError(f"optim.name={optim.name!r}: use 'sgd' or 'adamw'.")
    return tx, schedule


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, image_shape: tuple[int, ...],
                       seed: int) -> TrainState:
    """Initialises parameters and BN statistics from `seed` on a `(1, *image_shape)` input."""
    init_rng, rng = jax.random.split(jax.random.PRNGKey(seed))
    variables = jax.jit(model.init)(init_rng, jnp.zeros((1,) + tuple(image_shape), jnp.float32))
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=variables.get("batch_stats", {}),
                      opt_state=tx.init(params), rng=rng)


def _cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float) -> jax.Array:
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def train_step(state: TrainState, batch: dict, *, model: nn.Module, tx: optax.GradientTransformation,
               schedule: Callable, label_smoothing: float = 0.0,
               axis_name: str | None = None) -> tuple[TrainState, dict]:
    """One SGD step on `batch` (`image: (B, H, W, C)`, `label: (B,)`). Under `shard_map`/`pmap` pass the batch
    axis name: gradients and metrics are averaged over it (BN statistics too, through the model's `axis_name`)."""

    def loss_fn(params):
        logits, updates = model.apply({"params": params, "batch_stats": state.batch_stats}, batch["image"],
                                      train=True, mutable=["batch_stats"])
        loss = jnp.mean(_cross_entropy(logits, batch["label"], label_smoothing))
        return loss, (logits, updates["batch_stats"])

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    if axis_name is not None:
        grads, loss, accuracy = jax.lax.pmean((grads, loss, accuracy), axis_name)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "accuracy": accuracy, "grad_norm": optax.global_norm(grads),
               "lr": schedule(state.step)}
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state,
                              rng=jax.random.fold_in(state.rng, state.step))
    return new_state, metrics


def eval_step(state: TrainState, batch: dict, *, model: nn.Module, axis_name: str | None = None) -> dict:
    """Sums over the real (mask=True) examples: `correct`, `loss`, `count` (over `axis_name` too, when set)."""
    logits = model.apply({"params": state.params, "batch_stats": state.batch_stats}, batch["image"], train=False)
    mask = batch["mask"].astype(jnp.float32)
    sums = {"correct": jnp.sum((jnp.argmax(logits, -1) == batch["label"]) * mask),
            "loss": jnp.sum(_cross_entropy(logits, batch["label"], 0.0) * mask), "count": jnp.sum(mask)}
    return jax.lax.psum(sums, axis_name) if axis_name is not None else sums


def evaluate(step_fn: Callable, state: TrainState, batches) -> dict[str, float]:
    """Top-1 error (%) and mean loss over a full pass of `batches`."""
    totals = None
    for batch in batches:
        out = step_fn(state, batch)
        totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    totals = jax.device_get(totals)
    count = float(totals["count"])
    return {"eval_top1_error": 100.0 * (1.0 - float(totals["correct"]) / count), "eval_loss": float(totals["loss"]) / count}


# --- the loop ---------------------------------------------------------------------------------------------------

class _MetricsLog:
    """`metrics.jsonl` in the run directory; on resume, lines past the restored step are dropped."""

    def __init__(self, path: Path, resume_step: int, enabled: bool):
        self.path, self.enabled = path, enabled
        kept = [r for r in read_metrics(path) if r["step"] <= resume_step] if path.exists() else []
        self.wall_offset = max((r.get("wall_time", 0.0) for r in kept), default=0.0)
        if enabled:
            path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def read_metrics(path: Path | str) -> list[dict]:
    """The JSON lines of a `metrics.jsonl`."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _check_config(run_dir: Path, config: ml_collections.ConfigDict, write: bool) -> None:
    """Writes `config.json`, or refuses to resume a run directory that holds a different configuration."""
    path = run_dir / "config.json"
    new = json.loads(config.to_json_best_effort())
    if path.exists():
        old = json.loads(path.read_text())
        placement = ("mesh", "parallel")  # where the run executes, not what it computes: free to change on resume
        if {k: v for k, v in old.items() if k not in placement} != {k: v for k, v in new.items() if k not in placement}:
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise ValueError(f"{run_dir} holds a run with a different config (top-level keys differing: {diff}). "
                             f"Resume it with the same config, or pass a new --workdir; nothing was changed.")
    if write:
        path.write_text(json.dumps(new, indent=2, sort_keys=True))


class _StopFlag:
    """Set by SIGTERM (preemption): the loop saves a checkpoint and returns."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no signal handling
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        return False


def _mean_metrics(pending: list[tuple[int, dict]]) -> dict[str, float]:
    """Host copies of the pending step metrics, checked for NaN/Inf, averaged."""
    host = jax.device_get([m for _, m in pending])
    for (step, _), m in zip(pending, host):
        bad = {k: float(v) for k, v in m.items() if not np.isfinite(v)}
        if bad:
            raise FloatingPointError(
                f"non-finite training metrics {bad} at step {step + 1}. The run stopped; the last good checkpoint "
                f"is kept. Lower optim.learning_rate, add warmup (optim.warmup_epochs) or check the data.")
    return {k: float(np.mean([m[k] for m in host])) for k in host[0]}


def _init_from_torch(state: TrainState, tx: optax.GradientTransformation, config: ml_collections.ConfigDict,
                     num_classes: int) -> TrainState:
    """Parameters and BN statistics from a PyTorch checkpoint (classifier replaced when the classes differ)."""
    from gconv.convert import load_torch_weights

    overrides = {k: v for k, v in config.model.items() if k not in ("name", "dtype")}
    variables = load_torch_weights(config.model.name, config.init_from, num_classes=num_classes, seed=config.seed,
                                   **overrides)
    return state.replace(params=variables["params"], batch_stats=variables["batch_stats"],
                         opt_state=tx.init(variables["params"]))


def _place(batch: dict, mesh) -> dict:
    """This process's rows of a global host batch, as arrays split over the mesh's `data` axis."""
    per_process = len(batch["label"]) // jax.process_count()
    start = jax.process_index() * per_process
    return parallel.shard_batch(jax.tree.map(lambda x: x[start:start + per_process], batch), mesh)


def _effective_name(name: str, model: nn.Module) -> str:
    """The registry name with overridden cardinality/width folded in (`resnext11_1x16d` with C=4, d=6 ->
    `resnext11_4x6d`)."""
    if hasattr(model, "cardinality"):
        return re.sub(r"_\d+x\d+d$", f"_{model.cardinality}x{model.base_width}d", name)
    if hasattr(model, "groups"):
        name = re.sub(r"_g\d+_", f"_g{model.groups}_", name)
        return name if model.shuffle else name + "_noshuffle"
    return name


def preflight(config: ml_collections.ConfigDict) -> None:
    """Checks what can be checked before any work: the model name and overrides, the mesh against the devices and
    batch sizes, and that the groups split over `mesh.model`. Raises `ValueError` naming the fix."""
    mesh = parallel.make_mesh(config.mesh)
    parallel.check_batch_divides(config.data.batch_size, mesh)
    parallel.check_batch_divides(config.data.eval_batch_size, mesh)
    model = build_model(config, 10)
    model_size = mesh.shape[parallel.MODEL]
    if config.parallel not in ("shard_map", "pmap") or (config.parallel == "pmap" and model_size > 1):
        raise ValueError(f"parallel={config.parallel!r} with mesh.model={model_size}: use 'shard_map' "
                         f"('pmap' runs data parallel only, mesh.model=1).")
    if model_size > 1:
        parallel.group_parallel_rules(model)
        groups = getattr(model, "cardinality", None) or getattr(model, "groups", 1)
        if groups % model_size:
            raise ValueError(f"{_effective_name(config.model.name, model)} has {groups} group(s), not divisible by "
                             f"mesh.model={model_size}: group parallelism splits whole groups; run the points whose "
                             f"groups divide {model_size} (--point), or use --config.mesh.model=1.")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any] | None:
    """Trains and evaluates one configuration in `workdir`; returns the run summary (also `summary.json`), or None
    when stopped by SIGTERM after saving a checkpoint."""
    preflight(config)
    run_dir = Path(workdir)
    is_main = jax.process_index() == 0
    run_dir.mkdir(parents=True, exist_ok=True)
    _check_config(run_dir, config, write=is_main)

    # Data.
    train_source, info = data_lib.get_source(config.data, "train")
    eval_source, _ = data_lib.get_source(config.data, "eval")
    batch_size = config.data.batch_size
    steps_per_epoch = max(1, info.num_train // batch_size)
    total_steps = config.num_steps if config.num_steps > 0 else int(config.num_epochs * steps_per_epoch)

    # Devices: one jit-ed step, or a step over the mesh (batch split over `data`, groups over `model`).
    mesh = parallel.make_mesh(config.mesh)
    distributed, model_size = mesh.size > 1, mesh.shape[parallel.MODEL]

    # Model (global for init and counts; per device when groups are split), optimizer, state.
    axis_name = parallel.DATA if distributed else None
    model = build_model(config, info.num_classes, axis_name=axis_name)
    local_model = model if model_size == 1 else build_model(
        config, info.num_classes, axis_name=axis_name, model_axis=parallel.MODEL, model_size=model_size)
    tx, schedule = create_optimizer(config.optim, steps_per_epoch, total_steps)
    state = create_train_state(model, tx, info.image_shape, config.seed)
    manager = ocp.CheckpointManager(
        (run_dir / "checkpoints").absolute(),
        options=ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True))
    resume_step = manager.latest_step()
    if config.init_from and resume_step is None:
        state = _init_from_torch(state, tx, config, info.num_classes)
    specs = P() if model_size == 1 else parallel.partition_specs(state, parallel.group_parallel_rules(model))
    if distributed:
        state = parallel.shard_state(state, mesh, specs)
    if resume_step is not None:  # resume, onto this run's mesh and shardings
        state = manager.restore(resume_step, args=ocp.args.StandardRestore(state))
    start_step = int(state.step)
    log = _MetricsLog(run_dir / "metrics.jsonl", start_step, enabled=is_main)

    step_fn = functools.partial(train_step, model=local_model, tx=tx, schedule=schedule,
                                label_smoothing=config.optim.label_smoothing)
    eval_fn = functools.partial(eval_step, model=local_model)
    if not distributed:
        p_train, p_eval, place = jax.jit(step_fn, donate_argnums=0), jax.jit(eval_fn), lambda b: b
    elif config.parallel == "pmap":
        p_train, p_eval, place = parallel.pmap_data_parallel(step_fn), jax.jit(eval_fn), lambda b: b
    else:
        p_train = parallel.shard_step(step_fn, mesh, specs)
        p_eval = parallel.shard_step(eval_fn, mesh, specs, returns_state=False, donate=False)
        place = functools.partial(_place, mesh=mesh)
    batches = map(place, data_lib.train_batches(train_source, info, batch_size, seed=config.seed,
                                                start_step=start_step, augment=config.data.augment))

    def run_eval(step: int) -> dict:
        eval_batches = data_lib.eval_batches(eval_source, info, config.data.eval_batch_size)
        metrics = evaluate(p_eval, state, map(place, eval_batches))
        log.write({"step": step, **metrics})
        return metrics

    # Train.
    pending: list[tuple[int, dict]] = []
    t_session, t_interval, throughput = time.time(), time.time(), []
    bar = tqdm(total=total_steps, initial=start_step, disable=not (is_main and sys.stderr.isatty()),
               desc=run_dir.name, unit="step", dynamic_ncols=True)
    with _StopFlag() as stop:
        for step in range(start_step, total_steps):
            state, metrics = p_train(state, next(batches))
            pending.append((step, metrics))
            done = step + 1
            stopping = stop.requested  # read once: a SIGTERM landing mid-iteration is handled at the next step
            is_log = done % config.log_every_steps == 0 or done == total_steps
            is_ckpt = done % config.checkpoint_every_steps == 0 or done == total_steps or stopping
            if is_log or is_ckpt:
                train_metrics = _mean_metrics(pending)  # raises on NaN/Inf before anything is saved
                now = time.time()
                img_per_sec = len(pending) * batch_size / (now - t_interval)
                if done - len(pending) > start_step:  # the first interval includes compilation
                    throughput.append(img_per_sec)
                pending, t_interval = [], now
                record = {"step": done, **{f"train_{k}": v for k, v in train_metrics.items()},
                          "img_per_sec": img_per_sec, "wall_time": log.wall_offset + now - t_session}
                log.write(record)
                bar.set_postfix(loss=f"{train_metrics['loss']:.4f}", img_s=f"{img_per_sec:,.0f}")
            if done % config.eval_every_steps == 0 or done == total_steps:
                metrics = run_eval(done)
                if not bar.disable:
                    bar.write(f"{run_dir.name} step {done}: top-1 error {metrics['eval_top1_error']:.2f}%")
                elif is_main:
                    print(f"{run_dir.name} step {done}/{total_steps}: top-1 error {metrics['eval_top1_error']:.2f}%",
                          flush=True)
            if is_ckpt:
                manager.save(done, args=ocp.args.StandardSave(state))
            bar.update(1)
            if stopping:
                manager.wait_until_finished()
                bar.close()
                print(f"SIGTERM: saved checkpoint at step {done} in {run_dir}; relaunch to resume.", flush=True)
                return None
    manager.wait_until_finished()
    bar.close()

    # Summary.
    history = read_metrics(run_dir / "metrics.jsonl") if is_main else []
    evals = [r for r in history if "eval_top1_error" in r]
    wall = max((r.get("wall_time", 0.0) for r in history), default=0.0)
    summary = {
        "name": run_dir.name, "model": _effective_name(config.model.name, model), "steps": total_steps,
        **{field: getattr(model, field, None)
           for field in ("cardinality", "base_width", "groups", "width_multiplier", "shuffle")},
        "params": count_params(state.params), "mflops": count_flops(model, info.image_shape) / 1e6,
        "final_top1_error": evals[-1]["eval_top1_error"] if evals else math.nan,
        "best_top1_error": min((r["eval_top1_error"] for r in evals), default=math.nan),
        "img_per_sec": float(np.median(throughput)) if throughput else math.nan,
        "wall_time": wall, "paper_top1_error": config.get("paper_top1_error"),
    }
    if is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
