"""ShuffleNet's channel shuffle and its inverse: a reshape and a transpose."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from gconv.ops.args import as_groups
from gconv.ops.partition import partitioned_shuffle

__all__ = ["channel_shuffle", "channel_unshuffle", "shuffle_permutation"]


def _check_shuffle(channels: int, groups: int) -> int:
    groups = as_groups(groups)
    if channels % groups:
        raise ValueError(
            f"channel_shuffle: {channels} channels are not divisible by groups={groups}: "
            f"use a groups that divides {channels}.")
    return groups


def _channel_axis(x: jax.Array, axis: int) -> int:
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis={axis} is out of range for an array of rank {x.ndim} (shape {x.shape}): use "
                         f"{-x.ndim}..{x.ndim - 1}.")
    return axis % x.ndim


def shuffle_permutation(channels: int, groups: int) -> list[int]:
    """Input channel feeding each output channel of `channel_shuffle` (C=6, g=2 -> [0, 3, 1, 4, 2, 5])."""
    groups = _check_shuffle(channels, groups)
    per = channels // groups
    return [g * per + i for i in range(per) for g in range(groups)]


def channel_shuffle(x: jax.Array, groups: int, axis: int = -1) -> jax.Array:
    """ShuffleNet's channel shuffle: view channels as `(groups, C // groups)`, transpose, flatten.

    Same permutation as `torch.nn.ChannelShuffle(groups)` (there on axis 1): output channel `i * groups + g` is
    input channel `g * C // groups + i`. `x: (..., C, ...)` with C on `axis`; shape is unchanged.
    """
    axis = _channel_axis(x, axis)
    groups = _check_shuffle(x.shape[axis], groups)
    if axis == x.ndim - 1 and x.ndim > 1:  # channels last: split over the mesh traced under (gconv.ops.partition)
        return partitioned_shuffle(functools.partial(_shuffle, axis=axis), x, groups)
    return _shuffle(x, groups, axis)


def _shuffle(x: jax.Array, groups: int, axis: int) -> jax.Array:
    channels = x.shape[axis]
    shape = x.shape
    x = x.reshape(shape[:axis] + (groups, channels // groups) + shape[axis + 1:])
    x = jnp.swapaxes(x, axis, axis + 1)
    return x.reshape(shape)


def channel_unshuffle(x: jax.Array, groups: int, axis: int = -1) -> jax.Array:
    """Inverse of `channel_shuffle(x, groups, axis)`."""
    channels = x.shape[_channel_axis(x, axis)]
    groups = _check_shuffle(channels, groups)
    return channel_shuffle(x, channels // groups, axis)
