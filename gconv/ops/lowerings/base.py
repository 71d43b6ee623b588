"""What a lowering of a grouped conv is: a name, the function, and when it is worth timing."""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax

__all__ = ["Lowering", "ConvFn"]

# conv(x: (N, *spatial, C_in), kernel: (*window, C_in // groups, C_out), groups, nd, *, strides, padding, dilation,
#      precision, preferred_element_type) -> (N, *spatial_out, C_out); strides and dilation are `nd`-tuples and
#      padding is normalised (`gconv.ops.args`).
ConvFn = Callable[..., jax.Array]


@dataclasses.dataclass(frozen=True)
class Lowering:
    """One way to compute a grouped conv; every lowering computes the same function.

    name: what `grouped_conv(impl=...)` calls it.
    conv: the computation (`ConvFn`).
    candidate: `(kernel_shape, c_in, groups, backend) -> bool`: whether "auto" times it for such a conv.
    """
    name: str
    conv: ConvFn
    candidate: Callable[[Sequence[int], int, int, str], bool]
