"""A run's metrics: `metrics.jsonl` (the source for reports and resume) with its TensorBoard mirror, and the
metrics of the steps trained since the last log line, which a checkpoint carries (`pending.json`) so a resumed run
logs exactly what an uninterrupted one does. Non-finite metrics stop the run before anything is saved.

Each record costs O(1) bytes written, on any storage. On a file system, records are appended to `metrics.jsonl`.
Object storage cannot append, so there `metrics.jsonl` holds the records of earlier sessions and this session's go
to segments, `metrics.parts/INDEX.jsonl` (INDEX: the position of its first record in the run's sequence), each
replaced whole as it grows to `SEGMENT_RECORDS` records; closing the log folds them into `metrics.jsonl`.
`read_metrics` reads both, so a live run's metrics are complete at any moment.
"""
from __future__ import annotations

import math
import os

import numpy as np

from etils import epath

from gconv import storage
from gconv.storage import RunDirError, as_path, read_json, read_jsonl, to_json, write_json, write_text
from gconv.tensorboard import EventLog
from gconv.watchdog import watch

__all__ = ["SEGMENT_RECORDS", "read_metrics", "MetricsLog", "PendingMetrics"]

SEGMENT_RECORDS = 16  # records per segment on object storage: each record rewrites at most this many


def _parts_dir(path: epath.Path) -> epath.Path:
    return path.parent / (path.name.rsplit(".", 1)[0] + ".parts")


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a run's `metrics.jsonl` and of the segments not yet folded into it (a torn last line is
    dropped with a warning)."""
    path = as_path(path)
    records = read_jsonl(path) if storage.exists(path) else []
    parts = _parts_dir(path)
    if not storage.exists(parts):
        return records
    with watch("list", parts):
        indexed = sorted((int(p.name.split(".")[0]), p) for p in parts.iterdir() if p.name.split(".")[0].isdigit())
    for index, part in indexed:
        if index > len(records):
            raise RunDirError(f"{parts} lacks the records {len(records)}..{index - 1} before {part.name}: restore "
                              f"them, or delete the run's metrics and checkpoints to start afresh.")
        records.extend(read_jsonl(part)[len(records) - index:])  # a part already folded in adds nothing
    return records


class MetricsLog:
    """`metrics.jsonl`, mirrored as TensorBoard scalars in `tensorboard/` beside it. On resume, records past the
    restored step are dropped from both. `object_store` (default: whether `path` is a URL) writes segments instead
    of appending."""

    def __init__(self, path: epath.Path, resume_step: int, enabled: bool, object_store: bool | None = None):
        self.path, self.enabled = path, enabled
        self.object_store = storage.is_remote(path) if object_store is None else object_store
        self.parts = _parts_dir(path)
        saved = read_metrics(path)
        self.records = [r for r in saved if r["step"] <= resume_step]
        self.wall_offset = max((r.get("wall_time") or 0.0 for r in self.records), default=0.0)
        self.folded = len(self.records)  # records in metrics.jsonl itself; the rest are in this session's parts
        if enabled and (saved or storage.exists(path)):
            self._fold(saved)
        self.events = EventLog(path.parent / "tensorboard", self.records, enabled=enabled,
                               object_store=self.object_store)

    def write(self, record: dict) -> None:
        self.records.append(record)
        if not self.enabled:
            return
        if self.object_store:
            first = self.folded + (len(self.records) - 1 - self.folded) // SEGMENT_RECORDS * SEGMENT_RECORDS
            write_text(self.parts / f"{first:09d}.jsonl", "".join(to_json(r) + "\n" for r in self.records[first:]))
        else:
            storage.append_text(self.path, to_json(record) + "\n")
        self.events.write(record)

    def close(self) -> None:
        if self.enabled and self.object_store and len(self.records) > self.folded:
            self._fold(self.records)
        self.events.close()

    def _fold(self, saved: list[dict]) -> None:
        """Makes `metrics.jsonl` hold exactly `self.records`, with no segment left, in an order that loses nothing
        if stopped at any point: all `saved` records (what the storage holds) are in `metrics.jsonl` before the
        segments go."""
        complete = self.records if len(saved) <= len(self.records) else saved
        has_parts = storage.exists(self.parts)
        if has_parts:
            write_text(self.path, "".join(to_json(r) + "\n" for r in complete))
            with watch("delete", self.parts):
                self.parts.rmtree()
        if not has_parts or complete is not self.records:
            write_text(self.path, "".join(to_json(r) + "\n" for r in self.records))
        self.folded = len(self.records)


class PendingMetrics:
    """The metrics of the steps trained since the last log line, saved beside each checkpoint (`pending.json`) so
    that a resumed run's next log line covers exactly the steps an uninterrupted run's would. The file keeps them
    for the newest `KEEP` checkpoints: a checkpoint cut short (the process killed before orbax committed it) sends
    the relaunch back to an older one, whose pending steps are still there."""
    KEEP = 8

    def __init__(self, run_dir: epath.Path, start_step: int, enabled: bool = True, lane: int | None = None):
        self.path, self.enabled, self.lane = run_dir / "pending.json", enabled, lane
        saved = read_json(self.path) if storage.exists(self.path) else {}
        if "step" in saved:  # the one-checkpoint form of earlier runs
            saved = {"by_step": {str(saved["step"]): saved.get("metrics", [])}}
        self.by_step: dict[str, list] = saved.get("by_step", {})
        self.steps: list[tuple[int, dict]] = [tuple(p) for p in self.by_step.get(str(start_step), [])]

    def fetch(self) -> None:
        """Brings the pending metrics to the host, checking that they are finite. With a `lane` (a member of a
        group, gconv.members), each metric of a step not yet fetched holds every member's value: this one's is kept."""
        host = [(step, {k: float(v if self.lane is None or np.ndim(v) == 0 else np.asarray(v)[self.lane])
                        for k, v in m.items()}) for step, m in self.steps]
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
            self.by_step[str(step)] = [list(p) for p in self.steps]
            newest = sorted(self.by_step, key=int)[-self.KEEP:]
            self.by_step = {k: self.by_step[k] for k in newest}
            write_json(self.path, {"by_step": self.by_step})
