"""Training and evaluation: the pure steps, and the loop that ties them to data, checkpoints and logs.

`train_and_evaluate(config, workdir)` trains one configuration in a run directory (local or `gs://`, see
`gconv.storage`). Relaunched on the same workdir it resumes from the newest readable checkpoint (step, params, batch
stats, optimizer state, RNG; the data position is the step; the metrics of the unlogged steps since the last log
line in `pending.json`) and ends with exactly the metrics of an uninterrupted run, after SIGKILL, SIGTERM or SIGINT.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import json
import time
from typing import Any, Callable, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P

from gconv import data as data_lib
from gconv import autotune, checkpoints, members, metrics_log, parallel, precise_bn, runlock, storage, watchdog
from gconv.config import check_config
from gconv.convert import load_torch_weights_for
from gconv.models import model_from_config
from gconv.ops.manual_axes import varying
from gconv.optim import create_optimizer
from gconv.preemption import StopFlag, Stopped
from gconv.preflight import preflight
from gconv.progress import Progress, StepProfiler
from gconv.summary import run_summary

__all__ = ["TrainState", "create_optimizer", "create_train_state", "abstract_train_state", "train_step", "eval_step",
           "evaluate", "train_and_evaluate", "train_members", "Stopped"]


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array  # raw uint32 key, so checkpoints stay plain arrays


_INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 1}


def _init(model: nn.Module, tx: optax.GradientTransformation, image_shape: tuple[int, ...]) -> Callable:
    def init(seed: jax.Array) -> TrainState:
        init_rng, rng = jax.random.split(jax.random.PRNGKey(seed))
        variables = model.init(init_rng, jnp.zeros((1,) + tuple(image_shape), jnp.float32))
        params = variables["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params), rng=rng)

    return init


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, image_shape: tuple[int, ...],
                       seed: int | Sequence[int], shardings: Any = None) -> TrainState:
    """Parameters and BN statistics from `seed` on a `(1, *image_shape)` input. A list of seeds gives the members'
    state (gconv.members): one per seed, stacked on a leading axis, each what its seed alone gives. `shardings`
    (a `Sharding` or a tree of them): where the state is created, each device computing only its share."""
    init = _init(model, tx, image_shape)
    seeds = jnp.asarray(seed, jnp.int32)
    lowered = jax.jit(jax.vmap(init) if seeds.ndim else init, out_shardings=shardings).lower(seeds)
    # Runs once: on the CPU, LLVM's -O1 halves the compile time of the unrolled random-number kernels and gives
    # the same values bit for bit (tests/test_train.py checks it).
    return lowered.compile(_INIT_COMPILER_OPTIONS if jax.default_backend() == "cpu" else None)(seeds)


def abstract_train_state(model: nn.Module, tx: optax.GradientTransformation,
                         image_shape: tuple[int, ...]) -> TrainState:
    """One run's state as shapes and dtypes (`jax.ShapeDtypeStruct`s), without computing it."""
    return jax.eval_shape(_init(model, tx, image_shape), jnp.int32(0))


def _cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float) -> jax.Array:
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def train_step(state: TrainState, batch: dict, *, model: nn.Module, tx: optax.GradientTransformation,
               schedule: Callable, label_smoothing: float = 0.0, axis_name: str | None = None,
               grad_norm: Callable = optax.tree.norm) -> tuple[TrainState, dict]:
    """One SGD step on `batch` (`image: (B, H, W, C)`, `label: (B,)`). Under `shard_map`/`pmap` pass the batch
    axis name: gradients and metrics are averaged over it (BN statistics too, through the model's `axis_name`).
    `grad_norm`: the gradients' L2 norm (group parallel: `parallel.split_norm`, counting every device's shard)."""

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
        grads = _mean_gradients(grads, batch["image"], axis_name)
        loss, accuracy = jax.lax.pmean((loss, accuracy), axis_name)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "accuracy": accuracy, "grad_norm": grad_norm(grads),
               "lr": schedule(state.step)}
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state,
                              rng=jax.random.fold_in(state.rng, state.step))
    return new_state, metrics


