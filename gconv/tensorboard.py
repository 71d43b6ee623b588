"""TensorBoard event files beside `metrics.jsonl` (which stays the source for reports and resume), written with
tensorboardX: no TensorFlow needed. On any storage: events are written to a local file and mirrored to the run
directory after each record when that directory is remote (`storage.mirror`). There a new event file is started
every `RECORDS_PER_FILE` records and only the open one is copied, so a record costs O(1) bytes written."""
from __future__ import annotations

import os
import shutil
from typing import Any

from etils import epath

from gconv import storage
from gconv.watchdog import watch

__all__ = ["RECORDS_PER_FILE", "EventLog", "write_images"]

RECORDS_PER_FILE = 16


class EventLog:
    """Scalars of every numeric field of a run's records, by step, in `log_dir` (RUN_DIR/tensorboard).

    Made anew from `records` (the run's `metrics.jsonl` up to the resumed step) when a session starts, so that a
    resumed run's events hold exactly the steps of an uninterrupted run's, each once. `object_store` (default:
    whether `log_dir` is a URL) writes locally and mirrors.
    """

    def __init__(self, log_dir: epath.Path, records: list[dict], enabled: bool = True,
                 object_store: bool | None = None):
        self.enabled, self.log_dir = enabled, log_dir
        if not enabled:
            return
        if storage.exists(log_dir):
            with watch("delete", log_dir):
                log_dir.rmtree()
        self._local = storage.local_dir_for(log_dir, "gconv-tb-", remote=object_store)
        self._copied: dict = {}
        self._files, self._in_file = 0, 0
        self._open()
        for record in records:
            self._add(record)
        self.flush()
        self._roll()

    def _open(self) -> None:
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(self._local, flush_secs=3600, filename_suffix=f".{self._files:06d}")
        self._files += 1
        self._in_file = 0

    def _roll(self) -> None:
        """Closes the current event file (already mirrored whole) and starts the next."""
        self.writer.close()
        self._open()

    def _add(self, record: dict) -> None:
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(key.replace("_", "/", 1) if key.startswith(("train_", "eval_")) else key,
                                       value, record["step"])

    def write(self, record: dict) -> None:
        if self.enabled:
            if self._in_file >= RECORDS_PER_FILE:
                self._roll()
            self._add(record)
            self._in_file += 1
            self.flush()

    def flush(self) -> None:
        self.writer.flush()
        storage.mirror(self._local, self.log_dir, self._copied)  # the files changed since the last flush, whole

    def close(self) -> None:
        if self.enabled:
            self.flush()
            self.writer.close()
            if self._local != os.fspath(self.log_dir):
                shutil.rmtree(self._local, ignore_errors=True)


def write_images(log_dir: epath.Path, pngs: dict[str, Any]) -> None:
    """Each PNG file (`{tag: path}`) as a TensorBoard image in `log_dir`, replacing what was there."""
    import matplotlib.image

    images = {}
    for tag, path in pngs.items():
        if epath.Path(path).exists():
            with epath.Path(path).open("rb") as f:
                images[tag] = matplotlib.image.imread(f, format="png")[..., :3]
    log = EventLog(log_dir, [])
    for tag, image in images.items():
        log.writer.add_image(tag, image, 0, dataformats="HWC")
    log.close()
