"""One dense conv over a block-diagonal kernel: the grouped kernel with zeros between its groups."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from gconv.ops.lowerings.base import Lowering
from gconv.ops.lowerings.xla import lax_conv

__all__ = ["LOWERING", "block_diagonal_kernel", "MAX_DENSE_SIZE"]

MAX_DENSE_SIZE = 2**24  # dense kernel entries (window x C_in x C_out) above which the zeros cost too much memory


def block_diagonal_kernel(kernel: jax.Array, groups: int) -> jax.Array:
    """The dense kernel `(*window, C_in, C_out)` equal to grouped `kernel: (*window, C_in // groups, C_out)`:
    block `(i, j)` of its channel matrix is group i's filters when i == j and zero otherwise."""
    *window, c_group, c_out = kernel.shape
    blocks = kernel.reshape(*window, c_group, groups, c_out // groups)
    dense = jnp.einsum("...igo,gG->...Gigo", blocks, jnp.eye(groups, dtype=kernel.dtype))
    return dense.reshape(*window, groups * c_group, c_out)


def _conv(x: jax.Array, kernel: jax.Array, groups: int, nd: int, **kwargs) -> jax.Array:
    if groups > 1:
        kernel, groups = block_diagonal_kernel(kernel, groups), 1
    return lax_conv(x, kernel, groups, nd, **kwargs)


def _candidate(kernel_shape, c_in: int, groups: int, backend: str) -> bool:
    *window, _, c_out = kernel_shape
    return groups > 1 and math.prod(window) * c_in * c_out <= MAX_DENSE_SIZE


LOWERING = Lowering("blockdiag", _conv, _candidate)
