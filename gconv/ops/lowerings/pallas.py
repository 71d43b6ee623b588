"""Grouped convs as Pallas kernels: implicit GEMMs with the groups in the grid, forward, input gradient and weight
gradient, for 2-D convs (any window, stride and dilation) with more than one channel per group.

Forward: program (n, g) computes image n's output channels of group g as a sum over the window's taps of
`(Ho*Wo, C_in/G) @ (C_in/G, C_out/G)` products, reading each tap's window of the padded input. A stride s is
handled by splitting the padded input into its s x s phases first, so every tap reads a contiguous window.
Input gradient: the same kernel on the output gradient, dilated by the stride and padded by the window, with the
window flipped and each group's kernel transposed. Weight gradient: program g sums `patch^T @ dy` over every image
and output position of group g, one product per tap.

On a GPU Pallas compiles the kernels through Triton; on the CPU they run in Pallas's interpreter (how the tests
check them against `grouped_conv_reference`). "auto" times this lowering on GPUs only.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from gconv.ops.args import explicit_pads, pad_spatial
from gconv.ops.lowerings.base import Lowering
from gconv.ops.manual_axes import like_primals

__all__ = ["LOWERING", "forward", "input_gradient", "weight_gradient"]


def _interpret() -> bool:
    return jax.default_backend() not in ("gpu", "tpu")


def _phases(xp: jax.Array, strides: tuple[int, int], groups: int) -> jax.Array:
    """`(N, Hp, Wp, C)` -> `(sh*sw, N, ceil(Hp/sh), ceil(Wp/sw), G, C/G)`: phase `a*sw + b` holds rows a, a+sh, ...
    and columns b, b+sw, ..."""
    sh, sw = strides
    n, hp, wp, c = xp.shape
    xp = jnp.pad(xp, ((0, 0), (0, -hp % sh), (0, -wp % sw), (0, 0)))
    hq, wq = xp.shape[1] // sh, xp.shape[2] // sw
    xp = xp.reshape(n, hq, sh, wq, sw, groups, c // groups)
    return xp.transpose(2, 4, 0, 1, 3, 5, 6).reshape(sh * sw, n, hq, wq, groups, c // groups)


def _taps(window: tuple[int, int], strides: tuple[int, int], dilation: tuple[int, int]):
    """(i, j, phase, row offset, column offset) of every tap of the window: tap (i, j) of output (ho, wo) reads
    padded input (ho*sh + i*dh, wo*sw + j*dw), which is phase `(i*dh % sh, j*dw % sw)` at (ho + i*dh // sh, ...)."""
    (kh, kw), (sh, sw), (dh, dw) = window, strides, dilation
    return [(i, j, (i * dh % sh) * sw + j * dw % sw, i * dh // sh, j * dw // sw) for i in range(kh) for j in range(kw)]


def _forward_kernel(x_ref, w_ref, o_ref, *, taps, out_hw, precision):
    ho, wo = out_hw
    cg, og = w_ref.shape[-2:]
    acc = jnp.zeros((ho * wo, og), jnp.float32)
    for i, j, phase, a, b in taps:
        patch = x_ref[phase, 0, a:a + ho, b:b + wo, 0, :].reshape(ho * wo, cg)
        acc += jnp.dot(patch, w_ref[0, i, j], precision=precision, preferred_element_type=jnp.float32)
    o_ref[0, :, :, 0, :] = acc.reshape(ho, wo, og).astype(o_ref.dtype)


def _weight_kernel(x_ref, dy_ref, o_ref, *, taps, out_hw, precision):
    ho, wo = out_hw
    n, cg = x_ref.shape[1], x_ref.shape[-1]
    dy = dy_ref[:, :, :, 0, :].reshape(n * ho * wo, -1)
    for i, j, phase, a, b in taps:
        patch = x_ref[phase, :, a:a + ho, b:b + wo, 0, :].reshape(n * ho * wo, cg)
        o_ref[0, i, j] = jnp.dot(patch.T, dy, precision=precision,
                                 preferred_element_type=jnp.float32).astype(o_ref.dtype)


def _out_size(padded: int, window: int, stride: int, dilation: int) -> int:
    return (padded - (window - 1) * dilation - 1) // stride + 1


def forward(x: jax.Array, kernel: jax.Array, groups: int, strides: tuple[int, int],
            pads: tuple[tuple[int, int], ...], dilation: tuple[int, int] = (1, 1), precision=None,
            out_dtype=None) -> jax.Array:
    """`x: (N, H, W, C_in)`, `kernel: (kh, kw, C_in/G, C_out)`, explicit `pads` -> `(N, Ho, Wo, C_out)`."""
    kh, kw, cg, c_out = kernel.shape
    og = c_out // groups
    xp = pad_spatial(x, pads)
    n = x.shape[0]
    ho, wo = (_out_size(xp.shape[1], kh, strides[0], dilation[0]),
              _out_size(xp.shape[2], kw, strides[1], dilation[1]))
    phases = _phases(xp, strides, groups)
    w = kernel.reshape(kh, kw, cg, groups, og).transpose(3, 0, 1, 2, 4)  # (G, kh, kw, C_in/G, C_out/G)
    out = pl.pallas_call(
        functools.partial(_forward_kernel, taps=_taps((kh, kw), strides, dilation), out_hw=(ho, wo),
                          precision=precision),
        grid=(n, groups),
        in_specs=[pl.BlockSpec((phases.shape[0], 1) + phases.shape[2:4] + (1, cg), lambda i, g: (0, i, 0, 0, g, 0)),
                  pl.BlockSpec((1, kh, kw, cg, og), lambda i, g: (g, 0, 0, 0, 0))],
        out_specs=pl.BlockSpec((1, ho, wo, 1, og), lambda i, g: (i, 0, 0, g, 0)),
        out_shape=jax.ShapeDtypeStruct((n, ho, wo, groups, og), out_dtype or x.dtype),
        interpret=_interpret(),
    )(phases, w)
    return out.reshape(n, ho, wo, c_out)


def input_gradient(dy: jax.Array, kernel: jax.Array, groups: int, strides: tuple[int, int],
                   pads: tuple[tuple[int, int], ...], in_hw: tuple[int, int], dilation: tuple[int, int] = (1, 1),
                   precision=None, out_dtype=None) -> jax.Array:
    """The cotangent of `forward`'s `x` for the output cotangent `dy: (N, Ho, Wo, C_out)`: `(N, H, W, C_in)`."""
    kh, kw, cg, c_out = kernel.shape
    og = c_out // groups
    (sh, sw), ((lo_h, hi_h), (lo_w, hi_w)) = strides, pads
    eh, ew = (kh - 1) * dilation[0], (kw - 1) * dilation[1]  # the dilated window's extent - 1
    hp, wp = in_hw[0] + lo_h + hi_h, in_hw[1] + lo_w + hi_w
    n, ho, wo, _ = dy.shape
    dilated = jnp.zeros((n, (ho - 1) * sh + 1, (wo - 1) * sw + 1, c_out), dy.dtype).at[:, ::sh, ::sw].set(dy)
    padded = jnp.pad(dilated, ((0, 0), (eh, hp - dilated.shape[1]), (ew, wp - dilated.shape[2]), (0, 0)))
    flipped = kernel[::-1, ::-1].reshape(kh, kw, cg, groups, og).transpose(0, 1, 4, 3, 2)  # (kh, kw, og, G, cg)
    dxp = forward(padded, flipped.reshape(kh, kw, og, groups * cg), groups, (1, 1), ((0, 0), (0, 0)), dilation,
                  precision, out_dtype)
    return dxp[:, lo_h:lo_h + in_hw[0], lo_w:lo_w + in_hw[1]]


def weight_gradient(x: jax.Array, dy: jax.Array, window: tuple[int, int], groups: int, strides: tuple[int, int],
                    pads: tuple[tuple[int, int], ...], dilation: tuple[int, int] = (1, 1), precision=None,
                    out_dtype=None) -> jax.Array:
    """The cotangent of `forward`'s kernel: `(kh, kw, C_in/G, C_out)`."""
    kh, kw = window
    n, ho, wo, c_out = dy.shape
    og, cg = c_out // groups, x.shape[-1] // groups
    phases = _phases(pad_spatial(x, pads), strides, groups)
    dy = dy.reshape(n, ho, wo, groups, og)
    out = pl.pallas_call(
        functools.partial(_weight_kernel, taps=_taps(window, strides, dilation), out_hw=(ho, wo),
                          precision=precision),
        grid=(groups,),
        in_specs=[pl.BlockSpec(phases.shape[:4] + (1, cg), lambda g: (0, 0, 0, 0, g, 0)),
                  pl.BlockSpec((n, ho, wo, 1, og), lambda g: (0, 0, 0, g, 0))],
        out_specs=pl.BlockSpec((1, kh, kw, cg, og), lambda g: (g, 0, 0, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((groups, kh, kw, cg, og), out_dtype or x.dtype),
        interpret=_interpret(),
    )(phases, dy)
    return out.transpose(1, 2, 3, 0, 4).reshape(kh, kw, cg, c_out)


def _conv(x: jax.Array, kernel: jax.Array, groups: int, nd: int, *, strides, padding, dilation, precision=None,
          preferred_element_type=None) -> jax.Array:
    if nd != 2:
        raise ValueError(f"impl='pallas' computes 2-D convs (got {nd}-D): use impl='xla' or 'auto'.")
    pads = explicit_pads(padding, x.shape[1:3], kernel.shape[:2], strides, dilation)
    if any(p < 0 for pair in pads for p in pair):
        raise ValueError(f"impl='pallas' takes non-negative padding (got {pads}): use impl='xla'.")
    window, in_hw, strides, dilation = tuple(kernel.shape[:2]), tuple(x.shape[1:3]), tuple(strides), tuple(dilation)

    @jax.custom_vjp
    def conv(x, kernel):
        return forward(x, kernel, groups, strides, pads, dilation, precision, preferred_element_type)

    def conv_fwd(x, kernel):
        return conv(x, kernel), (x, kernel)

    def conv_bwd(residuals, dy):
        x, kernel = residuals
        return like_primals((input_gradient(dy, kernel, groups, strides, pads, in_hw, dilation, precision, x.dtype),
                             weight_gradient(x, dy, window, groups, strides, pads, dilation, precision, kernel.dtype)),
                            residuals)

    conv.defvjp(conv_fwd, conv_bwd)
    return conv(x, kernel)


def _candidate(kernel_shape, c_in: int, groups: int, backend: str) -> bool:
    return backend == "gpu" and len(kernel_shape) == 4 and groups > 1 and kernel_shape[-2] > 1


LOWERING = Lowering("pallas", _conv, _candidate)
