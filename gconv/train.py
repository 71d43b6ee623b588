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
import json
from typing import Any, Callable, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from gconv import data as data_lib
from gconv import autotune, checkpoints, members, parallel, precise_bn, runlock, storage, watchdog
from gconv.loop import (Checkpoint, Evaluate, Guard, Log, Run, Tick, check_classes, close, evaluate, every, open_runs,
                        kept_summaries, restore_group, run_actions, summaries, training_input, write_run_files)
from gconv.config import check_config
from gconv.convert import load_torch_weights_for
from gconv.models import model_from_config, model_state
from gconv.optim import create_optimizer, current_rate, hyperparams, with_hyperparams
from gconv.preemption import StopFlag, Stopped
from gconv.preflight import preflight
from gconv.progress import Progress, StepProfiler

__all__ = ["TrainState", "create_optimizer", "create_train_state", "abstract_train_state", "train_step", "eval_step",
           "evaluate", "train_and_evaluate", "train_members", "Stopped"]


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array  # raw uint32 key, so checkpoints stay plain arrays
    model_state: Any = flax.struct.field(default_factory=dict)  # the model's other collections (CondenseNet's masks)

    def variables(self) -> dict:  # the model's: params, batch_stats and model_state's collections
        return {"params": self.params, "batch_stats": self.batch_stats, **self.model_state}


_INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 1}


def _init(model: nn.Module, tx: optax.GradientTransformation, image_shape: tuple[int, ...]) -> Callable:
    def init(seed: jax.Array, hyper: dict | None = None) -> TrainState:
        init_rng, rng = jax.random.split(jax.random.PRNGKey(seed))
        variables = model.init(init_rng, jnp.zeros((1,) + tuple(image_shape), jnp.float32))
        params = variables["params"]
        opt_state = tx.init(params) if hyper is None else with_hyperparams(tx.init(params), hyper)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=variables.get("batch_stats", {}),
                          opt_state=opt_state, rng=rng, model_state=model_state(variables))

    return init


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, image_shape: tuple[int, ...],
                       seed: int | Sequence[int], shardings: Any = None, hyper: dict | None = None) -> TrainState:
    """Parameters and BN statistics from `seed` on a `(1, *image_shape)` input. A list of seeds gives the members'
    state (gconv.members): one per seed, stacked on a leading axis, each what its seed alone gives, its optimizer
    holding its own rates (`hyper`: `gconv.optim.hyperparams`' form, each leaf stacked over the members).
    `shardings` (a `Sharding` or a tree of them): where the state is created, each device computing its share."""
    init = _init(model, tx, image_shape)
    seeds = jnp.asarray(seed, jnp.int32)
    lowered = jax.jit(jax.vmap(init) if seeds.ndim else init, out_shardings=shardings).lower(seeds, hyper)
    # Runs once: on the CPU, LLVM's -O1 halves the compile time of the unrolled random-number kernels and gives
    # the same values bit for bit (tests/test_train.py checks it).
    return lowered.compile(_INIT_COMPILER_OPTIONS if jax.default_backend() == "cpu" else None)(seeds, hyper)


def abstract_train_state(model: nn.Module, tx: optax.GradientTransformation,
                         image_shape: tuple[int, ...]) -> TrainState:
    """One run's state as shapes and dtypes (`jax.ShapeDtypeStruct`s), without computing it."""
    return jax.eval_shape(_init(model, tx, image_shape), jnp.int32(0))


def _cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float) -> jax.Array:
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def train_step(state: TrainState, batch: dict, *, model: nn.Module, tx: optax.GradientTransformation,
               label_smoothing: float | jax.Array = 0.0, axis_name: str | None = None,
               grad_norm: Callable = optax.tree.norm) -> tuple[TrainState, dict]:
    """One SGD step on the global `batch` (`image: (B, H, W, C)`, `label: (B,)`): a global program, which `jax.jit`
    partitions as the arrays' shardings say (gconv.parallel). Loss: cross-entropy + the model's `losses` collection.
    Under `pmap` pass its axis name: each device's gradients, metrics and BatchNorm statistics are averaged."""
    dropout_rng = jax.random.fold_in(state.rng, state.step)  # dropout's masks: a function of (seed, step)
    if axis_name is not None:
        dropout_rng = jax.random.fold_in(dropout_rng, jax.lax.axis_index(axis_name))

    def loss_fn(params):
        logits, mutated = model.apply({**state.variables(), "params": params}, batch["image"], train=True, mutable=[
            "batch_stats", "losses", *state.model_state], rngs={"dropout": dropout_rng})
        added = sum(jax.tree.leaves(mutated.get("losses", {})))  # terms the model sows (CondenseNet's lasso)
        return jnp.mean(_cross_entropy(logits, batch["label"], label_smoothing)) + added, (logits, mutated)

    (loss, (logits, mutated)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    batch_stats = mutated.get("batch_stats", {})
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    if axis_name is not None:
        grads, batch_stats, loss, accuracy = jax.lax.pmean((grads, batch_stats, loss, accuracy), axis_name)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "accuracy": accuracy, "grad_norm": grad_norm(grads),
               "lr": current_rate(state.opt_state)}  # the rate of this step's update
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state,
                              rng=jax.random.fold_in(state.rng, state.step),
                              model_state={k: mutated[k] for k in state.model_state})
    return new_state, metrics