def _mean_gradients(grads: Any, local: jax.Array, axis_name: str) -> Any:
    """The mean over `axis_name` of each device's gradient. Under `shard_map` with its replication checks on, a
    parameter replicated over the axis already has the sum of the devices' gradients (the transpose of its
    implicit broadcast is a `psum`), so it is divided by the axis size; one that varies over the axis (and every
    one under `pmap`, where `local`, a per-device input, carries no such type) is averaged with `pmean`."""
    if axis_name not in varying(local):
        return jax.lax.pmean(grads, axis_name)
    size = jax.lax.axis_size(axis_name)
    return jax.tree.map(lambda g: jax.lax.pmean(g, axis_name) if axis_name in varying(g) else g / size, grads)


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


def evaluate(step_fn: Callable, state: TrainState, batches, members: int = 0) -> dict[str, float] | list[dict]:
    """Top-1 and top-5 error (%) and mean loss over a full pass of `batches`; with `members` K > 0 (a members'
    state and step, gconv.members), a list of K such dicts."""
    totals = None
    for batch in batches:
        out = step_fn(state, batch)
        totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    totals = jax.device_get(totals)
    if members:
        return [_scores({k: float(v[i]) for k, v in totals.items()}) for i in range(members)]
    return _scores({k: float(v) for k, v in totals.items()})


def _scores(totals: dict[str, float]) -> dict[str, float]:
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
    return train_members([config], [workdir])[0]


def train_members(configs: Sequence[ml_collections.ConfigDict], workdirs: Sequence[Any],
                  takeover: bool = False) -> list[dict[str, Any]]:
    """Trains K runs that build the same shapes (`gconv.members.group_runs`) as one program, each in its own run
    directory, as `train_and_evaluate` trains one: the K states stacked and the steps `vmap`ped over them (K = 1:
    one run, no member axis). Returns the K summaries. A member whose loss turns non-finite stops (its last good
    checkpoint kept) while the others go on; the first such failure is raised once they have finished.
    `takeover`: take the run directories' locks even from holders that look alive (their host is gone)."""
    for config in configs:
        preflight(config)
    watchdog.set_limit(configs[0].get("storage_timeout_s", watchdog.DEFAULT_LIMIT))
    run_dirs = [storage.as_path(w) for w in workdirs]
    for scheme in sorted({str(w).split("://")[0] for w, d in zip(workdirs, run_dirs) if storage.is_remote(d)}):
        storage.check_credentials(scheme)
    runs = [_Run(config, json.loads(config.to_json_best_effort()), run_dir)
            for config, run_dir in zip(configs, run_dirs)]
    for run in runs:
        check_config(run.run_dir, run.config_json)
    with contextlib.ExitStack() as locks:
        if jax.process_index() == 0:  # the writer: the others train and read
            for run in runs:
                run.lock = runlock.RunLock(run.run_dir).acquire(takeover)
                locks.callback(run.lock.release)
        return _train(runs)


@dataclasses.dataclass
class _Run:
    """One run's side of the loop: its config and directory, and what it writes there."""
    config: ml_collections.ConfigDict
    config_json: dict
    run_dir: Any
    lock: runlock.RunLock | None = None
    log: metrics_log.MetricsLog | None = None
    pending: metrics_log.PendingMetrics | None = None
    manager: Any = None
    failure: str | None = None  # why a member stopped (a non-finite loss)

    @property
    def ckpt_dir(self) -> Any:
        return self.run_dir / "checkpoints"


def _restore(runs: list[_Run], state: TrainState, take: Callable, stack: Callable,
             set_aside: bool) -> tuple[int | None, TrainState]:
    """`(step, state)` from the runs' newest checkpoints: a run's own; for members, the newest step at which every
    member's checkpoint restores (their newer ones, left by a stop in the middle of saving, are removed: the group
    trains those steps again). `(None, state)` when there is none."""
    checkpointer = ocp.StandardCheckpointer()

    def restore(run: _Run, target: Any, limit: int | None) -> tuple[int | None, Any]:
        steps = [s for s in checkpoints.readable_checkpoint_steps(run.ckpt_dir) if limit is None or s <= limit]
        return checkpoints.restore_newest_readable(
            run.ckpt_dir, lambda s: checkpointer.restore(run.ckpt_dir / str(s) / "default", target), steps,
            set_aside=set_aside)

    if len(runs) == 1:
        step, restored = restore(runs[0], state, None)
        return (step, restored) if step is not None else (None, state)
    limit = None
    while True:
        found = [restore(run, take(state, i), limit) for i, run in enumerate(runs)]
        steps = {step for step, _ in found}
        if None in steps:
            limit = -1 if steps != {None} else None
            break
        if len(steps) == 1:
            limit = steps.pop()
            break
        limit = min(steps)
    for run in runs:
        newer = [s for s in checkpoints.readable_checkpoint_steps(run.ckpt_dir) if limit is None or s > limit]
        if newer and set_aside:
            print(f"{run.run_dir.name}: checkpoints {newer} are past the step its group resumes at "
                  f"({limit if limit is not None and limit >= 0 else 0}); removed, the group trains them again.",
                  flush=True)
            for step in newer:
                with watchdog.watch("delete", run.ckpt_dir / str(step)):
                    (run.ckpt_dir / str(step)).rmtree()
    if limit is None or limit < 0:
        return None, state
    return limit, stack(*[restored for _, restored in found])


