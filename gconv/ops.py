"""Pure-functional grouped convolution and channel shuffle.

Layouts are channel-last throughout: activations `(N, *spatial, C)` and kernels `(*window, C_in // groups, C_out)`
(Flax's layout). Every function composes with `jit`, `vmap`, `grad` and `shard_map`; every check runs on static
shapes, so bad input raises `ValueError` before XLA sees it.
"""
from __future__ import annotations

import functools
import itertools
import json
import math
import operator
from typing import Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from gconv import autotune

IntOrSeq = Union[int, Sequence[int]]
Padding = Union[str, int, Sequence[int], Sequence[tuple[int, int]]]

IMPLS = ("auto", "xla", "blockdiag", "split", "shift", "dot")

__all__ = [
    "IMPLS",
    "candidate_impls",
    "static_impl",
    "grouped_conv",
    "block_diagonal_kernel",
    "grouped_conv_reference",
    "channel_shuffle",
    "channel_unshuffle",
    "shuffle_permutation",
    "normalize_padding",
]


def _per_dim(value: IntOrSeq, nd: int, name: str) -> tuple[int, ...]:
    """An int or a length-`nd` sequence of positive ints, as a tuple."""
    values = (value,) * nd if isinstance(value, int) else tuple(value)
    if len(values) != nd or not all(isinstance(v, int) and v >= 1 for v in values):
        raise ValueError(
            f"{name}={value!r} is not valid for {nd} spatial dim(s): pass a positive int or {nd} positive ints.")
    return values


def normalize_padding(padding: Padding, nd: int) -> str | tuple[tuple[int, int], ...]:
    """"SAME"/"VALID" (any case), an int, `nd` ints or `nd` (low, high) pairs -> a string or `nd` pairs."""
    if isinstance(padding, str):
        if padding.upper() not in ("SAME", "VALID"):
            raise ValueError(f"padding={padding!r} is not valid: use 'SAME', 'VALID', an int or (low, high) pairs.")
        return padding.upper()
    if isinstance(padding, int):
        return ((padding, padding),) * nd
    pads = tuple(padding)
    if len(pads) == nd and all(isinstance(p, int) for p in pads):
        return tuple((p, p) for p in pads)
    if len(pads) == nd and all(len(p) == 2 and all(isinstance(q, int) for q in p) for p in pads):
        return tuple((int(lo), int(hi)) for lo, hi in pads)
    raise ValueError(
        f"padding={padding!r} is not valid for {nd} spatial dim(s): use 'SAME', 'VALID', an int, "
        f"{nd} ints or {nd} (low, high) pairs.")


def _as_groups(groups) -> int:
    """`groups` as a Python int: ints, numpy and concrete JAX integer scalars are accepted."""
    try:
        value = operator.index(groups)
    except TypeError:
        value = None
    if value is None or isinstance(groups, bool) or value < 1:
        raise ValueError(f"groups={groups!r} must be a positive int (1 = dense, C_in = depthwise).")
    return value


def _check_conv_args(x: jax.Array, kernel: jax.Array, groups: int) -> tuple[int, int]:
    """Validates shapes and dtypes for a grouped conv; returns (number of spatial dims, groups as an int)."""
    groups = _as_groups(groups)
    nd = kernel.ndim - 2
    if nd not in (1, 2, 3):
        raise ValueError(
            f"kernel has shape {kernel.shape}: expected (*window, C_in // groups, C_out) with 1, 2 or 3 window dims.")
    if x.ndim != kernel.ndim:
        raise ValueError(
            f"x has rank {x.ndim} (shape {x.shape}) but kernel {kernel.shape} has {nd} window dim(s): "
            f"x must be (N, *spatial, C_in) of rank {nd + 2}.")
    c_in, k_in, c_out = x.shape[-1], kernel.shape[-2], kernel.shape[-1]
    if c_in % groups:
        raise ValueError(
            f"C_in={c_in} is not divisible by groups={groups}: use a groups that divides {c_in} "
            f"(one of {[g for g in range(1, c_in + 1) if c_in % g == 0]}).")
    if c_out % groups:
        raise ValueError(
            f"C_out={c_out} is not divisible by groups={groups}: C_out must be a multiple of groups "
            f"(e.g. {groups * max(1, round(c_out / groups))}).")
    if k_in != c_in // groups:
        raise ValueError(
            f"kernel in-channel axis is {k_in} but C_in // groups = {c_in} // {groups} = {c_in // groups}: "
            f"the kernel must have shape (*window, {c_in // groups}, C_out).")
    if x.dtype != kernel.dtype:
        raise ValueError(f"x is {x.dtype} but kernel is {kernel.dtype}: cast both to one dtype "
                         f"(e.g. kernel.astype(x.dtype)); pass preferred_element_type for a wider output.")
    return nd, groups