def eval_step(state: TrainState, batch: dict, *, model: nn.Module) -> dict:
    """Sums over the real (mask=True) examples of the global `batch`: `correct` (top-1), `correct5` (top-5),
    `loss`, `count`, and `per_class: (classes, 2)`, each class's [correct, count]."""
    logits = model.apply(state.variables(), batch["image"], train=False)
    classes, mask = logits.shape[-1], batch["mask"].astype(jnp.float32)
    hit = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
    top5, of_class = jax.lax.top_k(logits, min(5, classes))[1], jax.nn.one_hot(batch["label"], classes)
    return {"correct": jnp.sum(hit * mask), "correct5": jnp.sum(jnp.any(top5 == batch["label"][:, None], -1) * mask),
            "loss": jnp.sum(_cross_entropy(logits, batch["label"], 0.0) * mask), "count": jnp.sum(mask),
            "per_class": jnp.stack([(hit * mask) @ of_class, mask @ of_class], -1)}


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
    runs = [Run(config, json.loads(config.to_json_best_effort()), run_dir) for config, run_dir in zip(configs, run_dirs)]
    for run in runs:
        check_config(run.run_dir, run.config_json)
    writer = jax.process_index() == 0  # holds the locks, writes configs, logs, side files, summaries; all train
    with contextlib.ExitStack() as locks:
        if writer:
            for run in runs:
                run.lock = runlock.RunLock(run.run_dir).acquire(takeover)
                locks.callback(run.lock.release)
        return _train(runs, writer)


@dataclasses.dataclass
class _Program:
    """What a group of runs trains with: data, model, mesh, optimizers and where the state lives."""
    info: Any
    train_source: Any
    eval_source: Any
    total_steps: int
    model: nn.Module
    mesh: Any
    tx: optax.GradientTransformation  # every member's: its rates are in its state
    hyper: dict | None  # the members' rates (`gconv.optim.hyperparams`, stacked); None: one run
    specs: Any  # one run's partition specs
    shardings: Any  # where the (members') state is created; None: one device
    take: Callable  # a members' state -> member i's (one run: the state itself)
    stack: Callable  # members' states -> the stacked state


