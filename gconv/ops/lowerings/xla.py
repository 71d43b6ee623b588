"""XLA's own grouped conv: `lax.conv_general_dilated(feature_group_count=groups)`."""
from __future__ import annotations

import jax
from jax import lax

from gconv.ops.lowerings.base import Lowering

__all__ = ["LOWERING", "lax_conv"]


def _dimension_numbers(nd: int) -> lax.ConvDimensionNumbers:
    spatial = tuple(range(1, nd + 1))
    return lax.ConvDimensionNumbers(
        lhs_spec=(0, nd + 1) + spatial,  # (N, *spatial, C)
        rhs_spec=(nd + 1, nd) + tuple(range(nd)),  # (*window, I, O)
        out_spec=(0, nd + 1) + spatial)


def lax_conv(x: jax.Array, kernel: jax.Array, groups: int, nd: int, *, strides, padding, dilation, precision,
             preferred_element_type) -> jax.Array:
    return lax.conv_general_dilated(
        x, kernel, window_strides=strides, padding=padding, rhs_dilation=dilation,
        dimension_numbers=_dimension_numbers(nd), feature_group_count=groups, precision=precision,
        preferred_element_type=preferred_element_type)


def _candidate(kernel_shape, c_in: int, groups: int, backend: str) -> bool:
    # Measured on a 2-core x86 CPU (bench/RESULTS.md): XLA's native grouped and depthwise convs are 5-100x slower
    # than the other lowerings there, forward and backward, so they are no CPU candidate.
    return groups == 1 or backend != "cpu"


LOWERING = Lowering("xla", lax_conv, _candidate)
