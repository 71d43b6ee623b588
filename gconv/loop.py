"""The training loop's parts: each run's side of it (`Run`), restoring a group of runs, and the periodic work
between steps as a list of small actions, each due at some steps (`Guard`, `Log`, `Evaluate`, `Checkpoint`).

`gconv.train` builds them and runs the loop: after each step, every action that is due runs in order, reading and
updating one `Tick` (the step's number, the state, whether a stop was asked, the evaluation scores).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from gconv import checkpoints, metrics_log, parallel, runlock, storage, watchdog
from gconv import data as data_lib
from gconv.progress import Progress
from gconv.summary import BY_CLASS, CLASSES, run_classes, run_summary

__all__ = ["Run", "Tick", "restore_group", "evaluate", "every", "Guard", "Log", "Evaluate", "Checkpoint", "run_actions",
           "check_classes", "write_run_files", "open_runs", "kept_summaries", "host_batches", "training_input", "close",
           "summaries"]


@dataclasses.dataclass
class Run:
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


@dataclasses.dataclass
class Tick:
    """The loop's state between two steps, as the actions see it."""
    done: int  # steps trained
    state: Any
    stopping: Any  # the stop signal's name, or None
    scores: list | None = None  # this step's evaluation, one dict per run


def check_classes(runs: list[Run], info: data_lib.DatasetInfo) -> None:
    """Refuses, before anything is restored or written, runs whose data names other classes than when they began
    (their `classes.json`: an image folder's sub-folders changed)."""
    for run in runs:
        began = run_classes(run.run_dir)
        if began is not None and tuple(began) != info.classes:
            raise ValueError(f"{run.run_dir}: the data's classes changed since this run began (was {began}, now "
                             f"{list(info.classes)}): restore the data as it was, or train in a new run directory.")


def write_run_files(runs: list[Run], info: data_lib.DatasetInfo) -> None:
    """Each run's `config.json`, and `classes.json` (the class names, for `eval` and the report's summary) where the
    data names them."""
    for run in runs:
        storage.write_json(run.run_dir / "config.json", run.config_json)
        if info.classes:
            storage.write_json(run.run_dir / CLASSES, list(info.classes))


def open_runs(runs: list[Run], start_step: int, keep: int, writer: bool) -> None:
    """Each run's checkpoint manager, metrics log (+ TensorBoard) and pending metrics, from `start_step`."""
    for i, run in enumerate(runs):
        with watchdog.watch("open checkpoints", run.ckpt_dir):
            run.manager = checkpoints.manager(run.ckpt_dir, keep, run.run_dir.name)
        run.log = metrics_log.MetricsLog(run.run_dir / "metrics.jsonl", start_step, enabled=writer)
        run.pending = metrics_log.PendingMetrics(run.run_dir, start_step, enabled=writer,
                                                 lane=i if len(runs) > 1 else None)


def kept_summaries(runs: list[Run], step: int) -> list[dict]:
    """The summaries of runs already trained to their last step, kept as they are."""
    for run in runs:
        print(f"{run.run_dir.name}: already trained to step {step}; its summary is kept.", flush=True)
    return [storage.read_json(run.run_dir / "summary.json") for run in runs]


# --- restore ----------------------------------------------------------------------------------------------------

def restore_group(runs: list[Run], state: Any, take: Callable, stack: Callable,
                  set_aside: bool) -> tuple[int | None, Any]:
    """`(step, state)` from the runs' newest checkpoints: a run's own; for members, the newest step at which every
    member's checkpoint restores. The steps every member has are read before anything is restored; a member's
    newer ones (left by a stop in the middle of the group's saves) are removed: the group trains those steps
    again. `(None, state)` when there is none."""
    checkpointer = ocp.StandardCheckpointer()

    def restore(run: Run, target: Any, limit: int | None) -> tuple[int | None, Any]:
        steps = [s for s in checkpoints.readable_checkpoint_steps(run.ckpt_dir) if limit is None or s <= limit]
        return checkpoints.restore_newest_readable(
            run.ckpt_dir, lambda s: checkpointer.restore(run.ckpt_dir / str(s) / "default", target), steps,
            set_aside=set_aside)

    if len(runs) == 1:
        step, restored = restore(runs[0], state, None)
        return (step, restored) if step is not None else (None, state)
    common = set.intersection(*(set(checkpoints.readable_checkpoint_steps(run.ckpt_dir)) for run in runs))
    limit = max(common) if common else -1
    found = []
    while limit >= 0:
        found = [restore(run, take(state, i), limit) for i, run in enumerate(runs)]
        steps = {step for step, _ in found}
        if None in steps:
            limit = -1
        elif len(steps) == 1:
            break
        else:  # a damaged checkpoint was set aside: fall back to the newest step all of them still restore
            limit = min(steps)
    _remove_past(runs, limit, set_aside)
    if limit < 0:
        return None, state
    return limit, stack(*[restored for _, restored in found])