def _dimension_numbers(nd: int) -> lax.ConvDimensionNumbers:
    spatial = tuple(range(1, nd + 1))
    return lax.ConvDimensionNumbers(
        lhs_spec=(0, nd + 1) + spatial,  # (N, *spatial, C)
        rhs_spec=(nd + 1, nd) + tuple(range(nd)),  # (*window, I, O)
        out_spec=(0, nd + 1) + spatial)


def grouped_conv(
    x: jax.Array,
    kernel: jax.Array,
    groups: int,
    *,
    strides: IntOrSeq = 1,
    padding: Padding = "SAME",
    dilation: IntOrSeq = 1,
    precision: lax.PrecisionLike = None,
    preferred_element_type: jnp.dtype | None = None,
    impl: str = "auto",
) -> jax.Array:
    """Grouped convolution: `groups` independent convolutions over disjoint channel slices.

    Args:
      x: `(N, *spatial, C_in)`.
      kernel: `(*window, C_in // groups, C_out)`; output channels `[j * C_out/groups, (j+1) * C_out/groups)`
        see only input channels of group `j`. `groups == C_in` is depthwise (`C_out` = multiplier * C_in).
      groups: number of groups; must divide `C_in` and `C_out`.
      strides, dilation: int or one int per spatial dim (`dilation` dilates the kernel).
      padding: "SAME", "VALID", an int, one int per dim, or one `(low, high)` pair per dim.
      impl: the lowering, all computing the same function: "xla" (`feature_group_count`), "blockdiag" (one dense
        conv over a block-diagonal kernel), "split" (one conv per group), "shift" (a sum of shifted multiply-adds,
        one per tap and channel of a group: for depthwise and few-channels-per-group convs), "dot" (1x1 convs as
        a matrix product) or "auto" (default: the fastest for this shape, dtype and backend, measured once and
        cached, forward and backward chosen separately; see `gconv.autotune`; with `GCONV_AUTOTUNE=0` the
        deterministic `static_impl` rule).
    Returns:
      `(N, *spatial_out, C_out)`.
    """
    nd, groups = _check_conv_args(x, kernel, groups)
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not one of {IMPLS}.")
    kwargs = dict(strides=_per_dim(strides, nd, "strides"), padding=normalize_padding(padding, nd),
                  dilation=_per_dim(dilation, nd, "dilation"), precision=precision,
                  preferred_element_type=preferred_element_type)
    if impl != "auto":
        return _lower(impl, x, kernel, groups, nd, **kwargs)
    fwd_impl, bwd_impl = _tuned_impls(x, kernel, groups, nd, kwargs)
    if fwd_impl == bwd_impl:
        return _lower(fwd_impl, x, kernel, groups, nd, **kwargs)
    return _forward_backward(fwd_impl, bwd_impl, groups, nd, kwargs)(x, kernel)


