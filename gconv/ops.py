"""Pure-functional grouped convolution and channel shuffle.

Layouts are channel-last throughout: activations `(N, *spatial, C)` and kernels `(*window, C_in // groups, C_out)`
(Flax's layout). Every function composes with `jit`, `vmap`, `grad` and `shard_map`; every check runs on static
shapes, so bad input raises `ValueError` before XLA sees it.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence, Union

import jax
import jax.numpy as jnp
from jax import lax

IntOrSeq = Union[int, Sequence[int]]
Padding = Union[str, int, Sequence[int], Sequence[tuple[int, int]]]

IMPLS = ("auto", "xla", "blockdiag", "split")
# On the CPU, XLA's native grouped conv is up to 60x slower forward+backward than the same function as one dense
# conv over a block-diagonal kernel or as one conv per group (bench/RESULTS.md). "auto" takes the block-diagonal
# kernel while it is small, one conv per group for up to 64 groups, the block-diagonal kernel again below 64 MB.
_BLOCKDIAG_SMALL, _SPLIT_MAX_GROUPS, _BLOCKDIAG_MAX = 2**16, 64, 2**24


def _auto_impl(kernel_shape: tuple[int, ...], c_in: int, groups: int) -> str:
    if groups == 1 or jax.default_backend() != "cpu":
        return "xla"
    dense_size = math.prod(kernel_shape[:-2]) * c_in * kernel_shape[-1]
    if dense_size <= _BLOCKDIAG_SMALL:
        return "blockdiag"
    if groups <= _SPLIT_MAX_GROUPS:
        return "split"
    return "blockdiag" if dense_size <= _BLOCKDIAG_MAX else "xla"

__all__ = [
    "IMPLS",
    "grouped_conv",
    "block_diagonal_kernel",
    "grouped_conv_reference",
    "channel_shuffle",
    "channel_unshuffle",
    "shuffle_permutation",
    "normalize_padding",
    "model_parallel_input",
    "model_parallel_output",
    "sharded_channel_shuffle",
    "gather_channels",
    "local_channels",
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


def _check_conv_args(x: jax.Array, kernel: jax.Array, groups: int) -> int:
    """Validates shapes for a grouped conv; returns the number of spatial dims."""
    if not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups={groups!r} must be a positive int (1 = dense, C_in = depthwise).")
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
    return nd


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
        conv over a block-diagonal kernel: `groups` times the MACs, but far faster on the CPU), "split" (one conv per
        group) or "auto" (on the CPU the faster of blockdiag and split by shape; elsewhere xla).
    Returns:
      `(N, *spatial_out, C_out)`.
    """
    nd = _check_conv_args(x, kernel, groups)
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not one of {IMPLS}.")
    if impl == "auto":
        impl = _auto_impl(kernel.shape, x.shape[-1], groups)
    kwargs = dict(strides=strides, padding=padding, dilation=dilation, precision=precision,
                  preferred_element_type=preferred_element_type)
    if impl == "split":
        return grouped_conv_reference(x, kernel, groups, **kwargs)
    if impl == "blockdiag" and groups > 1:
        kernel, groups = block_diagonal_kernel(kernel, groups), 1
    return _lax_conv(x, kernel, groups, nd, **kwargs)


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


def grouped_conv_reference(
    x: jax.Array,
    kernel: jax.Array,
    groups: int,
    *,
    strides: IntOrSeq = 1,
    padding: Padding = "SAME",
    dilation: IntOrSeq = 1,
    precision: lax.PrecisionLike = None,
    preferred_element_type: jnp.dtype | None = None,
) -> jax.Array:
    """The definition of a grouped conv: split the channels, one dense conv per group, concatenate.

    Same arguments and result as `grouped_conv`: the reference its other lowerings are tested against, and its
    `impl="split"`.
    """
    nd = _check_conv_args(x, kernel, groups)
    kwargs = dict(strides=strides, padding=padding, dilation=dilation, precision=precision,
                  preferred_element_type=preferred_element_type)
    outs = [_lax_conv(xi, ki, 1, nd, **kwargs)
            for xi, ki in zip(jnp.split(x, groups, axis=-1), jnp.split(kernel, groups, axis=-1))]
    return jnp.concatenate(outs, axis=-1)


def _check_shuffle(channels: int, groups: int) -> None:
    if not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups={groups!r} must be a positive int.")
    if channels % groups:
        raise ValueError(
            f"channel_shuffle: {channels} channels are not divisible by groups={groups}: "
            f"use a groups that divides {channels}.")


