"""Bounded waits on storage: a request that gets no answer ends the run in one line instead of hanging it.

Every storage operation of a run (a file written or read, a listing, a checkpoint saved or restored) runs inside
`watch(operation, path)`. A watchdog thread ends the process when one of them has waited longer than the limit
(`storage_timeout_s` in the config, 300 s by default), with one line naming the operation and the path, and exit
code 75 (EX_TEMPFAIL: try again later). A thread blocked in a network call cannot be interrupted from Python, so the
process exits; nothing written before is lost (files are replaced whole, checkpoints are committed last), and a
relaunch resumes from the newest checkpoint. gcsfs and tensorstore get request timeouts of their own, 1.5x the
limit: past the watchdog's, so that a wait it sees ends in its one line, and yet bounded where it does not look (an
upload in orbax's background thread while training goes on), where the failure then reaches the next save.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import sys
import threading
import time
from typing import Iterator

__all__ = ["EXIT_CODE", "DEFAULT_LIMIT", "set_limit", "limit", "watch", "hold", "release"]

EXIT_CODE = 75
DEFAULT_LIMIT = 300.0

_state = {"limit": DEFAULT_LIMIT, "thread": None}
_held: set[str] = set()  # run locks this process holds: a stop cannot release them
_active: dict[int, tuple[str, str, float]] = {}
_lock = threading.Lock()
_ids = itertools.count()


def limit() -> float:
    """Seconds a storage operation may wait before the run ends."""
    return _state["limit"]


def set_limit(seconds: float) -> None:
    """Sets the limit, and the request timeouts of gcsfs (fsspec's config) and tensorstore (its curl settings) for
    clients made from now on."""
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or not seconds > 0:
        raise ValueError(f"storage_timeout_s={seconds!r} must be a positive number of seconds (default "
                         f"{DEFAULT_LIMIT:g}).")
    _state["limit"] = float(seconds)
    request = max(2, int(1.5 * seconds))
    import fsspec

    fsspec.config.conf.setdefault("gcs", {})["requests_timeout"] = request
    for name, value in (("TENSORSTORE_CURL_LOW_SPEED_TIME_SECONDS", request),  # < 1 byte/s for that long: fail
                        ("TENSORSTORE_CURL_LOW_SPEED_LIMIT_BYTES", 1),
                        ("TENSORSTORE_CURL_CONNECT_TIMEOUT_SECONDS", request)):
        os.environ.setdefault(name, str(value))


@contextlib.contextmanager
def watch(operation: str, path: object) -> Iterator[None]:
    """Runs the block as one storage operation (`operation` on `path`, e.g. "write", "gs://b/run/metrics.jsonl")
    bounded by `limit()`."""
    _start_thread()
    key = next(_ids)
    with _lock:
        _active[key] = (operation, os.fspath(path) if hasattr(path, "__fspath__") else str(path), time.monotonic())
    try:
        yield
    finally:
        with _lock:
            _active.pop(key, None)


def hold(lock: object) -> None:
    """Notes a run lock this process holds, for the stop line to name (it stays on the store after a stop)."""
    _held.add(os.fspath(lock) if hasattr(lock, "__fspath__") else str(lock))


def release(lock: object) -> None:
    _held.discard(os.fspath(lock) if hasattr(lock, "__fspath__") else str(lock))


def _start_thread() -> None:
    with _lock:
        if _state["thread"] is None:
            _state["thread"] = threading.Thread(target=_run, name="gconv-storage-watchdog", daemon=True)
            _state["thread"].start()


def _run() -> None:
    while True:
        time.sleep(min(1.0, limit() / 20))
        now = time.monotonic()
        with _lock:
            late = [entry for entry in _active.values() if now - entry[2] > limit()]
        if late:
            operation, path, started = min(late, key=lambda entry: entry[2])
            _stop(operation, path, now - started)


def _stop(operation: str, path: str, waited: float) -> None:
    print(f"error: storage stalled: {operation} {path} got no answer in {waited:.0f} s (storage_timeout_s="
          f"{limit():g}). The run stopped; what it wrote before is kept: relaunch the same command to resume once "
          f"the store answers{_lock_note()}.", file=sys.stderr, flush=True)
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    os._exit(EXIT_CODE)


def _lock_note() -> str:
    if not _held:
        return ""
    return (f" (the run lock {', '.join(sorted(_held))} could not be released: a relaunch on this host takes it "
            f"back; from another host, add --takeover)")
