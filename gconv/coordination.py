"""The key-value store of JAX's coordination service, shared by the processes of a multi-process run.

gconv uses it to publish small facts without a collective: process 0's lowering choices (`gconv.autotune`) and
which process failed first (`launch.py`). JAX has no public accessor for it up to 0.11: `jax.distributed` exports
`initialize`, `shutdown` and `is_initialized` only, and `jax.experimental.multihost_utils` offers collectives over
devices, which a process that is failing cannot join. This is the one place gconv reaches into JAX's internals.
"""
from __future__ import annotations

from typing import Any

__all__ = ["client"]


def client() -> Any:
    """The coordination service's client of this process (`key_value_set`, `blocking_key_value_get`,
    `key_value_dir_get`), once `jax.distributed.initialize` has run."""
    from jax._src import distributed

    if distributed.global_state.client is None:
        raise RuntimeError("no coordination service: call jax.distributed.initialize() first (launch.py "
                           "--multiprocess does).")
    return distributed.global_state.client
