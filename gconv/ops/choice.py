"""Which lowering `grouped_conv(impl="auto")` takes: the fastest candidate, measured once per shape and cached
(`gconv.autotune`), forward and backward chosen separately; or, with measuring off, a deterministic rule of thumb."""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import custom_batching

from gconv import autotune
from gconv.ops import lowering_table
from gconv.ops.lowerings import LOWERINGS, blockdiag, lower, shift, split
from gconv.ops.manual_axes import like_primals

__all__ = ["AUTOTUNE_MIN_MACS", "candidate_impls", "static_impl", "tuned_impls", "forward_backward", "MEMBERS",
           "member_count", "member_loop", "per_member"]

# Below this many multiply-adds a conv takes well under a millisecond: timing it is mostly noise, and measuring
# (two compiles per candidate) costs more than any choice can win back, so the static rule decides.
# `GCONV_AUTOTUNE_MIN_MACS` changes it (0: measure every conv, e.g. to study the choice on a small model).
AUTOTUNE_MIN_MACS = 2**25


def min_macs() -> int:
    """The threshold of multiply-adds below which the static rule decides (`GCONV_AUTOTUNE_MIN_MACS`, else
    `AUTOTUNE_MIN_MACS`)."""
    value = os.environ.get("GCONV_AUTOTUNE_MIN_MACS", "")
    if value and not value.isdigit():
        raise ValueError(f"GCONV_AUTOTUNE_MIN_MACS={value!r} must be a whole number of multiply-adds (e.g. 0).")
    return int(value) if value else AUTOTUNE_MIN_MACS


MEMBERS = "gconv_members"  # the name of the `vmap` axis over members (gconv.members)


def member_count() -> int:
    """How many members a conv being traced computes at once: the size of the enclosing `vmap` named `MEMBERS`
    (gconv.members' step), 1 outside one. Part of the traced program (its vmap), so of every jit's cache key: under
    it JAX batches the members' convs into one conv of `count` x the groups, and "auto" measures and keys its choice
    at that size."""
    try:
        return jax.lax.axis_size(MEMBERS)
    except NameError:
        return 1


_BLOCKDIAG_SMALL = 2**16  # dense kernel entries below which one dense conv beats every other CPU lowering


def candidate_impls(kernel_shape: Sequence[int], c_in: int, groups: int, backend: str) -> tuple[str, ...]:
    """The lowerings worth timing for a kernel `(*window, C_in // groups, C_out)` on `backend`, in registry order."""
    found = tuple(name for name, lowering in LOWERINGS.items()
                  if lowering.candidate(tuple(kernel_shape), c_in, groups, backend))
    return found or ("xla",)


def static_impl(kernel_shape: Sequence[int], c_in: int, groups: int, backend: str) -> str:
    """The lowering "auto" takes when measuring is off (`GCONV_AUTOTUNE=0`, tests): a rule of thumb from the
    measurements in bench/RESULTS.md (CPU, and an H100, where XLA's own lowering wins except for grouped 1x1s)."""
    *window, c_group, c_out = kernel_shape
    one_by_one = all(w == 1 for w in window)
    if backend != "cpu":
        return "blockdiag" if one_by_one and groups > 1 and c_in * c_out <= blockdiag.MAX_DENSE_SIZE else "xla"
    if one_by_one:
        return "dot"
    if c_group == 1 and math.prod(window) <= shift.MAX_TERMS:
        return "shift"
    if groups == 1:
        return "xla"
    dense_size = math.prod(window) * c_in * c_out
    if dense_size <= _BLOCKDIAG_SMALL:
        return "blockdiag"
    if groups <= split.MAX_GROUPS:
        return "split"
    return "blockdiag" if dense_size <= blockdiag.MAX_DENSE_SIZE else "xla"


