"""Training and evaluation: small pure functions, and the loop that ties them to data, checkpoints and logs.

`train_and_evaluate(config, workdir)` trains one configuration in a run directory (local or `gs://`, see
`gconv.rundir`). Relaunched on the same workdir it resumes from the newest readable checkpoint (step, params, batch
stats, optimizer state, RNG; the data position is the step; the metrics of the unlogged steps since the last log
line in `pending.json`) and ends with exactly the metrics of an uninterrupted run, after SIGKILL, SIGTERM or SIGINT.
"""
from __future__ import annotations

import contextlib
import functools
import json
import re
import signal
import sys
import time
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
from gconv import parallel, rundir
from gconv.complexity import count_flops, count_params
from gconv.models import create_model

__all__ = ["TrainState", "build_model", "create_optimizer", "create_train_state", "train_step", "eval_step",
           "evaluate", "train_and_evaluate", "read_metrics", "run_name", "Stopped"]


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


_INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 1}


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, image_shape: tuple[int, ...],
                       seed: int) -> TrainState:
    """Initialises parameters and BN statistics from `seed` on a `(1, *image_shape)` input."""
    init_rng, rng = jax.random.split(jax.random.PRNGKey(seed))
    init = jax.jit(model.init).lower(init_rng, jnp.zeros((1,) + tuple(image_shape), jnp.float32))
    # Runs once: on the CPU, LLVM's -O1 halves the compile time of the unrolled random-number kernels and gives
    # the same values bit for bit (tests/test_train.py checks it).
    variables = init.compile(_INIT_COMPILER_OPTIONS if jax.default_backend() == "cpu" else None)(
        init_rng, jnp.zeros((1,) + tuple(image_shape), jnp.float32))
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

class Stopped(Exception):
    """Raised after a checkpoint was saved because of SIGTERM (preemption) or SIGINT; relaunch to resume."""

    def __init__(self, signum: int, step: int, run_dir: Any):
        self.signum, self.step = signum, step
        super().__init__(f"{signal.Signals(signum).name}: saved checkpoint at step {step} in {run_dir}; "
                         f"relaunch to resume.")


def read_metrics(path: Any) -> list[dict]:
    """The records of a `metrics.jsonl` (a torn last line is dropped with a warning)."""
    return rundir.read_jsonl(rundir.as_path(path))


_PLACEMENT = ("mesh", "parallel")  # where a run executes, not what it computes: free to change on resume


def _what(config_json: dict) -> dict:
    """A config without the keys that do not change results (input threads)."""
    data = {k: v for k, v in config_json.get("data", {}).items() if k != "num_workers"}
    return {**config_json, "data": data}


def _check_config(run_dir: Any, config: ml_collections.ConfigDict) -> dict:
    """The config as JSON; refuses a run directory whose training was done with a different configuration. A
    `config.json` left by a start that trained nothing (no checkpoint, no metrics) does not block."""
    new = json.loads(config.to_json_best_effort())
    path = run_dir / "config.json"
    if path.exists():
        old = rundir.read_json(path)
        differing = sorted(k for k in set(old) | set(new) if k not in _PLACEMENT and
                           _what(old).get(k) != _what(new).get(k))
        trained = rundir.readable_checkpoint_steps(run_dir / "checkpoints") or (run_dir / "metrics.jsonl").exists()
        if differing and trained:
            raise ValueError(f"{run_dir} holds a run with a different config (top-level keys differing: {differing}). "
                             f"Resume it with the same config, or pass a new --workdir; nothing was changed.")
    return new


