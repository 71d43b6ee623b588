"""How `grouped_conv` and `channel_shuffle` partition themselves over the mesh they are traced under.

Models are global programs: they never name a mesh axis. Under `jax.set_mesh(mesh)` (gconv's steps trace there)
the two ops wrap their computation in a `shard_map` over the mesh's batch axis (`data`) and channel axis
(`model`), so every lowering sees per-device shapes and every device convolves only its images and its groups;
everything else in the model is left to XLA's partitioner. The reason: XLA all-gathers a batch-sharded grouped
(non-depthwise) convolution and computes it on every device (openxla/xla#47945), and splits one by feature group
only when its channels are sharded over every partition.

- batch: split over `data` when the batch divides by its size;
- channels: split over `model` when the groups divide by its size (each device holds whole groups; the shuffle
  also needs the group size to divide, then it is one `all_to_all`);
- members: a step `vmap`ped with `spmd_axis_name="member"` adds the member axis to these specs itself.

Dense convolutions (`groups == 1`) are split over the batch too, except on a mesh with a `model` axis, where they
may be column- or row-parallel (a kernel split over `model`) and are left to XLA, which partitions them without
gathering activations. (Inside a `vmap` over members whose axis is split over the mesh, an op outside a
`shard_map` would slice each member out of the split axis: per-member lowerings then gather every member.)
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

__all__ = ["DATA", "MODEL", "MEMBER", "mesh_sizes", "partitioned_conv", "partitioned_shuffle",
           "sharded_channel_shuffle", "batch_moments"]

DATA, MODEL, MEMBER = "data", "model", "member"  # the mesh's batch, group and member axes


def mesh_sizes() -> dict[str, int]:
    """`{axis: size}` of the mesh being traced under (`jax.set_mesh`), less the axes already manual (inside a
    `shard_map`, where a lowering calling an op again must not split it twice); empty outside one."""
    mesh = jax.sharding.get_abstract_mesh()
    return {} if mesh.empty else {a: n for a, n in mesh.shape.items() if a not in mesh.manual_axes}


def _axes(batch: int, groups: int, per_group: int = 0) -> tuple[str | None, str | None, int]:
    """`(batch axis, channel axis, channel-axis size)` an op splits over under the current mesh (None: not split)."""
    sizes = mesh_sizes()
    data, model = sizes.get(DATA, 1), sizes.get(MODEL, 1)
    b = DATA if data > 1 and batch % data == 0 else None
    c = MODEL if model > 1 and groups % model == 0 and per_group % model == 0 else None  # per_group 0: any
    return b, c, model if c else 1


def _placed(x: jax.Array, spec: P) -> jax.Array:
    """`x` resharded to `spec` on a mesh with explicit axes (whose `shard_map` takes inputs only as they are
    sharded); unchanged on an automatic mesh, where the partitioner reshards."""
    return jax.sharding.reshard(x, spec) if jax.sharding.get_abstract_mesh().explicit_axes else x


def partitioned_conv(conv: Callable, x: jax.Array, kernel: jax.Array, groups: int) -> jax.Array:
    """`conv(x, kernel, groups)` (a grouped conv's lowering) over this device's images and groups."""
    if groups == 1 and mesh_sizes().get(MODEL, 1) > 1:  # a dense conv may be column- or row-parallel: XLA's
        return conv(x, kernel, groups)
    b, c, size = _axes(x.shape[0], groups)
    if b is None and c is None:
        return conv(x, kernel, groups)
    window = (None,) * (x.ndim - 2)
    x_spec, k_spec = P(b, *window, c), P(*window, None, c)
    return jax.shard_map(lambda xs, ks: conv(xs, ks, groups // size), in_specs=(x_spec, k_spec),
                         out_specs=x_spec)(_placed(x, x_spec), _placed(kernel, k_spec))


def partitioned_shuffle(shuffle: Callable, x: jax.Array, groups: int) -> jax.Array:
    """`shuffle(x, groups)` (channels last) over this device's images; channels split over `model` are shuffled
    by one `all_to_all`."""
    b, c, size = _axes(x.shape[0], groups, x.shape[-1] // groups)
    if b is None and c is None:
        return shuffle(x, groups)
    spec = P(b, *(None,) * (x.ndim - 2), c)
    local = (lambda v: sharded_channel_shuffle(v, groups, MODEL, size)) if c else (lambda v: shuffle(v, groups))
    return jax.shard_map(local, in_specs=spec, out_specs=spec)(_placed(x, spec))


def batch_moments(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`(mean, mean square)` of `x: (N, ..., C)` over every axis but the last, `(C,)` each (BatchNorm's
    statistics). With the batch split over the mesh's `data` axis, each example's two moments over its positions
    are stacked and averaged over the batch as one array, which crosses the devices once, not twice (a step of a
    small model on many devices costs mostly such exchanges); otherwise two reductions, which XLA fuses into one
    pass over `x` (and for `x: (C,)`, which has no batch axis to split)."""
    if x.ndim < 2 or mesh_sizes().get(DATA, 1) == 1:
        axes = tuple(range(x.ndim - 1))
        return x.mean(axes), jax.lax.square(x).mean(axes)
    inner = tuple(range(1, x.ndim - 1))
    return tuple(jnp.stack([x.mean(inner), jax.lax.square(x).mean(inner)]).mean(1))  # (2, N, C) -> (2, C)


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
