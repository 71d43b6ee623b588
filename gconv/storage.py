"""Paths and whole files on any storage: local paths, `gs://` and `s3://` alike through `etils.epath`.

Small files (config, summaries, metrics) are written atomically (a temporary name, then a rename) as strict JSON
(NaN/Inf become null) and read tolerantly (a torn last line of a JSON-lines file is dropped with a warning; damage
anywhere else raises `RunDirError`). Writers that only know local files (TensorBoard, the profiler) write to a local
directory that `mirror` copies into the run directory. Every operation here is bounded by `gconv.watchdog`, and
`bytes_written()` counts what gconv has written.
"""
from __future__ import annotations

import functools
import io
import json
import logging
import math
import os
import tempfile
import uuid
import warnings
from typing import Any

from etils import epath

from gconv.watchdog import watch

__all__ = ["RunDirError", "cache_dir", "is_remote", "as_path", "local_dir_for", "mirror", "to_json", "write_text",
           "write_bytes", "append_text", "move_tree", "write_json", "read_json", "read_jsonl", "write_npy", "read_npy",
           "exists", "bytes_written", "check_credentials"]

if os.environ.get("STORAGE_EMULATOR_HOST"):  # a local emulator: no credentials to look for (tensorstore would log
    os.environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")  # each miss), no storage-layout API to ask
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")  # (gcsfs would warn on every request)
_written = [0]


class _Once(logging.Filter):
    """Lets each distinct message through once (gcsfs repeats its warnings on every request)."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


logging.getLogger("gcsfs").addFilter(_Once())


class RunDirError(Exception):
    """A run directory that cannot be used as asked (busy, unreadable); the message says what to do."""


def is_remote(path: str | os.PathLike) -> bool:
    """Whether `path` is a URL (`gs://...`) rather than a local path."""
    return "://" in os.fspath(path)


def as_path(path: str | os.PathLike) -> epath.Path:
    """An `epath.Path` for a local path (made absolute, `~` expanded) or a URL (`gs://bucket/dir`, `s3://...`)."""
    text = os.fspath(path)
    return epath.Path(text if is_remote(text) else os.path.abspath(os.path.expanduser(text)))


def local_dir_for(path: epath.Path, prefix: str, remote: bool | None = None) -> str:
    """Where a writer that only knows local files (TensorBoard, the profiler) writes what belongs in `path`: `path`
    itself when local, else a fresh temporary directory to `mirror` into it. `remote` (default: whether `path` is
    a URL) treats a local `path` as object storage."""
    return tempfile.mkdtemp(prefix=prefix) if (is_remote(path) if remote is None else remote) else os.fspath(path)


def mirror(local_dir: str, path: epath.Path, copied: dict[str, tuple[int, int]] | None = None) -> None:
    """Copies every file under `local_dir` to the same place under `path`, whole (object storage cannot append);
    nothing to do when `local_dir` is `path`. With `copied` (filled in by each call), only the files that changed
    since the last call are copied."""
    if os.path.abspath(local_dir) == os.fspath(path):
        return
    copied = {} if copied is None else copied
    for root, _, files in os.walk(local_dir):
        for name in files:
            source = os.path.join(root, name)
            stat = os.stat(source)
            if copied.get(source) == (stat.st_size, stat.st_mtime_ns):
                continue
            with open(source, "rb") as f:
                write_bytes(path / os.path.relpath(source, local_dir), f.read())
            copied[source] = (stat.st_size, stat.st_mtime_ns)


def move_tree(source: epath.Path, target: epath.Path) -> None:
    """Moves the folder `source` to `target`: a rename on a file system; on object storage, which has no folders
    to rename, each object is copied and then the originals deleted."""
    with watch("move", source):
        target.parent.mkdir(parents=True, exist_ok=True)
        if not is_remote(source):
            source.rename(target)
            return
        for path in [p for p in source.rglob("*") if p.is_file()]:
            data = path.read_bytes()
            (target / path.relative_to(source)).write_bytes(data)
            _written[0] += len(data)
        source.rmtree()


def bytes_written() -> int:
    """Bytes gconv has written to run directories in this process (files replaced, appended or mirrored)."""
    return _written[0]


def exists(path: epath.Path) -> bool:
    """Whether `path` exists (bounded by the storage watchdog)."""
    with watch("look up", path):
        return path.exists()


def write_bytes(path: epath.Path, data: bytes) -> None:
    """`data` as the whole file at `path` (one PUT on object storage)."""
    with watch("write", path):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    _written[0] += len(data)


def append_text(path: epath.Path, text: str) -> None:
    """Appends `text` to a local file (object storage cannot append: callers keep segments there instead)."""
    if is_remote(path):
        raise ValueError(f"cannot append to {path}: object storage replaces whole objects.")
    with watch("append to", path):
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(text)
    _written[0] += len(text.encode())


@functools.lru_cache(maxsize=None)
def check_credentials(scheme: str) -> None:
    """Raises `RunDirError` in one line when run directories on `scheme` ("gs", "s3") cannot be reached for lack of
    credentials (an emulator, `STORAGE_EMULATOR_HOST`, needs none)."""
    if scheme == "gs" and not os.environ.get("STORAGE_EMULATOR_HOST"):
        import google.auth
        import google.auth.exceptions

        quiet = logging.getLogger("google.auth._default")  # its warning per method tried: the one line says it all
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            google.auth.default()
        except google.auth.exceptions.DefaultCredentialsError:
            raise RunDirError(
                "a gs:// workdir needs Google Cloud credentials and none were found: run `gcloud auth "
                "application-default login`, set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file, or "
                "run on a VM with a service account (a local emulator: set STORAGE_EMULATOR_HOST).") from None
        finally:
            quiet.setLevel(level)
    if scheme == "s3":
        try:
            import botocore.session
        except ImportError:
            raise RunDirError("an s3:// workdir needs s3fs: pip install s3fs.") from None
        if botocore.session.get_session().get_credentials() is None:
            raise RunDirError("an s3:// workdir needs AWS credentials and none were found: set AWS_ACCESS_KEY_ID and "
                              "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or run with an instance role.")


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
    if is_remote(path):
        write_bytes(path, text.encode())
        return
    with watch("write", path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
        tmp.write_text(text)
        tmp.replace(path)
    _written[0] += len(text.encode())


def write_npy(path: epath.Path, array: Any) -> None:
    """An array as a `.npy` file at `path` (any storage), in one write."""
    import numpy as np

    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array), allow_pickle=False)
    write_bytes(path, buffer.getvalue())


def read_npy(path: epath.Path) -> Any:
    import numpy as np

    with watch("read", path):
        data = path.read_bytes()
    return np.load(io.BytesIO(data), allow_pickle=False)


def write_json(path: epath.Path, value: Any) -> None:
    write_text(path, to_json(value, indent=2, sort_keys=True) + "\n")


def read_json(path: epath.Path) -> Any:
    """A JSON file's content; an unreadable one raises `RunDirError` naming it."""
    with watch("read", path):
        text = path.read_text()
    try:
        return json.loads(text)
    except ValueError as e:
        raise RunDirError(f"{path} is not valid JSON ({e}): restore it, or delete it to start that run afresh.") from e


def read_jsonl(path: epath.Path) -> list[dict]:
    """The records of a JSON-lines file. A torn last line (a write cut short) is dropped with a warning; damage
    anywhere else raises `RunDirError` naming the file and line."""
    with watch("read", path):
        text = path.read_text()
    lines = [line for line in text.splitlines() if line.strip()]
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