def shuffle_permutation(channels: int, groups: int) -> list[int]:
    """Input channel feeding each output channel of `channel_shuffle` (C=6, g=2 -> [0, 3, 1, 4, 2, 5])."""
    _check_shuffle(channels, groups)
    per = channels // groups
    return [g * per + i for i in range(per) for g in range(groups)]


def channel_shuffle(x: jax.Array, groups: int, axis: int = -1) -> jax.Array:
    """ShuffleNet's channel shuffle: view channels as `(groups, C // groups)`, transpose, flatten.

    Same permutation as `torch.nn.ChannelShuffle(groups)` (there on axis 1): output channel `i * groups + g` is
    input channel `g * C // groups + i`. `x: (..., C, ...)` with C on `axis`; shape is unchanged.
    """
    axis = axis % x.ndim
    channels = x.shape[axis]
    _check_shuffle(channels, groups)
    shape = x.shape
    x = x.reshape(shape[:axis] + (groups, channels // groups) + shape[axis + 1:])
    x = jnp.swapaxes(x, axis, axis + 1)
    return x.reshape(shape)


def channel_unshuffle(x: jax.Array, groups: int, axis: int = -1) -> jax.Array:
    """Inverse of `channel_shuffle(x, groups, axis)`."""
    channels = x.shape[axis % x.ndim]
    _check_shuffle(channels, groups)
    return channel_shuffle(x, channels // groups, axis)


# --- collectives for group parallelism (inside shard_map over a `model` axis) ------------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def model_parallel_input(x: jax.Array, axis_name: str) -> jax.Array:
    """Identity forward; gradients summed over `axis_name` backward. Marks a replicated activation entering a
    region whose devices each compute a different part (Megatron's "f")."""
    return x


def _mpi_fwd(x, axis_name):
    return x, None


def _mpi_bwd(axis_name, _, g):
    return (jax.lax.psum(g, axis_name),)


model_parallel_input.defvjp(_mpi_fwd, _mpi_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def model_parallel_output(x: jax.Array, axis_name: str) -> jax.Array:
    """Sum of the devices' partial results over `axis_name` forward; identity backward (Megatron's "g")."""
    return jax.lax.psum(x, axis_name)


def _mpo_fwd(x, axis_name):
    return jax.lax.psum(x, axis_name), None


def _mpo_bwd(axis_name, _, g):
    return (g,)


model_parallel_output.defvjp(_mpo_fwd, _mpo_bwd)


def sharded_channel_shuffle(x: jax.Array, groups: int, axis_name: str, axis_size: int) -> jax.Array:
    """`channel_shuffle` of channels split in contiguous blocks over `axis_name`, as one `all_to_all`.

    `x: (..., C / axis_size)` holds `groups / axis_size` whole groups; the result holds this device's block of the
    shuffled channels. Group size `C / groups` must be divisible by `axis_size`.
    """
    local_groups = groups // axis_size
    if groups % axis_size or x.shape[-1] % local_groups or (x.shape[-1] // local_groups) % axis_size:
        raise ValueError(f"sharded_channel_shuffle: groups={groups} with {x.shape[-1]} local channels cannot be split "
                         f"over {axis_size} devices: groups and the group size must be divisible by {axis_size}.")
    per_group = x.shape[-1] // local_groups
    lead = x.shape[:-1]
    x = x.reshape(lead + (local_groups, axis_size, per_group // axis_size))
    x = jax.lax.all_to_all(x, axis_name, split_axis=x.ndim - 2, concat_axis=x.ndim - 3, tiled=True)
    x = x.reshape(lead + (groups, per_group // axis_size))
    return jnp.swapaxes(x, -1, -2).reshape(lead + (groups * per_group // axis_size,))


def gather_channels(x: jax.Array, axis_name: str) -> jax.Array:
    """All devices' channel blocks concatenated in device order: `(..., C / n) -> (..., C)`."""
    return jax.lax.all_gather(x, axis_name, axis=x.ndim - 1, tiled=True)


def local_channels(x: jax.Array, axis_name: str, axis_size: int) -> jax.Array:
    """This device's contiguous block of a replicated `(..., C)`: `(..., C / axis_size)`."""
    size = x.shape[-1] // axis_size
    return jax.lax.dynamic_slice_in_dim(x, jax.lax.axis_index(axis_name) * size, size, axis=x.ndim - 1)
