"""A run's checkpoints (`RUN_DIR/checkpoints/STEP`): which exist, the newest that restores (setting unreadable ones
aside), one restored on a single host, orbax's keep policy (newest N and the best), and `latest`/`best`/STEP."""
from __future__ import annotations

import sys
from typing import Any, Callable, Mapping, Sequence

from etils import epath

from gconv.storage import RunDirError, exists, move_tree
from gconv.watchdog import watch

__all__ = ["manager", "readable_checkpoint_steps", "restore_newest_readable", "restore_on_host", "model_variables",
           "best_step", "checkpoint_options", "choose_checkpoint"]


def readable_checkpoint_steps(ckpt_dir: epath.Path) -> list[int]:
    """Step numbers of the finished checkpoints under `ckpt_dir` (folders named by their step), oldest first. A
    save cut short (on object storage: a folder without orbax's commit marker) is not one of them."""
    import orbax.checkpoint as ocp

    if not exists(ckpt_dir):
        return []
    with watch("list", ckpt_dir):
        return sorted(int(p.name) for p in ckpt_dir.iterdir()
                      if p.name.isdigit() and ocp.utils.is_checkpoint_finalized(p))


class _ClosedLoopFilter:
    """`sys.unraisablehook` without the "Event loop is closed" errors that follow a failed orbax restore: orbax
    closes its event loop when one read fails while tensorstore still completes the others, whose callbacks then
    find the loop closed. The failure itself is reported in one line; every other unraisable error goes on to the
    hook that was installed before."""

    def __init__(self, previous: Callable):
        self.previous = previous

    def __call__(self, unraisable: Any) -> None:
        if not (isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"):
            self.previous(unraisable)


def _quiet_closed_loops() -> None:
    """Installs `_ClosedLoopFilter` before any restore, for the rest of the process: the late callbacks can come
    while the failure is still propagating (orbax has closed its loop) and after the restore has returned."""
    if not isinstance(sys.unraisablehook, _ClosedLoopFilter):
        sys.unraisablehook = _ClosedLoopFilter(sys.unraisablehook)


def restore_newest_readable(ckpt_dir: epath.Path, restore: Callable[[int], Any], steps: Sequence[int] | None = None,
                            set_aside: bool = False) -> tuple[int | None, Any]:
    """`(step, restore(step))` for the newest checkpoint that restores, trying older ones after a failure.

    Each unreadable checkpoint is reported in one line (step and reason). With `set_aside`, it is moved to
    `checkpoints_unreadable/STEP` beside `ckpt_dir` (kept, not deleted) so a resumed run can save that step again.
    Returns `(None, None)` when there is no checkpoint; raises `RunDirError` when none of them restores.
    """
    steps = list(steps) if steps is not None else readable_checkpoint_steps(ckpt_dir)
    failures = []
    _quiet_closed_loops()
    for step in sorted(steps, reverse=True):
        try:
            with watch("restore checkpoint", ckpt_dir / str(step)):
                return step, restore(step)
        except Exception as e:  # orbax/tensorstore raise many types for a damaged checkpoint; all mean "unreadable"
            reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
            failures.append(step)
            where = ""
            if set_aside:
                aside = ckpt_dir.parent / "checkpoints_unreadable" / str(step)
                move_tree(ckpt_dir / str(step), aside)
                where = f"; moved to {aside}"
            print(f"warning: checkpoint step {step} in {ckpt_dir} is unreadable ({reason}){where}; trying an older "
                  f"one.", flush=True)
    if failures:
        raise RunDirError(f"none of the checkpoints in {ckpt_dir} (steps {sorted(failures)}) can be read: move the "
                          f"folder away to start the run afresh.")
    return None, None


def model_variables(restored: dict) -> dict:
    """A restored train state's model variables: `params`, `batch_stats` and the model's other collections."""
    return {"params": restored["params"], "batch_stats": restored["batch_stats"], **restored.get("model_state", {})}


def restore_on_host(item_dir: epath.Path) -> Any:
    """A saved state (`CKPT_DIR/STEP/default`) as host numpy arrays, read by this process alone: no barrier with the
    other processes of a multi-process run, whatever mesh the state was saved from."""
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    me = jax.process_index()
    checkpointer = ocp.StandardCheckpointer(multiprocessing_options=ocp.options.MultiprocessingOptions(
        primary_host=me, active_processes={me}))
    tree = ocp.StandardCheckpointHandler().metadata(item_dir).tree
    return checkpointer.restore(item_dir, jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), tree))