def _program(runs: list[Run]) -> _Program:
    config, joined = runs[0].config, len(runs) > 1  # everything but JOINABLE keys is the same for every member
    train_source, eval_source, info = data_lib.get_sources(config.data)
    steps_per_epoch = max(1, info.num_train // config.data.batch_size)
    total_steps = config.num_steps if config.num_steps > 0 else int(config.num_epochs * steps_per_epoch)
    mesh = parallel.make_mesh(config.mesh)
    model = model_from_config(config.model, info.num_classes, total_steps=total_steps)  # a global program
    tx, _ = create_optimizer(config.optim, steps_per_epoch, total_steps)
    hyper = jax.tree.map(lambda *v: np.stack(v), *[hyperparams(run.config.optim, steps_per_epoch, total_steps)
                                                   for run in runs]) if joined else None
    abstract = abstract_train_state(model, tx, info.image_shape)
    specs = parallel.state_specs(abstract, config.sharding, model, mesh) if mesh.size > 1 else P()
    one, stacked = (parallel.named(specs, mesh), parallel.named(parallel.member_specs(specs, mesh), mesh)) if (
        mesh.size > 1) else (None, None)
    take = jax.jit(lambda states, i: jax.tree.map(lambda x: x[i], states), out_shardings=one) if joined else (
        lambda state, i: state)
    stack = jax.jit(lambda *members: jax.tree.map(lambda *xs: jnp.stack(xs), *members), out_shardings=stacked)
    return _Program(info, train_source, eval_source, total_steps, model, mesh, tx, hyper, specs,
                    stacked if joined else one, take, stack)


def _initial_state(runs: list[Run], p: _Program, writer: bool) -> tuple[int | None, TrainState]:
    """`(resume step or None, state)`: created where the rules put it (from PyTorch weights when `init_from`
    says so and nothing is saved yet), then restored from the runs' checkpoints onto this mesh's shardings."""
    config, joined = runs[0].config, len(runs) > 1
    seeds = [run.config.seed for run in runs] if joined else config.seed
    state = create_train_state(p.model, p.tx, p.info.image_shape, seeds, p.shardings, p.hyper)
    if config.init_from and not any(checkpoints.readable_checkpoint_steps(run.ckpt_dir) for run in runs):
        variables = load_torch_weights_for(config, p.info.num_classes)  # parameters and BN statistics, from PyTorch
        loaded = p.take(state, 0).replace(**variables)
        state = p.stack(*[loaded.replace(rng=p.take(state, i).rng, opt_state=p.take(state, i).opt_state)
                          for i in range(len(runs))]) if joined else (
            jax.device_put(loaded, p.shardings) if p.shardings is not None else loaded)
    return restore_group(runs, state, p.take, p.stack, set_aside=writer)


def _steps(runs: list[Run], p: _Program) -> tuple[Callable, Callable, Callable, Callable]:
    """`(train_fn, eval_fn, place_train, place_eval)` of the group on its mesh (gconv.parallel.compile_steps)."""
    config = runs[0].config
    member_axis = parallel.MEMBER if parallel.MEMBER in p.mesh.axis_names else None
    step = functools.partial(train_step, model=p.model, tx=p.tx,  # the gradients' norm: one exchange of devices
                             grad_norm=parallel.sharded_norm(getattr(p.specs, "params", p.specs)))
    if len(runs) > 1:
        smoothing = np.asarray([r.config.optim.label_smoothing for r in runs], np.float32)
        train = functools.partial(members.member_train_step, step=step, label_smoothing=smoothing,
                                  member_axis=member_axis, vmap=config.member_vmap)
        evaluate_step = functools.partial(members.member_eval_step, step=functools.partial(eval_step, model=p.model),
                                          member_axis=member_axis, vmap=config.member_vmap)
    else:
        train = functools.partial(step, label_smoothing=config.optim.label_smoothing)
        evaluate_step = functools.partial(eval_step, model=p.model)
    train, evaluate_step = (data_lib.standardized(f, p.info) for f in (train, evaluate_step))  # uint8 pixels in
    return parallel.compile_steps(train, evaluate_step, p.mesh, p.specs, config.parallel, members=len(runs) > 1)


def _train(runs: list[Run], writer: bool) -> list[dict[str, Any]]:
    """Build, restore, compile, then the loop: a step, then the periodic actions that are due."""
    config, count, joined = runs[0].config, len(runs), len(runs) > 1
    p = _program(runs)
    check_classes(runs, p.info)
    resume_step, state = _initial_state(runs, p, writer)
    start_step, total_steps = resume_step or 0, p.total_steps
    if writer:  # the config is good and the state is built: from here on the directories hold these runs
        write_run_files(runs, p.info)
    if start_step >= total_steps and all(storage.exists(run.run_dir / "summary.json") for run in runs):
        return kept_summaries(runs, start_step)
    if writer and resume_step is not None:
        print(f"{runs[0].run_dir.name}{f' and {count - 1} more member(s)' if joined else ''}: resuming at step "
              f"{start_step} from {runs[0].ckpt_dir / str(resume_step)}", flush=True)
    open_runs(runs, start_step, config.keep_checkpoints, writer)
    train_fn, eval_fn, place_train, place_eval = _steps(runs, p)
    batches = training_input(runs, p, place_train, start_step)
    # The lowerings the run's programs compile with: a resumed run's own, recorded in `lowerings.json`.
    lowerings = runs[0].run_dir / "lowerings.json"
    given = storage.read_json(lowerings) if resume_step is not None and storage.exists(lowerings) else {}
    scope = contextlib.ExitStack()  # closed by the loop's `finally`
    scope.enter_context(autotune.use(given))
    used = scope.enter_context(autotune.recording())
    progress = scope.enter_context(contextlib.closing(Progress(
        runs[0].run_dir.name + (f" +{count - 1}" if joined else ""), start_step, total_steps, enabled=writer)))
    profiler = scope.enter_context(contextlib.closing(StepProfiler(config.get("profile_steps", ""), runs[0].run_dir /
        "profile" / (f"process{jax.process_index()}" if jax.process_count() > 1 else ""))))  # one per process
    is_log, is_eval = every(config.log_every_steps, total_steps), every(config.eval_every_steps, total_steps)
    is_ckpt = lambda done, stopping: is_eval(done) or done % config.checkpoint_every_steps == 0 or stopping  # noqa
    log = Log(runs, is_log, progress, config.data.batch_size, start_step)
    actions = [Guard(runs, joined, lambda done, stopping: is_log(done) or is_ckpt(done, stopping)), log,
               Evaluate(runs, is_eval, lambda s: evaluate(eval_fn, s, map(place_eval, data_lib.eval_batches(
                   p.eval_source, p.info, config.data.eval_batch_size, config.data.num_workers)),
                   members=count if joined else 0), progress, total_steps, precise_bn.recompute(config, p, place_train)),
               Checkpoint(runs, is_ckpt, p.take, writer, (used, dict(given)))]
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
                tick = run_actions(actions, Tick(step + 1, state, stop.poll(step + 1)))  # a signal: next step
                state = tick.state
                if tick.stopping:
                    raise Stopped(tick.stopping, tick.done, runs[0].run_dir if not joined else
                                  f"{runs[0].run_dir} and its {count - 1} other member(s)")
    finally:
        scope.close()
        close(runs)
    return summaries(runs, p, state, log.throughput, writer)