class _StopFlag:
    """Set by SIGTERM (preemption) or SIGINT: the loop saves a checkpoint and stops. A second SIGINT interrupts.

    In a multi-process run SIGTERM is left to JAX's preemption service: whichever process receives it, every process
    reaches the same sync step (`multihost_utils.reached_preemption_sync_point`, polled every step), saves it and
    stops. SIGINT there keeps its default (it reaches one process only, and saving is collective).
    """

    def __init__(self, multiprocess: bool = False):
        self.signum, self.multiprocess = None, multiprocess
        self._previous = {}

    def __enter__(self):
        for sig in () if self.multiprocess else (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no signal handling
                pass
        return self

    def _handle(self, signum, frame):
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def poll(self, step: int) -> int | None:
        """The signal to stop for after training step `step` (every process calls it at every step), or None."""
        if self.multiprocess and self.signum is None:
            from jax.experimental import multihost_utils

            if multihost_utils.reached_preemption_sync_point(step):
                self.signum = signal.SIGTERM
        return self.signum

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        return False


def _host_metrics(pending: list[tuple[int, dict]]) -> list[tuple[int, dict]]:
    """Host copies of the pending step metrics, checked for NaN/Inf."""
    host = jax.device_get([m for _, m in pending])
    for (step, _), m in zip(pending, host):
        bad = {k: float(v) for k, v in m.items() if not np.isfinite(v)}
        if bad:
            raise FloatingPointError(
                f"non-finite training metrics {bad} at step {step + 1}. The run stopped; the last good checkpoint "
                f"is kept. Lower optim.learning_rate, add warmup (optim.warmup_epochs) or check the data.")
    return [(step, {k: float(v) for k, v in m.items()}) for (step, _), m in zip(pending, host)]


def _init_from_torch(state: TrainState, tx: optax.GradientTransformation, config: ml_collections.ConfigDict,
                     num_classes: int) -> TrainState:
    """Parameters and BN statistics from a PyTorch checkpoint (classifier replaced when the classes differ)."""
    from gconv.convert import load_torch_weights

    overrides = {k: v for k, v in config.model.items() if k not in ("name", "dtype")}
    variables = load_torch_weights(config.model.name, config.init_from, num_classes=num_classes, seed=config.seed,
                                   **overrides)
    return state.replace(params=variables["params"], batch_stats=variables["batch_stats"],
                         opt_state=tx.init(variables["params"]))


def _input_shard(mesh) -> dict:
    """`{shard_index, shard_count}` of this process's rows of each global batch: the block of the mesh's `data` axis
    that its devices hold (all of it when the `model` axis, not `data`, spans the processes)."""
    mine = sorted({i for i, row in enumerate(mesh.devices) for d in row if d.process_index == jax.process_index()})
    if not mine or mine != list(range(mine[0], mine[0] + len(mine))) or mine[0] % len(mine):
        raise ValueError(f"process {jax.process_index()} holds the data-axis positions {mine} of the mesh: each "
                         f"process must hold one aligned block of it (order devices by process).")
    return {"shard_index": mine[0] // len(mine), "shard_count": mesh.shape[parallel.DATA] // len(mine)}


def _place(batch: dict, mesh) -> dict:
    """This process's rows of a global host batch (evaluation), as arrays split over the mesh's `data` axis."""
    shard = _input_shard(mesh)
    rows = len(batch["label"]) // shard["shard_count"]
    start = shard["shard_index"] * rows
    return parallel.shard_batch(jax.tree.map(lambda x: x[start:start + rows], batch), mesh)


def run_name(config: ml_collections.ConfigDict, model: nn.Module) -> str:
    """The registry name with overridden cardinality/width folded in (`resnext11_1x16d` with C=4, d=6 ->
    `resnext11_4x6d`)."""
    name = config.model.name
    if hasattr(model, "cardinality"):
        return re.sub(r"_\d+x\d+d$", f"_{model.cardinality}x{model.base_width}d", name)
    if hasattr(model, "groups"):
        name = re.sub(r"_g\d+_", f"_g{model.groups}_", name)
        return name if model.shuffle else name + "_noshuffle"
    return name


def preflight(config: ml_collections.ConfigDict) -> None:
    """See `gconv.preflight.preflight`."""
    from gconv.preflight import preflight as check

    check(config)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: Any) -> dict[str, Any]:
    """Trains and evaluates one configuration in `workdir` (a local path or a URL such as `gs://bucket/run`);
    returns the run summary (also `summary.json`). Raises `Stopped` after saving a checkpoint on SIGTERM/SIGINT.

    Nothing is written before `preflight` passes; the run directory is locked while the run is in it.
    """
    preflight(config)
    run_dir = rundir.as_path(workdir)
    is_main = jax.process_index() == 0
    config_json = _check_config(run_dir, config)
    with rundir.RunLock(run_dir) if is_main else contextlib.nullcontext() as lock:
        return _train(config, config_json, run_dir, lock)


def _train(config: ml_collections.ConfigDict, config_json: dict, run_dir: Any,
           lock: rundir.RunLock | None) -> dict[str, Any]:
    is_main = lock is not None
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
    ckpt_dir = run_dir / "checkpoints"
    steps = rundir.readable_checkpoint_steps(ckpt_dir)
    if config.init_from and not steps:
        state = _init_from_torch(state, tx, config, info.num_classes)
    specs = P() if model_size == 1 else parallel.partition_specs(state, parallel.group_parallel_rules(model))
    if distributed:
        state = parallel.shard_state(state, mesh, specs)
    checkpointer = ocp.StandardCheckpointer()
    resume_step, restored = rundir.restore_newest_readable(  # onto this run's mesh and shardings
        ckpt_dir, lambda s: checkpointer.restore(ckpt_dir / str(s) / "default", state), steps, set_aside=is_main)
    state = restored if resume_step is not None else state
    start_step = int(state.step)
    if is_main:  # the config is good and the state is built: from here on the directory holds this run
        rundir.write_json(run_dir / "config.json", config_json)
    summary_path = run_dir / "summary.json"
    if start_step >= total_steps and summary_path.exists():
        print(f"{run_dir.name}: already trained to step {start_step}; its summary is kept.", flush=True)
        return rundir.read_json(summary_path)
    if is_main and resume_step is not None:
        print(f"{run_dir.name}: resuming at step {start_step} from {ckpt_dir / str(resume_step)}", flush=True)
    manager = ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(
        max_to_keep=config.keep_checkpoints, create=True))
    log = rundir.MetricsLog(run_dir / "metrics.jsonl", start_step, enabled=is_main)
    pending_path = run_dir / "pending.json"
    saved = rundir.read_json(pending_path) if pending_path.exists() else {}
    pending: list[tuple[int, dict]] = [tuple(p) for p in saved.get("metrics", [])] if saved.get(
        "step") == start_step else []  # the unlogged steps before the checkpoint: the next log line covers them

    step_fn = functools.partial(train_step, model=local_model, tx=tx, schedule=schedule,
                                label_smoothing=config.optim.label_smoothing)
    eval_fn = functools.partial(eval_step, model=local_model)
    if not distributed:
        train_fn, eval_fn, place = jax.jit(step_fn, donate_argnums=0), jax.jit(eval_fn), lambda b: b
    elif config.parallel == "pmap":
        train_fn, eval_fn, place = parallel.pmap_data_parallel(step_fn), jax.jit(eval_fn), lambda b: b
    else:
        train_fn = parallel.shard_step(step_fn, mesh, specs)
        eval_fn = parallel.shard_step(eval_fn, mesh, specs, returns_state=False, donate=False)
        place = functools.partial(_place, mesh=mesh)
    train_place = (lambda b: parallel.shard_batch(b, mesh)) if distributed and config.parallel != "pmap" else place
    batches = map(train_place, data_lib.train_batches(  # this process's rows only
        train_source, info, batch_size, seed=config.seed, start_step=start_step, augment=config.data.augment,
        num_workers=config.data.num_workers, **_input_shard(mesh)))

    def run_eval(step: int) -> dict:
        eval_batches = data_lib.eval_batches(eval_source, info, config.data.eval_batch_size,
                                             config.data.num_workers)
        metrics = evaluate(eval_fn, state, map(place, eval_batches))
        log.write({"step": step, **metrics})
        return metrics

    def save(step: int) -> None:
        manager.save(step, args=ocp.args.StandardSave(state))
        if is_main:
            rundir.write_json(pending_path, {"step": step, "metrics": [list(p) for p in pending]})

    # Train.
    t_session = t_interval = time.time()
    interval_steps, first_interval, throughput = 0, True, []
    bar = tqdm(total=total_steps, initial=start_step, disable=not (is_main and sys.stderr.isatty()),
               desc=run_dir.name, unit="step", dynamic_ncols=True)
    with _StopFlag(multiprocess=jax.process_count() > 1) as stop:
        for step in range(start_step, total_steps):
            state, metrics = train_fn(state, next(batches))
            pending.append((step, metrics))
            if lock is not None:
                lock.beat()
            interval_steps += 1
            done = step + 1
            stopping = stop.poll(done)  # read once: a signal landing mid-iteration is handled at the next step
            is_log = done % config.log_every_steps == 0 or done == total_steps
            is_ckpt = done % config.checkpoint_every_steps == 0 or done == total_steps or stopping
            if is_log or is_ckpt:
                pending = _host_metrics(pending)  # raises on NaN/Inf before anything is saved
            if is_log:
                now = time.time()
                img_per_sec = interval_steps * batch_size / (now - t_interval)
                if not first_interval:  # the first interval of a session includes compilation
                    throughput.append(img_per_sec)
                train_metrics = {k: float(np.mean([m[k] for _, m in pending])) for k in pending[0][1]}
                pending, t_interval, interval_steps, first_interval = [], now, 0, False
                log.write({"step": done, **{f"train_{k}": v for k, v in train_metrics.items()},
                           "img_per_sec": img_per_sec, "wall_time": log.wall_offset + now - t_session})
                bar.set_postfix(loss=f"{train_metrics['loss']:.4f}", img_s=f"{img_per_sec:,.0f}")
            if done % config.eval_every_steps == 0 or done == total_steps:
                metrics = run_eval(done)
                if not bar.disable:
                    bar.write(f"{run_dir.name} step {done}: top-1 error {metrics['eval_top1_error']:.2f}%")
                elif is_main:
                    print(f"{run_dir.name} step {done}/{total_steps}: top-1 error {metrics['eval_top1_error']:.2f}%",
                          flush=True)
            if is_ckpt:
                save(done)
            bar.update(1)
            if stopping:
                manager.wait_until_finished()
                bar.close()
                raise Stopped(stopping, done, run_dir)
    manager.wait_until_finished()
    bar.close()

    # Summary.
    history = log.records
    evals = [r for r in history if "eval_top1_error" in r]
    wall = max((r.get("wall_time") or 0.0 for r in history), default=0.0)
    previous = rundir.read_json(summary_path) if summary_path.exists() else {}
    summary = {
        "name": run_dir.name, "model": run_name(config, model), "steps": total_steps,
        **{field: getattr(model, field, None)
           for field in ("cardinality", "base_width", "groups", "width_multiplier", "shuffle")},
        "params": count_params(state.params), "mflops": count_flops(model, info.image_shape) / 1e6,
        "final_top1_error": evals[-1]["eval_top1_error"] if evals else None,
        "best_top1_error": min((r["eval_top1_error"] for r in evals), default=None),
        "img_per_sec": float(np.median(throughput)) if throughput else previous.get("img_per_sec"),
        "wall_time": wall, "paper_top1_error": config.get("paper_top1_error"),
    }
    if is_main:
        rundir.write_json(summary_path, summary)
    return summary