def _remove_past(runs: list[Run], limit: int, set_aside: bool) -> None:
    for run in runs:
        newer = [s for s in checkpoints.readable_checkpoint_steps(run.ckpt_dir) if s > limit]
        if newer and set_aside:
            print(f"{run.run_dir.name}: checkpoints {newer} are past the step its group resumes at "
                  f"({max(limit, 0)}); removed, the group trains them again.", flush=True)
            for step in newer:
                with watchdog.watch("delete", run.ckpt_dir / str(step)):
                    (run.ckpt_dir / str(step)).rmtree()


def evaluate(step_fn: Callable, state: Any, batches: Iterable[dict], members: int = 0) -> dict[str, float] | list[dict]:
    """Top-1 and top-5 error (%) and mean loss over a full pass of `batches`; with `members` K > 0 (a members'
    state and step, gconv.members), a list of K such dicts."""
    totals = None
    for batch in batches:
        out = step_fn(state, batch)
        totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    totals = jax.device_get(totals)
    if members:
        return [error_scores(jax.tree.map(lambda v: v[i], totals)) for i in range(members)]
    return error_scores(totals)


def error_scores(totals: dict[str, Any]) -> dict[str, Any]:
    """Top-1 and top-5 error (%) and mean loss from an evaluation's sums (`eval_step`'s), and the top-1 error of
    each class (`BY_CLASS`) where the sums hold `per_class`."""
    scores = {"eval_top1_error": 100.0 * (1.0 - float(totals["correct"]) / float(totals["count"])),
              "eval_top5_error": 100.0 * (1.0 - float(totals["correct5"]) / float(totals["count"])),
              "eval_loss": float(totals["loss"]) / float(totals["count"])}
    if "per_class" in totals:
        scores[BY_CLASS] = [round(100.0 * (1 - float(c) / float(n)), 4) if n else None for c, n in totals["per_class"]]
    return scores


# --- the periodic actions ---------------------------------------------------------------------------------------

def every(n: int, total: int) -> Callable[[int], bool]:
    """Due every `n` steps and at the last one."""
    return lambda done: done % n == 0 or done == total


class Guard:
    """Brings each live run's pending metrics to the host before they are logged or saved. A non-finite one raises;
    of members, it stops that member (one line) and the others go on, unless none is left."""

    def __init__(self, runs: list[Run], joined: bool, due: Callable[[int, Any], bool]):
        self.runs, self.joined, self.due = runs, joined, due

    def __call__(self, tick: Tick) -> None:
        for run in self.runs:
            if run.failure is not None:
                continue
            try:
                run.pending.fetch()
            except FloatingPointError as e:
                if not self.joined:
                    raise
                run.failure = f"{run.run_dir.name}: {e}"
                print(f"warning: member {run.failure}; the other members go on.", flush=True)
        if all(run.failure is not None for run in self.runs):
            raise FloatingPointError(self.runs[0].failure)


class Log:
    """Every step: the progress bar (its postfix on log steps). On log steps: each live run's mean training
    metrics since the last log line and the images per second; the intervals after the first (which includes
    compilation) make the run's throughput."""

    def __init__(self, runs: list[Run], due: Callable[[int], bool], progress: Progress, batch_size: int,
                 start_step: int):
        self.runs, self.is_log, self.progress, self.batch_size = runs, due, progress, batch_size
        self.start_step, self.t_session = start_step, time.time()
        self.t_interval, self.interval_steps, self.throughput = self.t_session, 0, []
        self.due = lambda done, stopping: True

    def __call__(self, tick: Tick) -> None:
        self.interval_steps += 1
        shown = {}
        if self.is_log(tick.done):
            now = time.time()
            img_per_sec = self.interval_steps * self.batch_size / (now - self.t_interval)
            if self.interval_steps < tick.done - self.start_step:
                self.throughput.append(img_per_sec)
            live = [run for run in self.runs if run.failure is None]
            for run in live:
                means = {k: float(np.mean([m[k] for _, m in run.pending.steps])) for k in run.pending.steps[0][1]}
                run.log.write({"step": tick.done, **{f"train_{k}": v for k, v in means.items()},
                               "img_per_sec": img_per_sec, "wall_time": run.log.wall_offset + now - self.t_session})
            for run in self.runs:
                run.pending.steps = []
            self.t_interval, self.interval_steps = now, 0
            loss = np.mean([run.log.records[-1]["train_loss"] for run in live])
            shown = {"loss": f"{loss:.4f}", "img_s": f"{img_per_sec * len(self.runs):,.0f}"}
        self.progress.update(tick.done, self.batch_size * len(self.runs), **shown)  # members: their mean, total


