"""Tolerances from an error model, not from one machine's observed differences.

A sum of n terms computed in floating point, in any order and blocking, differs from the exact sum by at most
gamma(n) * sum(|terms|), gamma(n) = n u / (1 - n u), with u the unit roundoff (2^-24 for float32; Higham, Accuracy
and Stability of Numerical Algorithms, 2nd ed., eq. 3.5 for sums, 3.4 for dot products). Two computations of the
same linear function (two lowerings of a conv, one device or eight) therefore differ elementwise by at most
2 gamma(n) times the same function applied to the absolute values of its operands. The bound holds on every CPU:
it does not depend on which order a machine happens to sum in.
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

U32 = 2.0 ** -24  # unit roundoff of float32
U16B = 2.0 ** -8  # of bfloat16 (8 significand bits)
U64 = 2.0 ** -53  # of float64


def gamma(n: int, u: float = U32) -> float:
    assert n * u < 1, f"gamma({n}) with u={u}: the model needs n u < 1"
    return n * u / (1 - n * u)


def assert_within(got, want, bound, what: str = "") -> None:
    """|got - want| <= bound elementwise, reporting the worst ratio when it fails."""
    got, want, bound = (np.asarray(a, np.float64) for a in (got, want, bound))
    assert got.shape == want.shape, (got.shape, want.shape)
    excess = np.abs(got - want) - bound
    if (excess > 0).any():
        i = np.unravel_index(np.argmax(excess), excess.shape)
        raise AssertionError(f"{what}: |got - want| = {abs(got[i] - want[i]):.3g} exceeds the error bound "
                             f"{bound[i]:.3g} at {i} (got {got[i]:.9g}, want {want[i]:.9g})")


def conv_terms(kernel_shape, c_in: int) -> int:
    """The longest sum a grouped conv lowering may compute per output: every tap times every input channel (the
    block-diagonal lowering sums the zeros between groups too)."""
    return int(np.prod(kernel_shape[:-2])) * c_in


def linear_bound(f: Callable, *operands, terms: int, u: float = U32) -> jax.Array:
    """The bound on |f_a(ops) - f_b(ops)| of two evaluations of the multilinear `f` (a conv, a product), each
    summing at most `terms` products per output: 2 gamma(terms) f(|ops|)."""
    return 2 * gamma(terms, u) * f(*(jnp.abs(a) for a in operands))


def conv_gradient_bound(reference: Callable, x, k, cotangent, cotangent_error=None) -> list:
    """The bound on the (x, kernel) cotangents of a conv from two lowerings, given the output cotangent (and how far
    the two computations' cotangents may differ, elementwise). The transposed sums have N x output positions terms
    (kernel) and taps x C_out terms (input); each adds 2 gamma of its length times its magnitude, the transpose
    applied to |x|, |k| and |cotangent| + its error; the cotangent error itself passes through the transpose."""
    y = jax.eval_shape(reference, x, k)
    transpose = jax.vjp(reference, jnp.abs(x), jnp.abs(k))[1]
    error = jnp.zeros(y.shape, y.dtype) if cotangent_error is None else cotangent_error
    magnitude, propagated = transpose(jnp.abs(cotangent) + error), transpose(error)
    terms = max(int(np.prod(y.shape[:-1])), int(np.prod(k.shape[:-2])) * k.shape[-1])
    return [2 * gamma(terms) * m + p for m, p in zip(magnitude, propagated)]


def sin_loss_gradient_bound(reference: Callable, x, k) -> list:
    """The bound on the gradients of `sum(sin(conv(x, k)))` from two lowerings: their forward sums differ by at most
    b_y (`linear_bound`), so their cotangents cos(y) by at most b_y (|cos'| <= 1) plus cos's own rounding."""
    y = reference(x, k)
    b_y = linear_bound(reference, x, k, terms=conv_terms(k.shape, x.shape[-1]))
    return conv_gradient_bound(reference, x, k, jnp.cos(y), b_y + 4 * U32 * jnp.abs(jnp.cos(y)))


def step_rtol(longest_sum: int, depth: int = 4) -> float:
    """Relative agreement of a training step computed with its sums in another order (one device or eight).

    Statistical model (Higham, §3.6): the rounding errors of a sum of n terms are many small independent ones,
    so they grow like sqrt(n) u rather than the worst case n u. A step composes `depth` stages of such sums
    (forward, BN statistics, backward, update), none longer than `longest_sum` (for BN: batch x positions).
    The worst-case bound n u would be ~100x looser and could not tell reordering from a missing BN
    synchronisation, which moves statistics by ~1e-1 on the tests' batches.
    """
    return depth * math.sqrt(longest_sum) * U32