def _lower(impl: str, x: jax.Array, kernel: jax.Array, groups: int, nd: int, **kwargs) -> jax.Array:
    if impl == "split":
        return _split_conv(x, kernel, groups, nd, **kwargs)
    if impl == "shift":
        return _shift_conv(x, kernel, groups, nd, **kwargs)
    if impl == "dot":
        return _dot_conv(x, kernel, groups, nd, **kwargs)
    if impl == "blockdiag" and groups > 1:
        kernel, groups = block_diagonal_kernel(kernel, groups), 1
    return _lax_conv(x, kernel, groups, nd, **kwargs)


# --- choosing a lowering ------------------------------------------------------------------------------------------
# Measured on a 2-core x86 CPU (bench/RESULTS.md): XLA's native grouped and depthwise convs are 5-100x slower than
# the other lowerings there, forward and backward, so they are no CPU candidate. "shift" costs one fused
# multiply-add pass per (tap, channel of a group), so it is a candidate while those terms are few.
_BLOCKDIAG_SMALL, _SPLIT_MAX_GROUPS, _BLOCKDIAG_MAX, _SHIFT_MAX_TERMS = 2**16, 64, 2**24, 72
# Below this many multiply-adds a conv takes well under a millisecond: timing it is mostly noise, and measuring
# (two compiles per candidate) costs more than any choice can win back, so the static rule decides.
AUTOTUNE_MIN_MACS = 2**25


def candidate_impls(kernel_shape: Sequence[int], c_in: int, groups: int, backend: str) -> tuple[str, ...]:
    """The lowerings worth timing for a kernel `(*window, C_in // groups, C_out)` on `backend`."""
    *window, c_group, c_out = kernel_shape
    one_by_one = all(w == 1 for w in window)
    found = ["xla"] if (groups == 1 or backend != "cpu") else []
    if groups > 1 and math.prod(window) * c_in * c_out <= _BLOCKDIAG_MAX:
        found.append("blockdiag")
    if 1 < groups <= _SPLIT_MAX_GROUPS:
        found.append("split")
    if not one_by_one and math.prod(window) * c_group <= _SHIFT_MAX_TERMS:
        found.append("shift")
    if one_by_one:
        found.append("dot")
    return tuple(found) or ("xla",)


def static_impl(kernel_shape: Sequence[int], c_in: int, groups: int, backend: str) -> str:
    """The lowering "auto" takes when measuring is off (`GCONV_AUTOTUNE=0`, tests): a rule of thumb from the
    measurements in bench/RESULTS.md (CPU, and an H100, where XLA's own lowering wins except for grouped 1x1s)."""
    *window, c_group, c_out = kernel_shape
    one_by_one = all(w == 1 for w in window)
    if backend != "cpu":
        return "blockdiag" if one_by_one and groups > 1 and c_in * c_out <= _BLOCKDIAG_MAX else "xla"
    if one_by_one:
        return "dot"
    if c_group == 1 and math.prod(window) <= _SHIFT_MAX_TERMS:
        return "shift"
    if groups == 1:
        return "xla"
    dense_size = math.prod(window) * c_in * c_out
    if dense_size <= _BLOCKDIAG_SMALL:
        return "blockdiag"
    if groups <= _SPLIT_MAX_GROUPS:
        return "split"
    return "blockdiag" if dense_size <= _BLOCKDIAG_MAX else "xla"


