"""Measured choice among equivalent implementations, as cuDNN's benchmark mode and Triton's autotuner make it.

`pick(key, candidates, measure, default)` times each candidate once per key (`measure(name) -> seconds`), keeps
the fastest in memory and, when `GCONV_AUTOTUNE_CACHE` names a JSON file, on disk for later processes.
`GCONV_AUTOTUNE=0` turns measuring off: `pick` then returns `default` (a deterministic static rule), as it does
inside `with static():` (shape-only traces such as `jax.eval_shape` or `model.init`, where timing would be wasted).
"""
from __future__ import annotations

import contextlib
import json
import os
import statistics
import tempfile
import threading
import time
from typing import Any, Callable, Iterator, Sequence

import jax

__all__ = ["ENV_ENABLE", "ENV_CACHE", "enabled", "static", "pick", "time_call", "clear", "measurements"]

ENV_ENABLE, ENV_CACHE = "GCONV_AUTOTUNE", "GCONV_AUTOTUNE_CACHE"
_memory: dict[str, str] = {}
_lock = threading.Lock()
_local = threading.local()
_measured: list[str] = []  # keys measured in this process, in order (for tests and logs)


def enabled() -> bool:
    """Whether `pick` measures: `GCONV_AUTOTUNE` is not "0" and no `static()` block is active on this thread."""
    return os.environ.get(ENV_ENABLE, "1") != "0" and not getattr(_local, "static_depth", 0)


@contextlib.contextmanager
def static() -> Iterator[None]:
    """Within this block, `pick` returns its static default without measuring or caching."""
    _local.static_depth = getattr(_local, "static_depth", 0) + 1
    try:
        yield
    finally:
        _local.static_depth -= 1


def measurements() -> list[str]:
    """Keys measured so far in this process."""
    return list(_measured)


def clear() -> None:
    """Forgets the in-memory choices (the disk cache stays)."""
    with _lock:
        _memory.clear()
        _measured.clear()


def _read_disk(path: str) -> dict[str, str]:
    try:
        with open(path) as f:
            entries = json.load(f)
        return entries if isinstance(entries, dict) else {}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):  # a torn or foreign file: measure again and rewrite it
        return {}


def _write_disk(path: str, key: str, choice: str) -> None:
    """Merges one entry into the JSON cache, atomically (temporary file + rename)."""
    entries = _read_disk(path)
    entries[key] = choice
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".autotune-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(entries, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def pick(key: str, candidates: Sequence[str], measure: Callable[[str], float], default: str) -> str:
    """The fastest of `candidates` for `key` (measured once, then cached); `default` when measuring is off."""
    if len(candidates) == 1:
        return candidates[0]
    if not enabled():
        return default
    with _lock:
        if key in _memory:
            return _memory[key]
    path = os.environ.get(ENV_CACHE)
    if path:
        stored = _read_disk(path).get(key)
        if stored in candidates:
            with _lock:
                _memory[key] = stored
            return stored
    times: dict[str, float] = {}
    for name in candidates:
        times[name] = measure(name)
    choice = min(times, key=times.get)
    with _lock:
        _memory[key] = choice
        _measured.append(key)
    if path:
        _write_disk(path, key, choice)
    return choice


def time_call(fn: Callable[..., Any], *args: Any, min_seconds: float = 0.05, max_repeats: int = 10) -> float:
    """Median seconds of `fn(*args)` after one warm-up (compile) call; repeats until `min_seconds` have passed or
    `max_repeats` runs, whichever comes first."""
    jax.block_until_ready(fn(*args))
    times: list[float] = []
    while len(times) < max_repeats and sum(times) < min_seconds:
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)
