"""A sum of shifted multiply-adds, one per tap and channel of a group: for depthwise and few-channels-per-group
convs, where it is elementwise work that XLA fuses into one loop."""
from __future__ import annotations

import itertools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from gconv.ops.args import explicit_pads, pad_spatial
from gconv.ops.lowerings.base import Lowering
from gconv.ops.manual_axes import like_primals

__all__ = ["LOWERING", "MAX_TERMS"]

MAX_TERMS = 72  # taps x channels per group: one fused multiply-add pass each, worth it while they are few


def _conv(x: jax.Array, kernel: jax.Array, groups: int, nd: int, **kwargs) -> jax.Array:
    """Sum over taps t and in-group channels i of `shifted_x[t][..., g, i] * kernel[t, i, g, :]`. The input
    gradient is autodiff's (pads of the same products); the kernel gradient is a `scan` over taps of per-tap,
    per-example reductions (then summed over the examples), which XLA's CPU backend runs ~10x faster than the
    unrolled reductions autodiff would write."""

    @jax.custom_vjp
    def conv(x, kernel):
        return _forward(x, kernel, groups, nd, **kwargs)

    def conv_bwd(residuals, g):
        x, kernel = residuals
        dx = jax.vjp(lambda a: _forward(a, kernel, groups, nd, **kwargs), x)[1](g)[0]
        return like_primals((dx, _kernel_grad(x, g, kernel, groups, nd, **kwargs)), residuals)

    conv.defvjp(lambda x, kernel: (conv(x, kernel), (x, kernel)), conv_bwd)
    return conv(x, kernel)


def _geometry(x: jax.Array, window: Sequence[int], strides, padding, dilation):
    """(padded x, output spatial size) of a conv with these options."""
    xp = pad_spatial(x, explicit_pads(padding, x.shape[1:-1], window, strides, dilation))
    out = tuple(max(0, (xp.shape[1 + d] - (w - 1) * dilation[d] - 1) // strides[d] + 1)
                for d, w in enumerate(window))
    return xp, out


def _forward(x: jax.Array, kernel: jax.Array, groups: int, nd: int, *, strides: Sequence[int], padding,
             dilation: Sequence[int], precision, preferred_element_type) -> jax.Array:
    del precision  # elementwise products are exact in the accumulation dtype
    window, (c_group, c_out) = kernel.shape[:nd], kernel.shape[nd:]
    out_dtype = jnp.dtype(preferred_element_type or x.dtype)
    acc_dtype = jnp.promote_types(out_dtype, jnp.float32)
    xp, out_spatial = _geometry(x, window, strides, padding, dilation)
    n = x.shape[0]
    if 0 in out_spatial:
        return jnp.zeros((n,) + out_spatial + (c_out,), out_dtype)
    taps = kernel.reshape(tuple(window) + (c_group, groups, c_out // groups)).astype(acc_dtype)
    acc = None
    for tap in itertools.product(*map(range, window)):
        start = tuple(t * d for t, d in zip(tap, dilation))
        limit = tuple(s + (o - 1) * st + 1 for s, o, st in zip(start, out_spatial, strides))
        shifted = lax.slice(xp, (0,) + start + (0,), (n,) + limit + (x.shape[-1],), (1,) + tuple(strides) + (1,))
        shifted = shifted.reshape((n,) + out_spatial + (groups, c_group)).astype(acc_dtype)
        for i in range(c_group):
            term = shifted[..., i:i + 1] * taps[tap + (i,)]  # (N, *out, groups, 1) * (groups, C_out // groups)
            acc = term if acc is None else acc + term
    return acc.reshape((n,) + out_spatial + (c_out,)).astype(out_dtype)


def _kernel_grad(x: jax.Array, g: jax.Array, kernel: jax.Array, groups: int, nd: int, *, strides: Sequence[int],
                 padding, dilation: Sequence[int], precision, preferred_element_type) -> jax.Array:
    """d loss / d kernel of `_forward`: for each tap, sum over (N, *out) of shifted x times `g`."""
    window, (c_group, c_out) = kernel.shape[:nd], kernel.shape[nd:]
    acc_dtype = jnp.promote_types(jnp.promote_types(x.dtype, g.dtype), jnp.float32)
    xp, out_spatial = _geometry(x, window, strides, padding, dilation)
    if 0 in out_spatial:
        return jnp.zeros(kernel.shape, kernel.dtype)
    n, span = x.shape[0], tuple((o - 1) * s + 1 for o, s in zip(out_spatial, strides))
    g = g.astype(acc_dtype)
    g_groups = g.reshape(g.shape[:-1] + (groups, c_out // groups))
    offsets = jnp.asarray([[t * d for t, d in zip(tap, dilation)] for tap in itertools.product(*map(range, window))],
                          jnp.int32)

    def tap_grad(_, offset):
        region = lax.dynamic_slice(xp, [0] + [offset[d] for d in range(nd)] + [0], (n,) + span + (x.shape[-1],))
        if any(s != 1 for s in strides):
            region = region[(slice(None),) + tuple(slice(None, None, s) for s in strides)]
        region = region.astype(acc_dtype)
        if c_group == 1 and c_out == groups:  # depthwise: one product of the same shape as g
            products = [region * g]
        else:
            shifted = region.reshape(region.shape[:-1] + (groups, c_group))
            products = [shifted[..., i:i + 1] * g_groups for i in range(c_group)]
        # column sums over each example's (positions, C_out) view: the reduction XLA's CPU backend vectorises well
        return None, jnp.stack([jnp.sum(p.reshape(n, -1, c_out), axis=1) for p in products], axis=1)

    _, grads = lax.scan(tap_grad, None, offsets)  # (taps, N, C_in // groups, C_out)
    # The examples summed after the loop: a batch split over devices is then summed across them once, not per tap.
    return jnp.sum(grads, axis=1).reshape(kernel.shape).astype(kernel.dtype)


def _candidate(kernel_shape, c_in: int, groups: int, backend: str) -> bool:
    *window, c_group, _ = kernel_shape
    return not all(w == 1 for w in window) and math.prod(window) * c_group <= MAX_TERMS


LOWERING = Lowering("shift", _conv, _candidate)