def _tuned_impls(x: jax.Array, kernel: jax.Array, groups: int, nd: int, kwargs: dict) -> tuple[str, str]:
    """(forward lowering, backward lowering) for this call's shapes: measured, or the static rule."""
    backend = jax.default_backend()
    candidates = candidate_impls(kernel.shape, x.shape[-1], groups, backend)
    default = static_impl(kernel.shape, x.shape[-1], groups, backend)
    if len(candidates) == 1 or not autotune.enabled():
        return default, default
    out = jax.eval_shape(functools.partial(_lower, default, groups=groups, nd=nd, **kwargs), x, kernel)
    if math.prod(out.shape) * math.prod(kernel.shape[:-1]) < AUTOTUNE_MIN_MACS:
        return default, default
    key = json.dumps([backend, jax.devices()[0].device_kind, jax.__version__, x.shape, str(x.dtype), kernel.shape,
                      str(kernel.dtype), groups, {k: str(v) for k, v in kwargs.items()}])
    conv = lambda impl: functools.partial(_lower, impl, groups=groups, nd=nd, **kwargs)  # noqa: E731
    arrays = []

    def inputs():  # random operands of this call's shapes, made once and only when something is measured
        if not arrays:
            rng = np.random.default_rng(0)
            arrays.extend(jnp.asarray(rng.standard_normal(a.shape), a.dtype) for a in (x, kernel, out))
        return arrays

    def measure_forward(impl: str) -> float:
        with jax.ensure_compile_time_eval():  # run now, even while an outer jit is tracing
            return autotune.time_call(jax.jit(conv(impl)), *inputs()[:2])

    def measure_backward(impl: str) -> float:
        backward = jax.jit(lambda a, k, g: jax.vjp(conv(impl), a, k)[1](g))
        with jax.ensure_compile_time_eval():
            return autotune.time_call(backward, *inputs())

    forward = autotune.pick("forward " + key, candidates, measure_forward, default)
    backward = autotune.pick("backward " + key, candidates, measure_backward, default)
    return forward, backward


def _forward_backward(fwd_impl: str, bwd_impl: str, groups: int, nd: int, kwargs: dict):
    """The conv computed by `fwd_impl`, differentiated through `bwd_impl` (the same linear function)."""

    @jax.custom_vjp
    def conv(x, kernel):
        return _lower(fwd_impl, x, kernel, groups, nd, **kwargs)

    def conv_fwd(x, kernel):
        return conv(x, kernel), (x, kernel)

    def conv_bwd(residuals, g):
        return jax.vjp(lambda a, k: _lower(bwd_impl, a, k, groups, nd, **kwargs), *residuals)[1](g)

    conv.defvjp(conv_fwd, conv_bwd)
    return conv


def _explicit_pads(padding, in_spatial: Sequence[int], window: Sequence[int], strides: Sequence[int],
                   dilation: Sequence[int]) -> tuple[tuple[int, int], ...]:
    pads = normalize_padding(padding, len(window))
    if isinstance(pads, str):
        dilated = [(w - 1) * d + 1 for w, d in zip(window, dilation)]
        pads = tuple(tuple(p) for p in lax.padtype_to_pads(tuple(in_spatial), dilated, tuple(strides), pads))
    return pads


def _pad_spatial(x: jax.Array, pads: Sequence[tuple[int, int]]) -> jax.Array:
    if all(p == (0, 0) for p in pads):
        return x
    config = ((0, 0, 0),) + tuple((lo, hi, 0) for lo, hi in pads) + ((0, 0, 0),)
    return lax.pad(x, jnp.zeros((), x.dtype), config)


def _shift_conv(x: jax.Array, kernel: jax.Array, groups: int, nd: int, **kwargs) -> jax.Array:
    """Sum over taps t and in-group channels i of `shifted_x[t][..., g, i] * kernel[t, i, g, :]`: elementwise
    work that XLA fuses into one loop. The input gradient is autodiff's (pads of the same products); the kernel
    gradient is a `scan` over taps of per-tap reductions, which XLA's CPU backend runs ~10x faster than the
    unrolled reductions autodiff would write."""

    @jax.custom_vjp
    def conv(x, kernel):
        return _shift_forward(x, kernel, groups, nd, **kwargs)

    def conv_bwd(residuals, g):
        x, kernel = residuals
        dx = jax.vjp(lambda a: _shift_forward(a, kernel, groups, nd, **kwargs), x)[1](g)[0]
        return dx, _shift_kernel_grad(x, g, kernel, groups, nd, **kwargs)

    conv.defvjp(lambda x, kernel: (conv(x, kernel), (x, kernel)), conv_bwd)
    return conv(x, kernel)


