"""Training and evaluation: the pure steps, and the loop that ties them to data, checkpoints and logs.

`train_and_evaluate(config, workdir)` trains one configuration in a run directory (local or `gs://`, see
`gconv.storage`). Relaunched on the same workdir it resumes from the newest readable checkpoint (step, params, batch
stats, optimizer state, RNG; the data position is the step; the metrics of the unlogged steps since the last log
line in `pending.json`) and ends with exactly the metrics of an uninterrupted run, after SIGKILL, SIGTERM or SIGINT.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import json
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

from gconv import data as data_lib
from gconv import autotune, checkpoints, metrics_log, parallel, precise_bn, runlock, storage, watchdog
from gconv.config import check_config
from gconv.convert import load_torch_weights_for
from gconv.models import model_from_config
from gconv.optim import create_optimizer
from gconv.preemption import StopFlag, Stopped
from gconv.preflight import preflight
from gconv.progress import Progress, StepProfiler
from gconv.summary import run_summary

__all__ = ["TrainState", "create_optimizer", "create_train_state", "train_step", "eval_step", "evaluate",
           "train_and_evaluate", "Stopped"]


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array  # raw uint32 key, so checkpoints stay plain arrays


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

    dropout_rng = jax.random.fold_in(state.rng, state.step)  # dropout's masks: a function of (seed, step, device)
    if axis_name is not None:
        dropout_rng = jax.random.fold_in(dropout_rng, jax.lax.axis_index(axis_name))

    def loss_fn(params):
        logits, updates = model.apply({"params": params, "batch_stats": state.batch_stats}, batch["image"],
                                      train=True, mutable=["batch_stats"], rngs={"dropout": dropout_rng})
        loss = jnp.mean(_cross_entropy(logits, batch["label"], label_smoothing))
        return loss, (logits, updates["batch_stats"])

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    if axis_name is not None:
        grads, loss, accuracy = jax.lax.pmean((grads, loss, accuracy), axis_name)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "accuracy": accuracy, "grad_norm": optax.tree.norm(grads),
               "lr": schedule(state.step)}
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state,
                              rng=jax.random.fold_in(state.rng, state.step))
    return new_state, metrics


def eval_step(state: TrainState, batch: dict, *, model: nn.Module, axis_name: str | None = None) -> dict:
    """Sums over the real (mask=True) examples: `correct` (top-1), `correct5` (top-5), `loss`, `count` (over
    `axis_name` too, when set)."""
    logits = model.apply({"params": state.params, "batch_stats": state.batch_stats}, batch["image"], train=False)
    mask = batch["mask"].astype(jnp.float32)
    top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
    sums = {"correct": jnp.sum((jnp.argmax(logits, -1) == batch["label"]) * mask),
            "correct5": jnp.sum(jnp.any(top5 == batch["label"][:, None], axis=-1) * mask),
            "loss": jnp.sum(_cross_entropy(logits, batch["label"], 0.0) * mask), "count": jnp.sum(mask)}
    return jax.lax.psum(sums, axis_name) if axis_name is not None else sums


def evaluate(step_fn: Callable, state: TrainState, batches) -> dict[str, float]:
    """Top-1 and top-5 error (%) and mean loss over a full pass of `batches`."""
    totals = None
    for batch in batches:
        out = step_fn(state, batch)
        totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    totals = {k: float(v) for k, v in jax.device_get(totals).items()}
    return {"eval_top1_error": 100.0 * (1.0 - totals["correct"] / totals["count"]),
            "eval_top5_error": 100.0 * (1.0 - totals["correct5"] / totals["count"]),
            "eval_loss": totals["loss"] / totals["count"]}


# --- the loop ---------------------------------------------------------------------------------------------------

def train_and_evaluate(config: ml_collections.ConfigDict, workdir: Any) -> dict[str, Any]:
    """Trains and evaluates one configuration in `workdir` (a local path or a URL such as `gs://bucket/run`);
    returns the run summary (also `summary.json`). Raises `Stopped` after saving a checkpoint on SIGTERM/SIGINT.

    Nothing is written before `preflight` passes; the run directory is locked while the run is in it. A storage
    operation that waits longer than `config.storage_timeout_s` ends the process (`gconv.watchdog`).
    """
    preflight(config)
    watchdog.set_limit(config.get("storage_timeout_s", watchdog.DEFAULT_LIMIT))
    run_dir = storage.as_path(workdir)
    if storage.is_remote(run_dir):
        storage.check_credentials(str(workdir).split("://")[0])
    config_json = json.loads(config.to_json_best_effort())
    check_config(run_dir, config_json)
    with runlock.RunLock(run_dir) if jax.process_index() == 0 else contextlib.nullcontext() as lock:
        return _train(config, config_json, run_dir, lock)


def _train(config: ml_collections.ConfigDict, config_json: dict, run_dir: Any,
           lock: runlock.RunLock | None) -> dict[str, Any]:
    is_main = lock is not None
    # Data.
    train_source, info = data_lib.get_source(config.data, "train")
    eval_source, _ = data_lib.get_source(config.data, "eval")
    batch_size = config.data.batch_size
    steps_per_epoch = max(1, info.num_train // batch_size)
    total_steps = config.num_steps if config.num_steps > 0 else int(config.num_epochs * steps_per_epoch)

    # Model (whole for init and counts; this device's groups in the step when the mesh splits them) and state.
    mesh = parallel.make_mesh(config.mesh)
    axis_name = parallel.DATA if mesh.size > 1 else None
    model = model_from_config(config.model, info.num_classes, axis_name=axis_name)
    split = parallel.split_of(mesh)
    local_model = model.clone(group_split=split) if split.active else model
    tx, schedule = create_optimizer(config.optim, steps_per_epoch, total_steps)
    state = create_train_state(model, tx, info.image_shape, config.seed)
    ckpt_dir = run_dir / "checkpoints"
    steps = checkpoints.readable_checkpoint_steps(ckpt_dir)
    if config.init_from and not steps:  # parameters and BN statistics from a PyTorch checkpoint
        variables = load_torch_weights_for(config, info.num_classes)
        state = state.replace(**variables, opt_state=tx.init(variables["params"]))
    specs = parallel.partition_specs(state, parallel.group_parallel_rules(model)) if split.active else P()
    if mesh.size > 1:
        state = parallel.shard_state(state, mesh, specs)
    checkpointer = ocp.StandardCheckpointer()
    resume_step, restored = checkpoints.restore_newest_readable(  # onto this run's mesh and shardings
        ckpt_dir, lambda s: checkpointer.restore(ckpt_dir / str(s) / "default", state), steps, set_aside=is_main)
    state = restored if resume_step is not None else state
    start_step = int(state.step)
    if is_main:  # the config is good and the state is built: from here on the directory holds this run
        storage.write_json(run_dir / "config.json", config_json)
    summary_path = run_dir / "summary.json"
    if start_step >= total_steps and storage.exists(summary_path):
        print(f"{run_dir.name}: already trained to step {start_step}; its summary is kept.", flush=True)
        return storage.read_json(summary_path)
    if is_main and resume_step is not None:
        print(f"{run_dir.name}: resuming at step {start_step} from {ckpt_dir / str(resume_step)}", flush=True)
    with watchdog.watch("open checkpoints", ckpt_dir):
        manager = ocp.CheckpointManager(ckpt_dir, options=checkpoints.checkpoint_options(config.keep_checkpoints))
    log = metrics_log.MetricsLog(run_dir / "metrics.jsonl", start_step, enabled=is_main)  # and TensorBoard events
    pending = metrics_log.PendingMetrics(run_dir, start_step, enabled=is_main)

    # Steps on the mesh, and this process's rows of the input from the resumed position.
    train_fn, eval_fn, place_train, place_eval = parallel.compile_steps(
        functools.partial(train_step, model=local_model, tx=tx, schedule=schedule,
                          label_smoothing=config.optim.label_smoothing),
        functools.partial(eval_step, model=local_model), mesh, specs, config.parallel)
    batches = map(place_train, data_lib.train_batches(
        train_source, info, batch_size, seed=config.seed, start_step=start_step, augment=config.data.augment,
        num_workers=config.data.num_workers, **parallel.input_shard(mesh)))

    # The lowerings the run's programs compile with: a resumed run's own, recorded in `lowerings.json`.
    lowerings = run_dir / "lowerings.json"
    given = storage.read_json(lowerings) if resume_step is not None and storage.exists(lowerings) else {}
    recorded = dict(given)
    lowering_scope = contextlib.ExitStack()  # closed by the loop's `finally`
    lowering_scope.enter_context(autotune.use(given))
    used = lowering_scope.enter_context(autotune.recording())

    # Train.
    t_session = t_interval = time.time()
    interval_steps, throughput = 0, []
    progress = Progress(run_dir.name, start_step, total_steps, enabled=is_main)
    profiler = StepProfiler(config.get("profile_steps", ""), run_dir / "profile" / (  # one trace per process
        f"process{jax.process_index()}" if jax.process_count() > 1 else ""))
    try:
        with StopFlag(multiprocess=jax.process_count() > 1) as stop:
            for step in range(start_step, total_steps):
                profiler.before(step + 1)
                state, metrics = train_fn(state, next(batches))
                profiler.after(step + 1, state)
                pending.steps.append((step, metrics))
                if lock is not None:
                    lock.beat()
                interval_steps += 1
                done = step + 1
                stopping = stop.poll(done)  # read once: a signal landing mid-iteration is handled at the next step
                is_log = done % config.log_every_steps == 0 or done == total_steps
                is_eval = done % config.eval_every_steps == 0 or done == total_steps  # saved too: may be the best
                is_ckpt = is_eval or done % config.checkpoint_every_steps == 0 or stopping
                if is_log or is_ckpt:
                    pending.fetch()  # raises on NaN/Inf before anything is saved
                if is_log:
                    now = time.time()
                    img_per_sec = interval_steps * batch_size / (now - t_interval)
                    if interval_steps < done - start_step:  # the first interval of a session includes compilation
                        throughput.append(img_per_sec)
                    means = {k: float(np.mean([m[k] for _, m in pending.steps])) for k in pending.steps[0][1]}
                    pending.steps, t_interval, interval_steps = [], now, 0
                    log.write({"step": done, **{f"train_{k}": v for k, v in means.items()},
                               "img_per_sec": img_per_sec, "wall_time": log.wall_offset + now - t_session})
                progress.update(done, batch_size, **({"loss": f"{means['loss']:.4f}", "img_s": f"{img_per_sec:,.0f}"}
                                                     if is_log else {}))
                if is_eval:
                    if config.get("precise_bn_images", 0) > 0:  # BN statistics over a fixed set of training images
                        state = state.replace(batch_stats=precise_bn.precise_batch_stats(
                            model, state.params, state.batch_stats, map(place_train, itertools.islice(
                                data_lib.train_batches(train_source, info, batch_size, seed=config.seed,
                                                       augment=config.data.augment, num_workers=config.data.num_workers,
                                                       **parallel.input_shard(mesh)),
                                -(-config.precise_bn_images // batch_size)))))
                    eval_batches = data_lib.eval_batches(eval_source, info, config.data.eval_batch_size,
                                                         config.data.num_workers)
                    scores = evaluate(eval_fn, state, map(place_eval, eval_batches))
                    log.write({"step": done, **scores})
                    progress.note(f"step {done}/{total_steps}: top-1 error {scores['eval_top1_error']:.2f}%")
                if is_ckpt:
                    with watchdog.watch("save checkpoint", ckpt_dir / str(done)):  # waits for the previous save
                        manager.save(done, args=ocp.args.StandardSave(state),
                                     metrics={"eval_top1_error": scores["eval_top1_error"]} if is_eval else None)
                    pending.save(done)
                    if is_main and used != recorded:  # the step (and eval) compiled: their lowerings, for resume
                        storage.write_json(lowerings, used)
                        recorded = dict(used)
                if stopping:
                    raise Stopped(stopping, done, run_dir)
    finally:
        lowering_scope.close()
        with watchdog.watch("finish saving checkpoints in", ckpt_dir):
            manager.wait_until_finished()
        progress.close()
        log.close()
        profiler.close()
    summary = run_summary(run_dir, model, config, info.image_shape, state.params, log.records, throughput, total_steps)
    if is_main:
        storage.write_json(summary_path, summary)
    return summary
