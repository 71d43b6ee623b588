"""A run's metrics: `metrics.jsonl` (the source for reports and resume) with its TensorBoard mirror, and the
metrics of the steps trained since the last log line, which a checkpoint carries (`pending.json`) so a resumed run
logs exactly what an uninterrupted one does. Non-finite metrics stop the run before anything is saved."""
from __future__ import annotations

import math
import os

from etils import epath

from gconv.storage import as_path, read_json, read_jsonl, to_json, write_json, write_text
from gconv.tensorboard import EventLog

__all__ = ["read_metrics", "MetricsLog", "PendingMetrics"]


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a run's `metrics.jsonl` (a torn last line is dropped with a warning)."""
    return read_jsonl(as_path(path))


class MetricsLog:
    """`metrics.jsonl`: kept in memory and rewritten atomically on each record (object storage cannot append),
    mirrored as TensorBoard scalars in `tensorboard/` beside it. On resume, records past the restored step are
    dropped from both."""

    def __init__(self, path: epath.Path, resume_step: int, enabled: bool):
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
