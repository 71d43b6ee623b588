"""Arguments of the ops, checked and normalised on static shapes: bad input raises `ValueError` naming the value
and the fix before XLA sees it."""
from __future__ import annotations

import operator
from typing import Sequence, Union

import jax
import jax.numpy as jnp
from jax import lax

IntOrSeq = Union[int, Sequence[int]]
Padding = Union[str, int, Sequence[int], Sequence[tuple[int, int]]]

__all__ = ["IntOrSeq", "Padding", "per_dim", "normalize_padding", "as_groups", "check_conv_args", "explicit_pads",
           "pad_spatial"]


def per_dim(value: IntOrSeq, nd: int, name: str) -> tuple[int, ...]:
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


def as_groups(groups) -> int:
    """`groups` as a Python int: ints, numpy and concrete JAX integer scalars are accepted."""
    try:
        value = operator.index(groups)
    except TypeError:
        value = None
    if value is None or isinstance(groups, bool) or value < 1:
        raise ValueError(f"groups={groups!r} must be a positive int (1 = dense, C_in = depthwise).")
    return value


def check_conv_args(x: jax.Array, kernel: jax.Array, groups: int) -> tuple[int, int]:
    """Validates shapes and dtypes for a grouped conv; returns (number of spatial dims, groups as an int)."""
    groups = as_groups(groups)
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


def explicit_pads(padding, in_spatial: Sequence[int], window: Sequence[int], strides: Sequence[int],
                  dilation: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """`padding` as one (low, high) pair per spatial dim ("SAME"/"VALID" resolved for these sizes)."""
    pads = normalize_padding(padding, len(window))
    if isinstance(pads, str):
        dilated = [(w - 1) * d + 1 for w, d in zip(window, dilation)]
        pads = tuple(tuple(p) for p in lax.padtype_to_pads(tuple(in_spatial), dilated, tuple(strides), pads))
    return pads


def pad_spatial(x: jax.Array, pads: Sequence[tuple[int, int]]) -> jax.Array:
    """`x: (N, *spatial, C)` with zeros added around its spatial dims."""
    if all(p == (0, 0) for p in pads):
        return x
    config = ((0, 0, 0),) + tuple((lo, hi, 0) for lo, hi in pads) + ((0, 0, 0),)
    return lax.pad(x, jnp.zeros((), x.dtype), config)
