"""One dense conv per group, concatenated: the definition of a grouped conv (`grouped_conv_reference`)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from gconv.ops.lowerings.base import Lowering
from gconv.ops.lowerings.xla import lax_conv

__all__ = ["LOWERING", "MAX_GROUPS"]

MAX_GROUPS = 64  # beyond this many groups, the per-group convs cost more in launches than they save


def _conv(x: jax.Array, kernel: jax.Array, groups: int, nd: int, **kwargs) -> jax.Array:
    outs = [lax_conv(xi, ki, 1, nd, **kwargs)
            for xi, ki in zip(jnp.split(x, groups, axis=-1), jnp.split(kernel, groups, axis=-1))]
    return jnp.concatenate(outs, axis=-1)


def _candidate(kernel_shape, c_in: int, groups: int, backend: str) -> bool:
    return 1 < groups <= MAX_GROUPS


LOWERING = Lowering("split", _conv, _candidate)
