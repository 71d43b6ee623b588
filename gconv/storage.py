"""Paths and whole files on any storage: local paths, `gs://` and `s3://` alike through `etils.epath`.

Small files (config, summaries, metrics) are written atomically (a temporary name, then a rename) as strict JSON
(NaN/Inf become null) and read tolerantly (a torn last line of a JSON-lines file is dropped with a warning; damage
anywhere else raises `RunDirError`). Writers that only know local files (TensorBoard, the profiler) write to a local
directory that `mirror` copies into the run directory.
"""
from __future__ import annotations

import io
import json
import math
import os
import tempfile
import uuid
import warnings
from typing import Any

from etils import epath

__all__ = ["RunDirError", "cache_dir", "is_remote", "as_path", "local_dir_for", "mirror", "to_json", "write_text",
           "write_json", "read_json", "read_jsonl", "write_npy", "read_npy"]


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
    import numpy as np

    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array), allow_pickle=False)
    path.write_bytes(buffer.getvalue())


def read_npy(path: epath.Path) -> Any:
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