def tuned_impls(x: jax.Array, kernel: jax.Array, groups: int, nd: int, kwargs: dict) -> tuple[str, str]:
    """(forward lowering, backward lowering) for this call's shapes: measured, or the static rule."""
    backend = jax.default_backend()
    candidates = candidate_impls(kernel.shape, x.shape[-1], groups, backend)
    default = static_impl(kernel.shape, x.shape[-1], groups, backend)
    if len(candidates) == 1 or not (autotune.enabled() or autotune.given()):
        return default, default
    out = jax.eval_shape(functools.partial(lower, default, groups=groups, nd=nd, **kwargs), x, kernel)
    m = 1 if member_loop() else member_count()  # a members' step runs this conv as one batched conv of m
    if m * math.prod(out.shape) * math.prod(kernel.shape[:-1]) < min_macs():
        return default, default
    key = json.dumps([backend, jax.devices()[0].device_kind, jax.__version__, x.shape, str(x.dtype), kernel.shape,
                      str(kernel.dtype), groups, {k: str(v) for k, v in kwargs.items()}] + ([{"members": m}] if m > 1
                                                                                          else []))

    def conv(impl):
        one = functools.partial(lower, impl, groups=groups, nd=nd, **kwargs)
        return jax.vmap(one) if m > 1 else one

    arrays = []

    def inputs():  # random operands of this call's shapes (m of each), made once and only when something is measured
        if not arrays:
            rng = np.random.default_rng(0)
            arrays.extend(jnp.asarray(rng.standard_normal((m,) * (m > 1) + a.shape), a.dtype) for a in (x, kernel, out))
        return arrays

    def measure_forward(impl: str) -> float:
        with _now():
            return autotune.time_call(jax.jit(conv(impl)), *inputs()[:2])

    def measure_backward(impl: str) -> float:
        backward = jax.jit(lambda a, w, g: jax.vjp(conv(impl), a, w)[1](g))
        with _now():
            return autotune.time_call(backward, *inputs())

    forward = autotune.pick("forward " + key, candidates, measure_forward, default, lowering_table.lookup)
    backward = autotune.pick("backward " + key, candidates, measure_backward, default, lowering_table.lookup)
    return forward, backward


@contextlib.contextmanager
def _now() -> Iterator[None]:
    """Run now, on one device, even while an outer jit is tracing (inside a `shard_map` over a mesh too)."""
    with jax.ensure_compile_time_eval(), jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), ())):
        yield


def forward_backward(fwd_impl: str, bwd_impl: str, groups: int, nd: int, kwargs: dict):
    """The conv computed by `fwd_impl`, differentiated through `bwd_impl` (the same linear function)."""

    @jax.custom_vjp
    def conv(x, kernel):
        return lower(fwd_impl, x, kernel, groups, nd, **kwargs)

    def conv_fwd(x, kernel):
        return conv(x, kernel), (x, kernel)

    def conv_bwd(residuals, g):
        return like_primals(jax.vjp(lambda a, k: lower(bwd_impl, a, k, groups, nd, **kwargs), *residuals)[1](g),
                            residuals)

    conv.defvjp(conv_fwd, conv_bwd)
    return conv


def member_loop() -> bool:
    """Whether a members' step computes each member's convs on its own (`per_member`): on the CPU, where one
    grouped conv over the members (JAX's batching rule) is slower than the members' convs one after another."""
    return jax.default_backend() == "cpu"


def _one_per_member(fn):
    """`fn`, whose `vmap` over members calls it once per member (unrolled) when every argument is batched."""
    f = custom_batching.custom_vmap(fn)

    @f.def_vmap
    def rule(axis_size, in_batched, *args):
        if all(in_batched):
            outs = [fn(*(a[i] for a in args)) for i in range(axis_size)]
            out = jax.tree.map(lambda *o: jnp.stack(o), *outs)
        else:
            out = jax.vmap(fn, in_axes=tuple(0 if b else None for b in in_batched))(*args)
        return out, jax.tree.map(lambda _: True, out)

    return f


def per_member(fwd_impl: str, bwd_impl: str, groups: int, nd: int, kwargs: dict):
    """The conv of `forward_backward`, for a step `vmap`ped over members: each member's conv (forward and
    backward) computed on its own, not as one grouped conv over the members."""
    one = lambda impl: functools.partial(lower, impl, groups=groups, nd=nd, **kwargs)  # noqa: E731
    forward = _one_per_member(one(fwd_impl))
    backward = _one_per_member(lambda x, kernel, g: jax.vjp(one(bwd_impl), x, kernel)[1](g))

    @jax.custom_vjp
    def conv(x, kernel):
        return forward(x, kernel)

    conv.defvjp(lambda x, kernel: (forward(x, kernel), (x, kernel)),
                lambda res, g: like_primals(backward(*res, g), res))
    return conv
