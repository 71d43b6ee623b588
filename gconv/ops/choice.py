"""Which lowering `grouped_conv(impl="auto")` takes: the fastest candidate, measured once per shape and cached
(`gconv.autotune`), forward and backward chosen separately; or, with measuring off, a deterministic rule of thumb."""
from __future__ import annotations

import functools
import json
import math
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gconv import autotune
from gconv.ops.lowerings import LOWERINGS, blockdiag, lower, shift, split

__all__ = ["AUTOTUNE_MIN_MACS", "candidate_impls", "static_impl", "tuned_impls", "forward_backward"]

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
    if math.prod(out.shape) * math.prod(kernel.shape[:-1]) < min_macs():
        return default, default
    key = json.dumps([backend, jax.devices()[0].device_kind, jax.__version__, x.shape, str(x.dtype), kernel.shape,
                      str(kernel.dtype), groups, {k: str(v) for k, v in kwargs.items()}])
    conv = lambda impl: functools.partial(lower, impl, groups=groups, nd=nd, **kwargs)  # noqa: E731
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


def forward_backward(fwd_impl: str, bwd_impl: str, groups: int, nd: int, kwargs: dict):
    """The conv computed by `fwd_impl`, differentiated through `bwd_impl` (the same linear function)."""

    @jax.custom_vjp
    def conv(x, kernel):
        return lower(fwd_impl, x, kernel, groups, nd, **kwargs)

    def conv_fwd(x, kernel):
        return conv(x, kernel), (x, kernel)

    def conv_bwd(residuals, g):
        return jax.vjp(lambda a, k: lower(bwd_impl, a, k, groups, nd, **kwargs), *residuals)[1](g)

    conv.defvjp(conv_fwd, conv_bwd)
    return conv
