"""A 1x1 conv as a matrix product over the channel axis (per group: a batched product)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from gconv.ops.args import explicit_pads, pad_spatial
from gconv.ops.lowerings.base import Lowering
from gconv.ops.manual_axes import like_primals

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
        y = _product(x.reshape(-1, c_group), k, precision, preferred_element_type)
        return y.reshape(lead + (c_out,))
    y = jnp.einsum("...gi,igo->...go", x.reshape(lead + (groups, c_group)), k.reshape(c_group, groups, -1),
                   precision=precision, preferred_element_type=preferred_element_type)
    return y.reshape(lead + (c_out,))


def _product(x: jax.Array, k: jax.Array, precision, preferred_element_type) -> jax.Array:
    """`x @ k`, `(M, C_in) x (C_in, C_out) -> (M, C_out)`. Traced under a mesh of several devices, its kernel
    gradient is computed in the kernel's own layout, `x^T g: (C_in, C_out)` (a custom VJP: reverse-mode autodiff
    only). Autodiff's transpose computes `(g^T x)^T`; XLA folds that transpose into the product unless something
    sits between them, as the sum over devices of a kernel used on a split batch does: then the gradient crosses the
    devices as `(C_out, C_in)` and every later use of it transposes it (bench/RESULTS.md). Elsewhere the plain
    product, which every autodiff mode goes through."""
    dims = {"precision": precision, "preferred_element_type": preferred_element_type}
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return jnp.matmul(x, k, **dims)

    @jax.custom_vjp
    def product(x, k):
        return jnp.matmul(x, k, **dims)

    def product_bwd(residuals, g):
        x, k = residuals
        dx = lax.dot_general(g, k, (((1,), (1,)), ((), ())), **dims)  # (M, C_in)
        dk = lax.dot_general(x, g, (((0,), (0,)), ((), ())), **dims)  # (C_in, C_out)
        return like_primals((dx.astype(x.dtype), dk.astype(k.dtype)), residuals)

    product.defvjp(lambda x, k: (product(x, k), (x, k)), product_bwd)
    return product(x, k)


def _candidate(kernel_shape, c_in: int, groups: int, backend: str) -> bool:
    return all(w == 1 for w in kernel_shape[:-2])


LOWERING = Lowering("dot", _conv, _candidate)
