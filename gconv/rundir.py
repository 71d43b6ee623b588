"""Run directories on any storage: local paths, `gs://` and `s3://` alike through `etils.epath`.

Small files (config, summaries, metrics) are written atomically (a temporary name, then a rename) as strict JSON
(NaN/Inf become null) and read tolerantly (a torn last line of a JSON-lines file is dropped with a warning). A lock
keeps two launches out of one run directory; checkpoints that cannot be read are set aside, with one line saying
so, and the newest readable one is used.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import socket
import tempfile
import time
import uuid
import warnings
from typing import Any, Callable, Sequence

from etils import epath

__all__ = ["cache_dir", "is_remote", "as_path", "local_dir_for", "mirror", "to_json", "write_text", "write_json", "read_json", "read_jsonl", "read_metrics",
           "MetricsLog", "RunLock", "RunDirError", "check_config", "readable_checkpoint_steps", "restore_newest_readable",
           "restore_on_host", "PendingMetrics", "checkpoint_options", "choose_checkpoint"]


class RunDirError(Exception):
    """A run directory that cannot be used as asked (busy, unreadable); the message says what to do."""


def is_remote(path: str | os.PathLike) -> bool:
    """Whether `path` is a URL (`gs://...`) rather than a local path."""
    return "://" in os.fspath(path)


def as_path(path: str | os.PathLike) -> epath.Path:
    """An `epath.Path` for a local path (made absolute, `~` expanded) or a URL (`gs://bucket/dir`, `s3://...`)."""
    text = os.fspath(path)
    return epath.Path(text if is_remote(text) else os.path.abspath(os.path.expanduser(text)))


def local_dir_for(path: epath.Path, prefix: str) -> str:
    """Where a writer that only knows local files (TensorBoard, the profiler) writes what belongs in `path`: `path`
    itself when local, else a fresh temporary directory to `mirror` into it."""
    return tempfile.mkdtemp(prefix=prefix) if is_remote(path) else os.fspath(path)


def mirror(local_dir: str, path: epath.Path) -> None:
    """Copies every file under `local_dir` to the same place under `path`, whole (object storage cannot append);
    nothing to do when `local_dir` is `path`."""
    if not is_remote(path):
        return
    for root, _, files in os.walk(local_dir):
        for name in files:
            source = os.path.join(root, name)
            target = path / os.path.relpath(source, local_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(source, "rb") as f:
                target.write_bytes(f.read())


def cache_dir(kind: str = "weights") -> str:
    """gconv's cache of `kind` ("weights", "xla"): `$GCONV_CACHE/kind`, else under `$XDG_CACHE_HOME` or `~/.cache`."""
    root = os.environ.get("GCONV_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "gconv")
    return os.path.join(root, kind)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def to_json(value: Any, **kwargs: Any) -> str:
    """Strict JSON: NaN and infinities become null."""
    return json.dumps(_finite(value), allow_nan=False, **kwargs)


def write_text(path: epath.Path, text: str) -> None:
    """Writes `text` to `path` atomically: readers see the old file or the new one, never a torn one. (An object
    store's single PUT already is; on a file system, a temporary name and a rename make it so.)"""
    path.parent.mkdir(parents=True, exist_ok=True)
    if is_remote(path):
        path.write_text(text)
        return
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.write_text(text)
    tmp.replace(path)


def write_npy(path: epath.Path, array: Any) -> None:
    """An array as a `.npy` file at `path` (any storage), in one write."""
    import io

    import numpy as np

    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array), allow_pickle=False)
    path.write_bytes(buffer.getvalue())


def read_npy(path: epath.Path) -> Any:
    import io

    import numpy as np

    return np.load(io.BytesIO(path.read_bytes()), allow_pickle=False)


def write_json(path: epath.Path, value: Any) -> None:
    write_text(path, to_json(value, indent=2, sort_keys=True) + "\n")


def read_json(path: epath.Path) -> Any:
    """A JSON file's content; an unreadable one raises `RunDirError` naming it."""
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise RunDirError(f"{path} is not valid JSON ({e}): restore it, or delete it to start that run afresh.") from e


def read_jsonl(path: epath.Path) -> list[dict]:
    """The records of a JSON-lines file. A torn last line (a write cut short) is dropped with a warning; damage
    anywhere else raises `RunDirError` naming the file and line."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except ValueError as e:
            if i == len(lines) - 1:
                warnings.warn(f"{path}: dropped a torn last line ({e}).", stacklevel=2)
                break
            raise RunDirError(f"{path} line {i + 1} is not valid JSON ({e}): restore the file, or delete it "
                              f"together with the run's checkpoints to start afresh.") from e
    return records


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a run's `metrics.jsonl` (a torn last line is dropped with a warning)."""
    return read_jsonl(as_path(path))


