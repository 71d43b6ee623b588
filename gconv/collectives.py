"""Mesh axis names and the collectives of group parallelism, used inside `shard_map`.

Group parallel splits every grouped convolution's groups over the `model` axis. A model receives that as one value,
`GroupSplit(axis, size)`, which its conv factory and blocks consult; `NO_SPLIT` (size 1) makes every method here
the identity, so a block reads the same with or without the split.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from gconv import ops
from gconv.ops.manual_axes import varying

__all__ = ["DATA", "MODEL", "MEMBER", "GroupSplit", "NO_SPLIT", "copy_to_split", "reduce_from_split",
           "sharded_channel_shuffle", "gather_channels", "local_channels"]

DATA, MODEL, MEMBER = "data", "model", "member"  # the mesh's batch, group and member axes


def copy_to_split(x: jax.Array, axis_name: str) -> jax.Array:
    """A replicated activation entering a region whose devices each compute a different part (Megatron's "f"):
    identity forward, gradients summed over `axis_name` backward. `shard_map`'s replication types do the sum: the
    value is cast to varying over the axis, whose transpose is a `psum` (a value already typed varying, say an
    all-gather's result, needs no cast: its transpose sums)."""
    return x if axis_name in varying(x) else jax.lax.pcast(x, axis_name, to="varying")


def reduce_from_split(x: jax.Array, axis_name: str) -> jax.Array:
    """Sum of the devices' partial results over `axis_name` forward; identity backward (Megatron's "g"): a
    `psum`, whose transpose under `shard_map`'s replication types hands each device the cotangent."""
    return jax.lax.psum(x, axis_name)


def sharded_channel_shuffle(x: jax.Array, groups: int, axis_name: str, axis_size: int) -> jax.Array:
    """`channel_shuffle` of channels split in contiguous blocks over `axis_name`, as one `all_to_all`.

    `x: (..., C / axis_size)` holds `groups / axis_size` whole groups; the result holds this device's block of the
    shuffled channels. Group size `C / groups` must be divisible by `axis_size`.
    """
    local_groups = groups // axis_size
    if groups % axis_size or x.shape[-1] % local_groups or (x.shape[-1] // local_groups) % axis_size:
        raise ValueError(f"sharded_channel_shuffle: groups={groups} with {x.shape[-1]} local channels cannot be split "
                         f"over {axis_size} devices: groups and the group size must be divisible by {axis_size}.")
    per_group = x.shape[-1] // local_groups
    lead = x.shape[:-1]
    x = x.reshape(lead + (local_groups, axis_size, per_group // axis_size))
    x = jax.lax.all_to_all(x, axis_name, split_axis=x.ndim - 2, concat_axis=x.ndim - 3, tiled=True)
    x = x.reshape(lead + (groups, per_group // axis_size))
    return jnp.swapaxes(x, -1, -2).reshape(lead + (groups * per_group // axis_size,))


def gather_channels(x: jax.Array, axis_name: str) -> jax.Array:
    """All devices' channel blocks concatenated in device order: `(..., C / n) -> (..., C)`."""
    return jax.lax.all_gather(x, axis_name, axis=x.ndim - 1, tiled=True)


def local_channels(x: jax.Array, axis_name: str, axis_size: int) -> jax.Array:
    """This device's contiguous block of a replicated `(..., C)`: `(..., C / axis_size)`."""
    size = x.shape[-1] // axis_size
    return jax.lax.dynamic_slice_in_dim(x, jax.lax.axis_index(axis_name) * size, size, axis=x.ndim - 1)


@dataclasses.dataclass(frozen=True)
class GroupSplit:
    """How a model's groups are split: over mesh axis `axis` of `size` devices, each holding `1 / size` of every
    grouped layer's groups (and their channels) in one contiguous block. `size == 1`: not split."""
    axis: str = MODEL
    size: int = 1

    def __post_init__(self):
        if self.size < 1:
            raise ValueError(f"GroupSplit size={self.size} must be >= 1.")

    @property
    def active(self) -> bool:
        return self.size > 1

    def local(self, count: int, what: str = "channels") -> int:
        """This device's share of `count` groups or channels; raises when they do not split evenly."""
        if count % self.size:
            raise ValueError(f"{what}={count} is not divisible by the {self.size} devices of the {self.axis!r} axis: "
                             f"group parallelism splits whole groups; use a mesh.model that divides {count}.")
        return count // self.size

    def copy_in(self, x: jax.Array) -> jax.Array:
        """A replicated activation entering the split region (gradients summed backward)."""
        return copy_to_split(x, self.axis) if self.active else x

    def reduce(self, x: jax.Array) -> jax.Array:
        """The sum of the devices' partial results."""
        return reduce_from_split(x, self.axis) if self.active else x

    def shuffle(self, x: jax.Array, groups: int) -> jax.Array:
        """`ops.channel_shuffle` of this device's channel block (one `all_to_all` when split)."""
        return sharded_channel_shuffle(x, groups, self.axis, self.size) if self.active else ops.channel_shuffle(
            x, groups)

    def gather(self, x: jax.Array) -> jax.Array:
        """Every device's channel block, concatenated: `(..., C / size) -> (..., C)`."""
        return gather_channels(x, self.axis) if self.active else x

    def scatter(self, x: jax.Array) -> jax.Array:
        """This device's channel block of a replicated activation: `(..., C) -> (..., C / size)`."""
        return local_channels(x, self.axis, self.size) if self.active else x


NO_SPLIT = GroupSplit()