def _shift_geometry(x: jax.Array, window: Sequence[int], strides, padding, dilation):
    """(padded x, output spatial size) of a conv with these options."""
    xp = _pad_spatial(x, _explicit_pads(padding, x.shape[1:-1], window, strides, dilation))
    out = tuple(max(0, (xp.shape[1 + d] - (w - 1) * dilation[d] - 1) // strides[d] + 1)
                for d, w in enumerate(window))
    return xp, out


def _shift_forward(x: jax.Array, kernel: jax.Array, groups: int, nd: int, *, strides: Sequence[int], padding,
                   dilation: Sequence[int], precision, preferred_element_type) -> jax.Array:
    del precision  # elementwise products are exact in the accumulation dtype
    window, (c_group, c_out) = kernel.shape[:nd], kernel.shape[nd:]
    out_dtype = jnp.dtype(preferred_element_type or x.dtype)
    acc_dtype = jnp.promote_types(out_dtype, jnp.float32)
    xp, out_spatial = _shift_geometry(x, window, strides, padding, dilation)
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


def _shift_kernel_grad(x: jax.Array, g: jax.Array, kernel: jax.Array, groups: int, nd: int, *,
                       strides: Sequence[int], padding, dilation: Sequence[int], precision,
                       preferred_element_type) -> jax.Array:
    """d loss / d kernel of `_shift_forward`: for each tap, sum over (N, *out) of shifted x times `g`."""
    window, (c_group, c_out) = kernel.shape[:nd], kernel.shape[nd:]
    acc_dtype = jnp.promote_types(jnp.promote_types(x.dtype, g.dtype), jnp.float32)
    xp, out_spatial = _shift_geometry(x, window, strides, padding, dilation)
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
        # column sums over a (rows, C_out) view: the reduction XLA's CPU backend vectorises well
        return None, jnp.stack([jnp.sum(p.reshape(-1, c_out), axis=0) for p in products])

    _, grads = lax.scan(tap_grad, None, offsets)  # (taps, C_in // groups, C_out)
    return grads.reshape(kernel.shape).astype(kernel.dtype)


def _dot_conv(x: jax.Array, kernel: jax.Array, groups: int, nd: int, *, strides: Sequence[int], padding,
              dilation: Sequence[int], precision, preferred_element_type) -> jax.Array:
    """A 1x1 conv as a matrix product over the channel axis (per group: a batched product)."""
    window, (c_group, c_out) = kernel.shape[:nd], kernel.shape[nd:]
    if any(w != 1 for w in window):
        raise ValueError(f"impl='dot' computes 1x1 convolutions, but the kernel window is {tuple(window)}: "
                         f"use impl='auto' or another lowering.")
    x = _pad_spatial(x, _explicit_pads(padding, x.shape[1:-1], window, strides, dilation))
    if any(s != 1 for s in strides):
        x = x[(slice(None),) + tuple(slice(None, None, s) for s in strides)]
    k, lead = kernel.reshape(c_group, c_out), x.shape[:-1]
    if groups == 1:  # as one (N * spatial, C_in) x (C_in, C_out) product, whose transposes are plain products too
        y = jnp.matmul(x.reshape(-1, c_group), k, precision=precision, preferred_element_type=preferred_element_type)
        return y.reshape(lead + (c_out,))
    y = jnp.einsum("...gi,igo->...go", x.reshape(lead + (groups, c_group)), k.reshape(c_group, groups, -1),
                   precision=precision, preferred_element_type=preferred_element_type)
    return y.reshape(lead + (c_out,))


def _lax_conv(x: jax.Array, kernel: jax.Array, groups: int, nd: int, *, strides: IntOrSeq, padding: Padding,
              dilation: IntOrSeq, precision: lax.PrecisionLike, preferred_element_type: jnp.dtype | None) -> jax.Array:
    return lax.conv_general_dilated(
        x, kernel,
        window_strides=_per_dim(strides, nd, "strides"),
        padding=normalize_padding(padding, nd),
        rhs_dilation=_per_dim(dilation, nd, "dilation"),
        dimension_numbers=_dimension_numbers(nd),
        feature_group_count=groups,
        precision=precision,
        preferred_element_type=preferred_element_type)


def block_diagonal_kernel(kernel: jax.Array, groups: int) -> jax.Array:
    """The dense kernel `(*window, C_in, C_out)` equal to grouped `kernel: (*window, C_in // groups, C_out)`:
    block `(i, j)` of its channel matrix is group i's filters when i == j and zero otherwise."""
    *window, c_group, c_out = kernel.shape
    blocks = kernel.reshape(*window, c_group, groups, c_out // groups)
    dense = jnp.einsum("...igo,gG->...Gigo", blocks, jnp.eye(groups, dtype=kernel.dtype))
    return dense.reshape(*window, groups * c_group, c_out)


def grouped_conv_reference(x: jax.Array, kernel: jax.Array, groups: int, **conv_args) -> jax.Array:
    """The definition of a grouped conv: split the channels, one dense conv per group, concatenate.

    Same arguments and result as `grouped_conv` (`strides`, `padding`, ...): the reference its other lowerings are
    tested against, and its `impl="split"`.
    """
    if "impl" in conv_args:
        raise ValueError("grouped_conv_reference takes no impl: it is the 'split' lowering; call grouped_conv(impl=...).")
    return grouped_conv(x, kernel, groups, impl="split", **conv_args)


def _split_conv(x: jax.Array, kernel: jax.Array, groups: int, nd: int, **kwargs) -> jax.Array:
    outs = [_lax_conv(xi, ki, 1, nd, **kwargs)
            for xi, ki in zip(jnp.split(x, groups, axis=-1), jnp.split(kernel, groups, axis=-1))]
    return jnp.concatenate(outs, axis=-1)


def _check_shuffle(channels: int, groups: int) -> int:
    groups = _as_groups(groups)
    if channels % groups:
        raise ValueError(
            f"channel_shuffle: {channels} channels are not divisible by groups={groups}: "
            f"use a groups that divides {channels}.")
    return groups


def _channel_axis(x: jax.Array, axis: int) -> int:
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis={axis} is out of range for an array of rank {x.ndim} (shape {x.shape}): use "
                         f"{-x.ndim}..{x.ndim - 1}.")
    return axis % x.ndim


def shuffle_permutation(channels: int, groups: int) -> list[int]:
    """Input channel feeding each output channel of `channel_shuffle` (C=6, g=2 -> [0, 3, 1, 4, 2, 5])."""
    groups = _check_shuffle(channels, groups)
    per = channels // groups
    return [g * per + i for i in range(per) for g in range(groups)]


def channel_shuffle(x: jax.Array, groups: int, axis: int = -1) -> jax.Array:
    """ShuffleNet's channel shuffle: view channels as `(groups, C // groups)`, transpose, flatten.

    Same permutation as `torch.nn.ChannelShuffle(groups)` (there on axis 1): output channel `i * groups + g` is
    input channel `g * C // groups + i`. `x: (..., C, ...)` with C on `axis`; shape is unchanged.
    """
    axis = _channel_axis(x, axis)
    channels = x.shape[axis]
    groups = _check_shuffle(channels, groups)
    shape = x.shape
    x = x.reshape(shape[:axis] + (groups, channels // groups) + shape[axis + 1:])
    x = jnp.swapaxes(x, axis, axis + 1)
    return x.reshape(shape)


def channel_unshuffle(x: jax.Array, groups: int, axis: int = -1) -> jax.Array:
    """Inverse of `channel_shuffle(x, groups, axis)`."""
    channels = x.shape[_channel_axis(x, axis)]
    groups = _check_shuffle(channels, groups)
    return channel_shuffle(x, channels // groups, axis)