class MetricsLog:
    """`metrics.jsonl`: kept in memory and rewritten atomically on each record (object storage cannot append),
    mirrored as TensorBoard scalars in `tensorboard/` beside it. On resume, records past the restored step are
    dropped from both."""

    def __init__(self, path: epath.Path, resume_step: int, enabled: bool):
        from gconv.tensorboard import EventLog

        self.path, self.enabled = path, enabled
        self.records = [r for r in read_jsonl(path) if r["step"] <= resume_step] if path.exists() else []
        self.wall_offset = max((r.get("wall_time") or 0.0 for r in self.records), default=0.0)
        if enabled and path.exists():
            self._flush()
        self.events = EventLog(path.parent / "tensorboard", self.records, enabled=enabled)

    def write(self, record: dict) -> None:
        self.records.append(record)
        if self.enabled:
            self._flush()
            self.events.write(record)

    def close(self) -> None:
        self.events.close()

    def _flush(self) -> None:
        write_text(self.path, "".join(to_json(r) + "\n" for r in self.records))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """`lock.json` in a run directory: who holds it (host, pid, start time) and a heartbeat, refreshed by `beat()`
    (the training loop calls it every step; it writes at most every `stale_after / 4` seconds). A second holder is
    refused; a lock whose holder is gone (same host: no such pid; elsewhere: no heartbeat for `stale_after`
    seconds) is taken over, with a line saying so."""

    def __init__(self, run_dir: epath.Path, stale_after: float = 600.0):
        self.path, self.stale_after = run_dir / "lock.json", stale_after
        self.token = uuid.uuid4().hex
        self._last_beat = 0.0
        self._info = {"host": socket.gethostname(), "pid": os.getpid(), "token": self.token,
                      "started": datetime.datetime.now().isoformat(timespec="seconds")}

    def _holder_alive(self, info: dict) -> bool:
        if info.get("host") == socket.gethostname():
            return _pid_alive(int(info.get("pid", -1)))
        return time.time() - float(info.get("heartbeat", 0.0)) < self.stale_after

    def acquire(self) -> "RunLock":
        if self.path.exists():
            try:
                info = json.loads(self.path.read_text())
            except ValueError:
                info = {}
            if info.get("token") != self.token and self._holder_alive(info):
                age = time.time() - float(info.get("heartbeat", time.time()))
                raise RunDirError(
                    f"{self.path.parent} is in use by pid {info.get('pid')} on {info.get('host')} since "
                    f"{info.get('started')} (heartbeat {age:.0f} s ago): wait for that run, stop it, or pass "
                    f"another --workdir.")
            if info:
                print(f"note: taking over the lock of {self.path.parent} from pid {info.get('pid')} on "
                      f"{info.get('host')}, which is gone.", flush=True)
        self.beat(force=True)
        if json.loads(self.path.read_text()).get("token") != self.token:  # another launch won the race
            raise RunDirError(f"{self.path.parent} was taken by another launch at the same moment: pass another "
                              f"--workdir or retry.")
        return self

    def beat(self, force: bool = False) -> None:
        """Refreshes the heartbeat (if `stale_after / 4` seconds have passed since the last one)."""
        now = time.time()
        if force or now - self._last_beat >= self.stale_after / 4:
            write_text(self.path, to_json({**self._info, "heartbeat": now}))
            self._last_beat = now

    def release(self) -> None:
        try:
            if json.loads(self.path.read_text()).get("token") == self.token:
                self.path.unlink()
        except (FileNotFoundError, ValueError):
            pass

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def readable_checkpoint_steps(ckpt_dir: epath.Path) -> list[int]:
    """Step numbers of the checkpoints under `ckpt_dir` (folders named by their step), oldest first."""
    if not ckpt_dir.exists():
        return []
    return sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit())


def restore_newest_readable(ckpt_dir: epath.Path, restore: Callable[[int], Any], steps: Sequence[int] | None = None,
                            set_aside: bool = False) -> tuple[int | None, Any]:
    """`(step, restore(step))` for the newest checkpoint that restores, trying older ones after a failure.

    Each unreadable checkpoint is reported in one line (step and reason). With `set_aside`, it is moved to
    `checkpoints_unreadable/STEP` beside `ckpt_dir` (kept, not deleted) so a resumed run can save that step again.
    Returns `(None, None)` when there is no checkpoint; raises `RunDirError` when none of them restores.
    """
    steps = list(steps) if steps is not None else readable_checkpoint_steps(ckpt_dir)
    failures = []
    for step in sorted(steps, reverse=True):
        try:
            return step, restore(step)
        except Exception as e:  # orbax/tensorstore raise many types for a damaged checkpoint; all mean "unreadable"
            reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
            failures.append(step)
            where = ""
            if set_aside:
                aside = ckpt_dir.parent / "checkpoints_unreadable" / str(step)
                aside.parent.mkdir(parents=True, exist_ok=True)
                (ckpt_dir / str(step)).rename(aside)
                where = f"; moved to {aside}"
            print(f"warning: checkpoint step {step} in {ckpt_dir} is unreadable ({reason}){where}; trying an older "
                  f"one.", flush=True)
    if failures:
        raise RunDirError(f"none of the checkpoints in {ckpt_dir} (steps {sorted(failures)}) can be read: move the "
                          f"folder away to start the run afresh.")
    return None, None


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


