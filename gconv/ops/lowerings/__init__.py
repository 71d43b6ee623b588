"""The lowerings of a grouped conv, one module each, registered here by name.

A new lowering is a module defining `LOWERING = Lowering(name, conv, candidate)` (`base.Lowering`) and one entry in
`_REGISTERED`; `grouped_conv(impl=name)` then computes through it, the tests compare it with the reference, and
"auto" times it wherever its `candidate` says so.
"""
from __future__ import annotations

import jax

from gconv.ops.lowerings import blockdiag, dot, pallas, shift, split, xla
from gconv.ops.lowerings.base import Lowering

__all__ = ["Lowering", "LOWERINGS", "lower"]

_REGISTERED = (xla.LOWERING, blockdiag.LOWERING, split.LOWERING, shift.LOWERING, dot.LOWERING, pallas.LOWERING)
LOWERINGS: dict[str, Lowering] = {lowering.name: lowering for lowering in _REGISTERED}  # in the order "auto" times


def lower(impl: str, x: jax.Array, kernel: jax.Array, groups: int, nd: int, **kwargs) -> jax.Array:
    """The grouped conv through the lowering named `impl`."""
    return LOWERINGS[impl].conv(x, kernel, groups, nd, **kwargs)