def best_step(errors: Mapping[int, float]) -> int | None:
    """The best of a run's evaluated steps (`{step: eval top-1 error}`): the lowest error, the latest of ties;
    None without any. What orbax keeps, `--checkpoint best` and the summary's `best_step` all ask this."""
    return min(errors, key=lambda step: (errors[step], -step)) if errors else None


class _KeepBest:
    """Orbax's preservation policy keeping the checkpoint `best_step` names among those saved at an evaluation."""

    def should_preserve(self, checkpoints: Sequence[Any], *, context: Any = None) -> list[bool]:
        best = best_step({c.step: c.metrics["eval_top1_error"] for c in checkpoints if c.metrics})
        return [c.step == best for c in checkpoints]


def checkpoint_options(keep: int, name: str | None = None):
    """Orbax options keeping the newest `keep` checkpoints and, besides them, the best (`best_step`; checkpoints
    saved at an evaluation carry their eval top-1 error as their metric). `name` prefixes the manager's barriers
    across processes: the managers of members saving the same step at once each need barriers of their own."""
    import orbax.checkpoint as ocp
    from orbax.checkpoint.checkpoint_managers import preservation_policy as policies

    return ocp.CheckpointManagerOptions(
        create=True, preservation_policy=policies.AnyPreservationPolicy([policies.LatestN(n=keep), _KeepBest()]),
        multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=name))


# A replicated array's replica-parallel save first slices it on each device, one small compiled program per shape
# (7 of a tiny run's 16 s on 8 CPU devices, in every process, at its first save); below this many bytes a replica,
# one replica writes the whole array instead.
MIN_REPLICA_SLICE_BYTES = 1 << 20


def manager(ckpt_dir: epath.Path, keep: int, name: str | None = None):
    """Orbax's manager of a run's checkpoints (`checkpoint_options(keep, name)`), saving with `ocp.args.PyTreeSave`:
    replicated arrays are written replica-parallel only when each replica's slice holds `MIN_REPLICA_SLICE_BYTES`."""
    import jax
    import orbax.checkpoint as ocp

    th = ocp.type_handlers
    arrays = th.ArrayHandler(min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES)
    registry = th.create_type_handler_registry(
        *[(ty, th.get_type_handler(ty)) for ty in th.supported_types() if ty is not jax.Array], (jax.Array, arrays))
    return ocp.CheckpointManager(ckpt_dir, options=checkpoint_options(keep, name),
                                 item_handlers=ocp.PyTreeCheckpointHandler(type_handler_registry=registry))


def choose_checkpoint(run_dir: epath.Path, which: str = "latest") -> int:
    """The step of a run's checkpoint: "latest" (the newest readable), "best" (the lowest eval top-1 error among the
    readable ones; the latest of ties, as orbax keeps it) or a step number."""
    steps = readable_checkpoint_steps(run_dir / "checkpoints")
    if not steps:
        raise FileNotFoundError(f"{run_dir} has no readable checkpoint: pass the directory of a run that has trained.")
    if which == "latest":
        return steps[-1]
    if which == "best":
        from gconv.metrics_log import read_metrics

        errors = {r["step"]: r["eval_top1_error"] for r in read_metrics(run_dir / "metrics.jsonl")
                  if r.get("eval_top1_error") is not None and r["step"] in steps}
        if not errors:
            raise FileNotFoundError(f"{run_dir}: no checkpoint was saved at an evaluation; use --checkpoint latest.")
        return best_step(errors)
    if not which.isdigit() or int(which) not in steps:
        raise ValueError(f"checkpoint {which!r} is not in {run_dir}: use latest, best or one of the steps {steps}.")
    return int(which)