class Evaluate:
    """On evaluation steps: (precise BatchNorm statistics, then) top-1/top-5 error and loss of every run on the
    evaluation set, written to its log and kept in `tick.scores` for the checkpoint."""

    def __init__(self, runs: list[Run], due: Callable[[int], bool], scores: Callable[[Any], list[dict]],
                 progress: Progress, total_steps: int, precise_bn: Callable[[Any], Any] | None = None):
        self.runs, self.is_eval, self.scores, self.progress = runs, due, scores, progress
        self.total_steps, self.precise_bn = total_steps, precise_bn
        self.due = lambda done, stopping: due(done)

    def __call__(self, tick: Tick) -> None:
        if self.precise_bn is not None:
            tick.state = self.precise_bn(tick.state)
        scores = self.scores(tick.state)
        tick.scores = scores if isinstance(scores, list) else [scores]
        live = [(run, score) for run, score in zip(self.runs, tick.scores) if run.failure is None]
        for run, score in live:  # the error by class: in the final evaluation's record only
            run.log.write({"step": tick.done, **{k: v for k, v in score.items()
                                                 if k != BY_CLASS or tick.done == self.total_steps}})
        self.progress.note(f"step {tick.done}/{self.total_steps}: top-1 error " + ", ".join(
            f"{score['eval_top1_error']:.2f}%" for _, score in live))


class Checkpoint:
    """On evaluation and checkpoint steps and when stopping: each live run's state (its member's slice, `take`),
    with its evaluation error when there is one (the best checkpoint is kept), and its pending metrics; then, once,
    the lowerings the programs compiled with (`lowerings.json`, for a resume to compile the same)."""

    def __init__(self, runs: list[Run], due: Callable[[int, Any], bool], take: Callable[[Any, int], Any],
                 is_main: bool, lowerings: tuple[dict, dict]):
        self.runs, self.due, self.take, self.is_main = runs, due, take, is_main
        self.used, self.recorded = lowerings

    def __call__(self, tick: Tick) -> None:
        for i, run in enumerate(self.runs):
            if run.failure is not None:
                continue
            metrics = {"eval_top1_error": tick.scores[i]["eval_top1_error"]} if tick.scores else None
            with watchdog.watch("save checkpoint", run.ckpt_dir / str(tick.done)):  # waits for the previous
                run.manager.save(tick.done, args=ocp.args.PyTreeSave(self.take(tick.state, i)), metrics=metrics)
            run.pending.save(tick.done)
        if self.is_main and self.used != self.recorded:
            for run in self.runs:
                storage.write_json(run.run_dir / "lowerings.json", self.used)
            self.recorded = dict(self.used)


def run_actions(actions: Iterable[Any], tick: Tick) -> Tick:
    """Every action due at `tick`, in order."""
    for action in actions:
        if action.due(tick.done, tick.stopping):
            action(tick)
    return tick


# --- input and end ----------------------------------------------------------------------------------------------

def host_batches(config: ml_collections.ConfigDict, p: Any, seed: int, start: int) -> Iterator[dict]:
    """This process's rows of each training batch of `seed`'s order from step `start` (host arrays)."""
    return data_lib.train_batches(p.train_source, p.info, config.data.batch_size, seed=seed, start_step=start,
                                  augment=config.data.augment, num_workers=config.data.num_workers,
                                  worker_processes=config.data.get("worker_processes", 0),
                                  **parallel.input_shard(p.mesh))


def training_input(runs: list[Run], p: Any, place: Callable, start: int) -> Iterator[dict]:
    """This process's rows of each training batch from step `start` (members: its members' batches, stacked)."""
    config = runs[0].config
    if len(runs) == 1:
        return _closing([host_batches(config, p, config.seed, start)], lambda group: place(group[0]))
    fed = [host_batches(config, p, runs[i].config.seed, start) for i in parallel.member_block(p.mesh, len(runs))]
    return _closing(fed, lambda group: place(jax.tree.map(lambda *rows: np.stack(rows), *group)))


def _closing(iterators: list[Iterator[dict]], combine: Callable[[tuple], dict]) -> Iterator[dict]:
    """`combine` of the iterators' next elements, in turn; closes them when dropped (grain's worker processes)."""
    try:
        for group in zip(*iterators):
            yield combine(group)
    finally:
        for it in iterators:
            getattr(it, "close", lambda: None)()


def close(runs: list[Run]) -> None:
    """Waits for the runs' checkpoint saves and closes their logs."""
    for run in runs:
        if run.manager is not None:
            with watchdog.watch("finish saving checkpoints in", run.ckpt_dir):
                run.manager.wait_until_finished()
        if run.log is not None:
            run.log.close()


def summaries(runs: list[Run], p: Any, state: Any, throughput: list, writer: bool) -> list[dict]:
    """Each finished run's summary (written by the writer); raises the first member's failure once the others are
    done."""
    summaries = []
    for run in runs:
        if run.failure is not None:
            continue
        params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), state.params) if len(runs) > 1 \
            else state.params
        summary = run_summary(run.run_dir, p.model, run.config, p.info.image_shape, params, run.log.records,
                              throughput, p.total_steps)
        if writer:
            storage.write_json(run.run_dir / "summary.json", summary)
        summaries.append(summary)
    failed = [run for run in runs if run.failure is not None]
    if failed:
        raise FloatingPointError(f"{failed[0].failure}" + (f" ({len(summaries)} other member(s) of its group "
                                                           f"finished)" if summaries else ""))
    return summaries
