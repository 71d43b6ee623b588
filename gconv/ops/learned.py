"""Learned group convolution as pure functions of arrays and the step: CondenseNet's (Huang et al. 2018) and
FLGC's (Wang et al. 2019).

A learned group conv is a dense 1x1 conv whose output filter `o` belongs to group `o mod G`, times a mask `keep:
(G, C_in)` of the inputs each group still sees. Training passes through `C - 1` condensation stages over the first
`condense_steps` steps (`C` the condensation factor); entering each, every group drops the `C_in / C` inputs whose
weights over the group's filters have the least L1 norm. Condensed, the layer is an index gather of the kept
inputs, a `G`-group conv and a `G`-way channel shuffle, computing the masked conv's function.

FLGC learns which group each input channel and each filter belongs to (assignment logits, a hard one-hot forward
with the softmax's gradient), so groups may differ in size; deployed, it is a permutation and a group conv (equal
groups) or one conv per group.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["condensation_stage", "condense_keep", "masked_kernel", "group_lasso", "condensed_kernel",
           "condensed_index", "hard_assignment", "assignment_mask", "assigned_groups", "assigned_conv"]


def condensation_stage(step: jax.Array, condense_steps: int, condense_factor: int) -> jax.Array:
    """The stage (0 .. C - 1) at `step`: stage `s` starts at step `ceil(s * condense_steps / (C - 1))`, as
    CondenseNet's `progress * 2 < (s + 1) / (C - 1)` with progress = step / (2 * condense_steps)."""
    if condense_steps < 1:
        raise ValueError(f"condense_steps={condense_steps} must be >= 1: the steps over which the "
                         f"{condense_factor - 1} condensation stages happen (CondenseNet: the first half of training).")
    stages = condense_factor - 1
    return jnp.minimum(stages, (jnp.asarray(step, jnp.int32) * stages) // condense_steps).astype(jnp.int32)


def _group_l1(kernel: jax.Array, keep: jax.Array) -> jax.Array:
    """`(G, C_in)`: each input's L1 norm over the filters of each group (filter o in group o mod G), masked."""
    groups = keep.shape[0]
    w = jnp.abs(masked_kernel(kernel, keep)).reshape(kernel.shape[-2], -1, groups)  # (C_in, C_out / G, G)
    return jnp.sum(w, axis=1).T


def condense_keep(kernel: jax.Array, keep: jax.Array, stage: jax.Array, condense_factor: int) -> jax.Array:
    """The mask at `stage`: each group keeps its `C_in - stage * C_in / C` inputs of largest L1 norm among those it
    still keeps (an input dropped stays dropped). `kernel: (1, 1, C_in, C_out)`, `keep: (G, C_in)` bool."""
    c_in = keep.shape[1]
    kept = c_in - stage * (c_in // condense_factor)
    score = jnp.where(keep, _group_l1(kernel, keep), -jnp.inf)
    rank = jnp.argsort(jnp.argsort(-score, axis=1, stable=True), axis=1, stable=True)  # 0: the largest
    return keep & (rank < kept)


def masked_kernel(kernel: jax.Array, keep: jax.Array) -> jax.Array:
    """`kernel: (1, 1, C_in, C_out)` with input `i` of filter `o` zeroed where `keep[o mod G, i]` is False."""
    groups = keep.shape[0]
    mask = keep[jnp.arange(kernel.shape[-1]) % groups].T  # (C_in, C_out)
    return kernel * mask.astype(kernel.dtype)


def group_lasso(kernel: jax.Array, keep: jax.Array) -> jax.Array:
    """CondenseNet's group-lasso term (`LearnedGroupConv.lasso_loss`): the sum over groups and inputs of the L2 norm
    of an input's weights over the group's filters (masked; each squared norm clamped at 1e-6 first, as there)."""
    groups = keep.shape[0]
    w = jnp.square(masked_kernel(kernel, keep)).reshape(kernel.shape[-2], -1, groups)
    return jnp.sum(jnp.sqrt(jnp.maximum(jnp.sum(w, axis=1), 1e-6)))


def condensed_kernel(kernel: jax.Array, index: jax.Array, groups: int) -> jax.Array:
    """The `groups`-group kernel `(1, 1, n, C_out)` that, on the inputs gathered by `index: (groups * n,)` (group
    `i`'s kept inputs at `[i*n, (i+1)*n)`) and followed by `channel_shuffle(., groups)`, computes the masked conv.
    Condensed output `i * C_out/G + k` is filter `i + k * G`, which the shuffle puts back at position `i + k * G`."""
    n = index.shape[0] // groups
    w = kernel[0, 0]  # (C_in, C_out)
    blocks = [w[index[i * n:(i + 1) * n]][:, i::groups] for i in range(groups)]  # each (n, C_out / G)
    return jnp.concatenate(blocks, axis=1)[None, None]


def condensed_index(keep: Any) -> np.ndarray:
    """The gather `(G * n,)` of a fully condensed mask `keep: (G, C_in)` (every group keeping `n` inputs): each
    group's kept inputs in increasing order, group after group, as CondenseNet's converter orders them."""
    keep = np.asarray(keep, bool)
    counts = sorted(set(keep.sum(axis=1).tolist()))
    if len(counts) != 1:
        raise ValueError(f"the groups keep {counts} inputs: condensing needs every group at the same count (train "
                         f"through every condensation stage, i.e. past condense_steps).")
    return np.concatenate([np.flatnonzero(row) for row in keep]).astype(np.int32)


# --- FLGC (Wang et al. 2019): learned assignments of input channels and filters to groups -------------------------

def hard_assignment(logits: jax.Array, balanced: bool = False) -> jax.Array:
    """`(n, G)` one-hot rows from assignment `logits: (n, G)`: each row's largest logit, or with `balanced` exactly
    `n / G` rows per group (rows ranked by preferred group, then by how much they prefer it, and cut into G equal
    blocks). Its gradient is the softmax's (straight-through), so training moves the logits."""
    n, groups = logits.shape
    soft = jax.nn.softmax(logits, axis=-1)
    if balanced:
        if n % groups:
            raise ValueError(f"a balanced assignment of {n} channels to {groups} groups needs groups to divide them.")
        preferred = jnp.argmax(logits, axis=-1)
        margin = jnp.max(soft, axis=-1)
        order = jnp.lexsort((-margin, preferred))  # by preferred group, the most decided first
        group = jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32) // (n // groups))
    else:
        group = jnp.argmax(logits, axis=-1)
    hard = jax.nn.one_hot(group, groups, dtype=soft.dtype)
    return hard + (soft - jax.lax.stop_gradient(soft))  # exactly `hard` forward: soft - soft is 0


def assignment_mask(input_logits: jax.Array, filter_logits: jax.Array, balanced: bool = False) -> jax.Array:
    """`(C_in, C_out)`: 1 where input `i` and filter `o` are assigned the same group (hard forward values, the
    softmax's gradients)."""
    return hard_assignment(input_logits, balanced) @ hard_assignment(filter_logits, balanced).T


def assigned_groups(logits: Any, balanced: bool = False) -> np.ndarray:
    """The hard group of each row of assignment `logits: (n, G)`, as integers."""
    return np.asarray(jnp.argmax(hard_assignment(jnp.asarray(logits), balanced), axis=-1)).astype(np.int32)


def assigned_conv(x: jax.Array, kernel: jax.Array, input_group: Any, filter_group: Any, groups: int,
                  **conv_args: Any) -> jax.Array:
    """A conv whose input `i` reaches filter `o` only when `input_group[i] == filter_group[o]`, computed as FLGC
    deploys it: the inputs permuted into group order, then one `groups`-group conv when every group has the same
    numbers of inputs and filters, else one conv per group; the outputs put back in filter order.
    `kernel: (*window, C_in, C_out)` (dense)."""
    from gconv.ops.conv import grouped_conv

    input_group, filter_group = np.asarray(input_group), np.asarray(filter_group)
    ins = [np.flatnonzero(input_group == g) for g in range(groups)]
    outs = [np.flatnonzero(filter_group == g) for g in range(groups)]
    order = np.concatenate(outs)
    if len({len(i) for i in ins}) == 1 and len({len(o) for o in outs}) == 1:
        w = jnp.concatenate([kernel[..., i, :][..., o] for i, o in zip(ins, outs)], axis=-1)
        y = grouped_conv(x[..., np.concatenate(ins)], w, groups, **conv_args)
    else:
        parts = []
        for i, o in zip(ins, outs):
            if len(o) == 0:
                continue
            if len(i) == 0:  # a group with filters and no inputs: its filters see nothing
                shape = jax.eval_shape(lambda a: grouped_conv(a, kernel[..., :1, :][..., o], 1, **conv_args),
                                       x[..., :1]).shape
                parts.append(jnp.zeros(shape, x.dtype))
            else:
                parts.append(grouped_conv(x[..., i], kernel[..., i, :][..., o], 1, **conv_args))
        y = jnp.concatenate(parts, axis=-1)
    return y[..., np.argsort(order)]