def _train(runs: list[_Run]) -> list[dict[str, Any]]:
    config, count = runs[0].config, len(runs)  # everything but JOINABLE keys is the same for every member
    joined = count > 1
    is_main = jax.process_index() == 0  # writes config, metrics, checkpoints' side files, summaries
    # Data.
    train_source, info = data_lib.get_source(config.data, "train")
    eval_source, _ = data_lib.get_source(config.data, "eval")
    batch_size = config.data.batch_size
    steps_per_epoch = max(1, info.num_train // batch_size)
    total_steps = config.num_steps if config.num_steps > 0 else int(config.num_epochs * steps_per_epoch)

    # Model (whole for init and counts; this device's groups in the step when the mesh splits them) and state,
    # created where it lives.
    mesh = parallel.make_mesh(config.mesh)
    axis_name = parallel.DATA if mesh.size > 1 else None
    member_axis = parallel.MEMBER if parallel.MEMBER in mesh.axis_names else None
    model = model_from_config(config.model, info.num_classes, axis_name=axis_name)
    split = parallel.split_of(mesh)
    local_model = model.clone(group_split=split) if split.active else model
    optimizers = [create_optimizer(run.config.optim, steps_per_epoch, total_steps) for run in runs]
    tx, schedule = optimizers[0]
    abstract = abstract_train_state(model, tx, info.image_shape)
    specs = parallel.partition_specs(abstract, parallel.group_parallel_rules(model)) if split.active else P()
    one, stacked = None, None  # shardings of one member's state, and of the members' stacked state
    if mesh.size > 1:
        named = lambda tree: jax.tree.map(lambda p: NamedSharding(mesh, p), tree,  # noqa: E731
                                          is_leaf=lambda x: isinstance(x, P))
        one = named(specs)
        stacked = named(parallel.member_specs(specs, mesh))
    seeds = [run.config.seed for run in runs] if joined else config.seed
    state = create_train_state(model, tx, info.image_shape, seeds, stacked if joined else one)
    take = jax.jit(lambda states, i: jax.tree.map(lambda x: x[i], states), out_shardings=one)
    stack = jax.jit(lambda *members: jax.tree.map(lambda *xs: jnp.stack(xs), *members), out_shardings=stacked)
    if config.init_from and not any(checkpoints.readable_checkpoint_steps(run.ckpt_dir) for run in runs):
        variables = load_torch_weights_for(config, info.num_classes)  # parameters and BN statistics, from PyTorch
        loaded = take(state, 0).replace(**variables, opt_state=tx.init(variables["params"])) if joined else \
            state.replace(**variables, opt_state=tx.init(variables["params"]))
        state = stack(*[loaded.replace(rng=take(state, i).rng) for i in range(count)]) if joined else (
            parallel.shard_state(loaded, mesh, specs) if mesh.size > 1 else loaded)
    resume_step, state = _restore(runs, state, take, stack, set_aside=is_main)  # onto this run's mesh and shardings
    start_step = resume_step or 0
    if is_main:  # the config is good and the state is built: from here on the directories hold these runs
        for run in runs:
            storage.write_json(run.run_dir / "config.json", run.config_json)
    if start_step >= total_steps and all(storage.exists(run.run_dir / "summary.json") for run in runs):
        for run in runs:
            print(f"{run.run_dir.name}: already trained to step {start_step}; its summary is kept.", flush=True)
        return [storage.read_json(run.run_dir / "summary.json") for run in runs]
    if is_main and resume_step is not None:
        print(f"{runs[0].run_dir.name}{f' and {count - 1} more member(s)' if joined else ''}: resuming at step "
              f"{start_step} from {runs[0].ckpt_dir / str(resume_step)}", flush=True)
    for i, run in enumerate(runs):
        with watchdog.watch("open checkpoints", run.ckpt_dir):
            run.manager = checkpoints.manager(run.ckpt_dir, config.keep_checkpoints, run.run_dir.name)
        run.log = metrics_log.MetricsLog(run.run_dir / "metrics.jsonl", start_step, enabled=is_main)  # + TensorBoard
        run.pending = metrics_log.PendingMetrics(run.run_dir, start_step, enabled=is_main, lane=i if joined else None)

    # Steps on the mesh, and this process's rows of the input from the resumed position.
    norm = parallel.split_norm(specs.params) if split.active else optax.tree.norm
    if joined:
        train, evaluate_step = (
            functools.partial(members.member_train_step, step=functools.partial(
                train_step, model=local_model, grad_norm=norm), optim=config.optim,
                schedules=[s for _, s in optimizers], hyper=members.hyper_table([r.config for r in runs]),
                member_axis=member_axis, vmap=config.member_vmap),
            functools.partial(members.member_eval_step, step=functools.partial(eval_step, model=local_model),
                              member_axis=member_axis, vmap=config.member_vmap))
    else:
        train, evaluate_step = (
            functools.partial(train_step, model=local_model, tx=tx, schedule=schedule, grad_norm=norm,
                              label_smoothing=config.optim.label_smoothing),
            functools.partial(eval_step, model=local_model))
    train_fn, eval_fn, place_train, place_eval = parallel.compile_steps(train, evaluate_step, mesh, specs,
                                                                        config.parallel, members=joined)

    def member_batches(member_config: ml_collections.ConfigDict, start: int) -> Any:
        return data_lib.train_batches(train_source, info, batch_size, seed=member_config.seed, start_step=start,
                                      augment=config.data.augment, num_workers=config.data.num_workers,
                                      **parallel.input_shard(mesh))

    def input_from(start: int) -> Any:
        if not joined:
            return map(place_train, member_batches(config, start))
        fed = [member_batches(runs[i].config, start) for i in parallel.member_block(mesh, count)]
        return (place_train(jax.tree.map(lambda *rows: np.stack(rows), *group)) for group in zip(*fed))

    batches = input_from(start_step)

    # The lowerings the run's programs compile with: a resumed run's own, recorded in `lowerings.json`.
    lowerings = runs[0].run_dir / "lowerings.json"
    given = storage.read_json(lowerings) if resume_step is not None and storage.exists(lowerings) else {}
    recorded = dict(given)
    lowering_scope = contextlib.ExitStack()  # closed by the loop's `finally`
    lowering_scope.enter_context(autotune.use(given))
    used = lowering_scope.enter_context(autotune.recording())

    # Train.
    t_session = t_interval = time.time()
    interval_steps, throughput = 0, []
    progress = Progress(runs[0].run_dir.name + (f" +{count - 1}" if joined else ""), start_step, total_steps,
                        enabled=is_main)
    profiler = StepProfiler(config.get("profile_steps", ""), runs[0].run_dir / "profile" / (  # one per process
        f"process{jax.process_index()}" if jax.process_count() > 1 else ""))
    try:
        with StopFlag(multiprocess=jax.process_count() > 1) as stop:
            for step in range(start_step, total_steps):
                profiler.before(step + 1)
                state, metrics = train_fn(state, next(batches))
                profiler.after(step + 1, state)
                for run in runs:
                    run.pending.steps.append((step, metrics))
                    if run.lock is not None:
                        run.lock.beat()
                interval_steps += 1
                done = step + 1
                stopping = stop.poll(done)  # read once: a signal landing mid-iteration is handled at the next step
                is_log = done % config.log_every_steps == 0 or done == total_steps
                is_eval = done % config.eval_every_steps == 0 or done == total_steps  # saved too: may be the best
                is_ckpt = is_eval or done % config.checkpoint_every_steps == 0 or stopping
                if is_log or is_ckpt:
                    _fetch(runs, joined)  # raises on NaN/Inf before anything is saved (members: stops that one)
                live = [run for run in runs if run.failure is None]
                if is_log:
                    now = time.time()
                    img_per_sec = interval_steps * batch_size / (now - t_interval)
                    if interval_steps < done - start_step:  # the first interval of a session includes compilation
                        throughput.append(img_per_sec)
                    for run in live:
                        means = {k: float(np.mean([m[k] for _, m in run.pending.steps]))
                                 for k in run.pending.steps[0][1]}
                        run.log.write({"step": done, **{f"train_{k}": v for k, v in means.items()},
                                       "img_per_sec": img_per_sec, "wall_time": run.log.wall_offset + now - t_session})
                    for run in runs:
                        run.pending.steps = []
                    t_interval, interval_steps = now, 0
                    loss = np.mean([run.log.records[-1]["train_loss"] for run in live])
                shown = {"loss": f"{loss:.4f}", "img_s": f"{img_per_sec * count:,.0f}"} if is_log else {}
                progress.update(done, batch_size * count, **shown)  # members: their mean loss, their total img/s
                if is_eval:
                    if config.get("precise_bn_images", 0) > 0:  # BN statistics over a fixed set of training images
                        state = state.replace(batch_stats=precise_bn.precise_batch_stats(
                            model, state.params, state.batch_stats, map(place_train, itertools.islice(
                                member_batches(config, 0), -(-config.precise_bn_images // batch_size)))))
                    eval_batches = data_lib.eval_batches(eval_source, info, config.data.eval_batch_size,
                                                         config.data.num_workers)
                    scores = evaluate(eval_fn, state, map(place_eval, eval_batches), members=count if joined else 0)
                    scores = scores if joined else [scores]
                    for run, score in zip(runs, scores):
                        if run.failure is None:
                            run.log.write({"step": done, **score})
                    progress.note(f"step {done}/{total_steps}: top-1 error " + ", ".join(
                        f"{score['eval_top1_error']:.2f}%" for run, score in zip(runs, scores) if run.failure is None))
                if is_ckpt:
                    for i, run in enumerate(runs):
                        if run.failure is not None:
                            continue
                        with watchdog.watch("save checkpoint", run.ckpt_dir / str(done)):  # waits for the previous
                            run.manager.save(done, args=ocp.args.PyTreeSave(take(state, i) if joined else state),
                                             metrics={"eval_top1_error": scores[i]["eval_top1_error"]} if is_eval
                                             else None)
                        run.pending.save(done)
                    if is_main and used != recorded:  # the step (and eval) compiled: their lowerings, for resume
                        for run in runs:
                            storage.write_json(run.run_dir / "lowerings.json", used)
                        recorded = dict(used)
                if stopping:
                    raise Stopped(stopping, done, runs[0].run_dir if not joined else
                                  f"{runs[0].run_dir} and its {count - 1} other member(s)")
    finally:
        lowering_scope.close()
        for run in runs:
            if run.manager is not None:
                with watchdog.watch("finish saving checkpoints in", run.ckpt_dir):
                    run.manager.wait_until_finished()
            if run.log is not None:
                run.log.close()
        progress.close()
        profiler.close()
    summaries = []
    for i, run in enumerate(runs):
        if run.failure is not None:
            continue
        params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), state.params) if joined \
            else state.params
        summary = run_summary(run.run_dir, model, run.config, info.image_shape, params, run.log.records, throughput,
                              total_steps)
        if is_main:
            storage.write_json(run.run_dir / "summary.json", summary)
        summaries.append(summary)
    failed = [run for run in runs if run.failure is not None]
    if failed:
        raise FloatingPointError(f"{failed[0].failure}" + (f" ({len(summaries)} other member(s) of its group "
                                                           f"finished)" if summaries else ""))
    return summaries


def _fetch(runs: list[_Run], joined: bool) -> None:
    """Brings each live run's pending metrics to the host. A non-finite one raises; of members, it stops that
    member (reported in one line) and the others go on, unless none is left."""
    for run in runs:
        if run.failure is not None:
            continue
        try:
            run.pending.fetch()
        except FloatingPointError as e:
            if not joined:
                raise
            run.failure = f"{run.run_dir.name}: {e}"
            print(f"warning: member {run.failure}; the other members go on.", flush=True)
    if all(run.failure is not None for run in runs):
        raise FloatingPointError(runs[0].failure)
