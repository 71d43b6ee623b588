"""A 1x1 conv as a matrix product over the channel axis (per group: a batched product)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from gconv.ops.args import explicit_pads, pad_spatial
from gconv.ops.lowerings.base import Lowering

__all__ = ["LOWERING"]


def _conv(x: jax.Array, kernel: jax.Array, groups: int, nd: int, *, strides, padding, dilation, precision,
          preferred_element_type) -> jax.Array:
    window, (c_group, c_out) = kernel.shape[:nd], kernel.shape[nd:]
    if any(w != 1 for w in window):
        raise ValueError(f"impl='dot' computes 1x1 convolutions, but the kernel window is {tuple(window)}: "
                         f"use impl='auto' or another lowering.")
    x = pad_spatial(x, explicit_pads(padding, x.shape[1:-1], window, strides, dilation))
    if any(s != 1 for s in strides):
        x = x[(slice(None),) + tuple(slice(None, None, s) for s in strides)]
    k, lead = kernel.reshape(c_group, c_out), x.shape[:-1]
    if groups == 1:  # as one (N * spatial, C_in) x (C_in, C_out) product, whose transposes are plain products too
        y = jnp.matmul(x.reshape(-1, c_group), k, precision=precision, preferred_element_type=preferred_element_type)
        return y.reshape(lead + (c_out,))
    y = jnp.einsum("...gi,igo->...go", x.reshape(lead + (groups, c_group)), k.reshape(c_group, groups, -1),
                   precision=precision, preferred_element_type=preferred_element_type)
    return y.reshape(lead + (c_out,))


def _candidate(kernel_shape, c_in: int, groups: int, backend: str) -> bool:
    return all(w == 1 for w in kernel_shape[:-2])


LOWERING = Lowering("dot", _conv, _candidate)