def checkpoint_options(keep: int):
    """Orbax options keeping the newest `keep` checkpoints and, besides them, the one with the lowest eval top-1
    error (checkpoints saved at an evaluation carry it as their metric)."""
    import orbax.checkpoint as ocp
    from orbax.checkpoint.checkpoint_managers import preservation_policy as policies

    best = policies.BestN(get_metric_fn=lambda m: -m["eval_top1_error"], n=1,  # keeps the n largest: -error
                          keep_checkpoints_without_metrics=False)
    return ocp.CheckpointManagerOptions(create=True, preservation_policy=policies.AnyPreservationPolicy(
        [policies.LatestN(n=keep), best]))


def choose_checkpoint(run_dir: epath.Path, which: str = "latest") -> int:
    """The step of a run's checkpoint: "latest" (the newest readable), "best" (the lowest eval top-1 error among the
    readable ones; the latest of ties, as orbax keeps it) or a step number."""
    steps = readable_checkpoint_steps(run_dir / "checkpoints")
    if not steps:
        raise FileNotFoundError(f"{run_dir} has no readable checkpoint: pass the directory of a run that has trained.")
    if which == "latest":
        return steps[-1]
    if which == "best":
        path = run_dir / "metrics.jsonl"
        errors = {r["step"]: r["eval_top1_error"] for r in (read_jsonl(path) if path.exists() else [])
                  if r.get("eval_top1_error") is not None and r["step"] in steps}
        if not errors:
            raise FileNotFoundError(f"{run_dir}: no checkpoint was saved at an evaluation; use --checkpoint latest.")
        return min(errors, key=lambda step: (errors[step], -step))
    if not which.isdigit() or int(which) not in steps:
        raise ValueError(f"checkpoint {which!r} is not in {run_dir}: use latest, best or one of the steps {steps}.")
    return int(which)


# Where a run executes, not what it computes (mesh, step transform, input threads): free to change on resume.
_PLACEMENT = ("mesh", "parallel")


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def _what(config_json: dict) -> dict[str, Any]:
    """What a run trained with, as dotted keys: the config less placement, input threads and the published figures
    the report shows beside it (`paper_*`), with keys it lacks at gconv's defaults (a key added to gconv since the
    run was written, at its default, changes nothing)."""
    from gconv.config import base_config

    defaults = _flat(json.loads(base_config().to_json_best_effort()))
    return {k: v for k, v in {**defaults, **_flat(config_json)}.items()
            if k.split(".")[0] not in _PLACEMENT and k != "data.num_workers" and not k.startswith("paper_")}


def check_config(run_dir: epath.Path, config_json: dict) -> None:
    """Refuses a run directory whose training was done with a different configuration (`config_json`: the new
    config as JSON). A `config.json` left by a start that trained nothing (no checkpoint, no metrics) does not
    block, and neither do placement keys."""
    path = run_dir / "config.json"
    if not path.exists():
        return
    old, new = _what(read_json(path)), _what(config_json)
    differing = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    trained = readable_checkpoint_steps(run_dir / "checkpoints") or (run_dir / "metrics.jsonl").exists()
    if differing and trained:
        raise ValueError(f"{run_dir} holds a run with a different config (keys differing: {differing}). "
                         f"Resume it with the same config, or pass a new --workdir; nothing was changed.")


class PendingMetrics:
    """The metrics of the steps trained since the last log line, saved beside each checkpoint (`pending.json`) so
    that a resumed run's next log line covers exactly the steps an uninterrupted run's would."""

    def __init__(self, run_dir: epath.Path, start_step: int, enabled: bool = True):
        self.path, self.enabled = run_dir / "pending.json", enabled
        saved = read_json(self.path) if self.path.exists() else {}
        self.steps: list[tuple[int, dict]] = [tuple(p) for p in saved.get("metrics", [])] if saved.get(
            "step") == start_step else []

    def fetch(self) -> None:
        """Brings the pending metrics to the host, checking that they are finite."""
        host = [(step, {k: float(v) for k, v in m.items()}) for step, m in self.steps]
        for step, metrics in host:
            bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
            if bad:
                raise FloatingPointError(
                    f"non-finite training metrics {bad} at step {step + 1}. The run stopped; the last good checkpoint "
                    f"is kept. Lower optim.learning_rate, add warmup (optim.warmup_epochs) or check the data.")
        self.steps = host

    def save(self, step: int) -> None:
        """Records the pending steps of a checkpoint at `step`."""
        if self.enabled:
            write_json(self.path, {"step": step, "metrics": [list(p) for p in self.steps]})
