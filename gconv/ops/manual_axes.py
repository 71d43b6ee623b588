"""Values inside `shard_map` with its replication checks: which manual mesh axes a value varies over, and the
cotangents of a `custom_vjp` made to vary as their primals do."""
from __future__ import annotations

from typing import Sequence

import jax

__all__ = ["varying", "like_primals"]


def varying(x: jax.Array) -> frozenset:
    """The manual mesh axes `x` varies over inside `shard_map` (its type's `vma`; empty outside)."""
    aval = jax.typeof(x)
    mat = getattr(aval, "mat", None)  # newer JAX keeps it in the manual-axis type
    return frozenset(mat.varying if mat is not None else getattr(aval, "vma", ()))


def like_primals(cotangents: Sequence[jax.Array], primals: Sequence[jax.Array]) -> tuple:
    """A `custom_vjp` backward's cotangents, each summed over the axes it varies over and its primal does not: a
    kernel replicated over `data` used on each device's batch gets every device's contribution, as autodiff's own
    transpose of the implicit broadcast would give it."""
    out = []
    for ct, primal in zip(cotangents, primals):
        extra = tuple(sorted(varying(ct) - varying(primal)))
        out.append(jax.lax.psum(ct, extra) if extra else ct)
    return tuple(out)
