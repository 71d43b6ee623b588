"""Measured choice among equivalent implementations, as cuDNN's benchmark mode and Triton's autotuner make it.

`pick(key, candidates, measure, default)` times each candidate once per key (`measure(name) -> seconds`), keeps
the fastest in memory and, when `GCONV_AUTOTUNE_CACHE` names a JSON file, on disk for later processes.
`GCONV_AUTOTUNE=0` turns measuring off: `pick` then returns `default` (a deterministic static rule), as it does
inside `with static():` (shape-only traces such as `jax.eval_shape` or `model.init`, where timing would be wasted).

One job, one set of choices: in a multi-process job only process 0 measures (or reads its cache), and the others
receive each choice through the coordination service's key-value store, so every host compiles the same program.
A run records the choices it used (`recording()`, written to the run directory as `lowerings.json`) and a resumed
run takes them back (`use()`) before anything is measured, so it lowers as the run it resumes.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import statistics
import tempfile
import threading
import time
from typing import Any, Callable, Iterator, Sequence

import jax

__all__ = ["ENV_ENABLE", "ENV_CACHE", "enabled", "static", "pick", "time_call", "clear", "measurements", "given", "use",
           "recording", "choices"]

ENV_ENABLE, ENV_CACHE = "GCONV_AUTOTUNE", "GCONV_AUTOTUNE_CACHE"
SHARE_TIMEOUT_MS = 30 * 60 * 1000  # how long the other processes wait for process 0 to measure one shape
_memory: dict[str, str] = {}
_given: dict[str, str] = {}  # a run's recorded choices (`use`): taken before measuring, even with measuring off
_recorders: list[dict[str, str]] = []
_lock = threading.RLock()  # `pick` records a choice (`_chose`) while holding it
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


def choices() -> dict[str, str]:
    """This process's choices so far ({key: lowering}: measured, cached or received)."""
    with _lock:
        return dict(_memory)


def clear() -> None:
    """Forgets the in-memory and given choices (the disk cache stays)."""
    with _lock:
        _memory.clear()
        _given.clear()
        _measured.clear()


def given() -> bool:
    """Whether choices are given (`use`): they apply even with measuring off."""
    return bool(_given)


@contextlib.contextmanager
def use(choices: dict[str, str]) -> Iterator[None]:
    """Within this block, `choices` ({key: lowering}, a run's `lowerings.json`) are given: `pick` returns them for
    their keys without measuring, whether measuring is on or off."""
    with _lock:
        before = dict(_given)
        _given.update(choices)
    try:
        yield
    finally:
        with _lock:
            _given.clear()
            _given.update(before)


@contextlib.contextmanager
def recording() -> Iterator[dict[str, str]]:
    """Within this block, every choice `pick` makes (measured, cached, given or received) is added to the yielded
    dict: the choices a run's programs were compiled with."""
    used: dict[str, str] = {}
    with _lock:
        _recorders.append(used)
    try:
        yield used
    finally:
        with _lock:
            _recorders.remove(used)


def _chose(key: str, choice: str) -> str:
    with _lock:
        for used in _recorders:
            used[key] = choice
    return choice


def _shared(key: str, choose: Callable[[], str]) -> str:
    """`choose()` on process 0, published to the others; on the others, process 0's choice, waited for."""
    if jax.process_count() == 1:
        return choose()
    from gconv.coordination import client as coordination_client

    client = coordination_client()
    name = "gconv/lowering/" + hashlib.sha256(key.encode()).hexdigest()
    if jax.process_index() == 0:
        choice = choose()
        client.key_value_set(name, choice)
        return choice
    return client.blocking_key_value_get(name, SHARE_TIMEOUT_MS)


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


def pick(key: str, candidates: Sequence[str], measure: Callable[[str], float], default: str,
         known: Callable[[str], str | None] | None = None) -> str:
    """The fastest of `candidates` for `key` (measured once, then cached; in a multi-process job, process 0's);
    a given choice (`use`) first; `default` when measuring is off. `known(key)`: a choice measured before (a
    shipped table, `gconv.ops.lowering_table`), taken after the caches and instead of measuring."""
    if len(candidates) == 1:
        return candidates[0]
    with _lock:
        given = _given.get(key)
    if given in candidates:
        return _chose(key, given)
    if not enabled():
        return default
    with _lock:
        if key in _memory:
            return _chose(key, _memory[key])
    choice = _shared(key, lambda: _choose(key, candidates, measure, known))
    with _lock:
        _memory[key] = choice
    return _chose(key, choice)


def _choose(key: str, candidates: Sequence[str], measure: Callable[[str], float],
            known: Callable[[str], str | None] | None = None) -> str:
    """This process's choice for `key`: from the disk cache, else a known one, else measured (and cached)."""
    path = os.environ.get(ENV_CACHE)
    if path:
        stored = _read_disk(path).get(key)
        if stored in candidates:
            return stored
    stored = known(key) if known is not None else None
    if stored in candidates:
        return stored
    times = {name: measure(name) for name in candidates}
    choice = min(times, key=times.get)
    with _lock:
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
