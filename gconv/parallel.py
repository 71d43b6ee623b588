"""Many devices: a `data` x `model` mesh from config, and data-parallel steps through `shard_map` or `pmap`.

Data parallel: the batch is split over `data`, parameters are replicated, and inside the step gradients, metrics
and BatchNorm statistics are averaged over `data` (`lax.pmean`; the model's `axis_name="data"`), so N devices
compute what one device computes on the global batch. Each device runs its grouped convolutions on its own slice:
nothing in the step all-gathers activations (the test suite checks the compiled HLO).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

__all__ = ["DATA", "MODEL", "make_mesh", "replicated", "shard_batch", "data_parallel", "pmap_data_parallel",
           "check_batch_divides"]

DATA, MODEL = "data", "model"


def make_mesh(mesh_config: Any, devices: list | None = None) -> Mesh:
    """A `(data, model)` mesh over the first `data * model` devices; `-1` takes all remaining devices
    (`data=-1, model=1` = pure data parallel over every device, `data=1, model=1` = one device)."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = {DATA: int(mesh_config[DATA]), MODEL: int(mesh_config[MODEL])}
    free = [k for k, v in sizes.items() if v == -1]
    if len(free) > 1 or any(v == 0 or v < -1 for v in sizes.values()):
        raise ValueError(f"mesh {sizes}: sizes must be positive, with at most one -1 (= the remaining devices).")
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if free:
        if len(devices) % fixed:
            raise ValueError(f"mesh {sizes}: {len(devices)} devices are not divisible by {fixed}.")
        sizes[free[0]] = len(devices) // fixed
    needed = sizes[DATA] * sizes[MODEL]
    if needed > len(devices):
        raise ValueError(f"mesh data={sizes[DATA]} x model={sizes[MODEL]} needs {needed} devices, but only "
                         f"{len(devices)} are present: use -1 for one axis or sizes whose product is <= {len(devices)}.")
    return Mesh(np.asarray(devices[:needed]).reshape(sizes[DATA], sizes[MODEL]), (DATA, MODEL))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_batch_divides(batch_size: int, mesh: Mesh) -> None:
    n = mesh.shape[DATA]
    if batch_size % n:
        raise ValueError(f"batch_size={batch_size} is not divisible by the {n} devices of the mesh's data axis: "
                         f"use a multiple of {n}.")


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """Host batch (this process's rows) -> global arrays split over `data` along the leading axis."""
    sharding = NamedSharding(mesh, P(DATA))
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


def data_parallel(step: Callable, mesh: Mesh, *, donate: bool = True) -> Callable:
    """`step(state, batch, axis_name=...)` -> a jitted data-parallel step over `mesh` via `shard_map`.

    The state is replicated and the batch split over `data`; `step` reduces over `axis_name` itself (`pmean` of
    gradients and metrics, `psum` of evaluation counts), so its outputs are replicated.
    """
    per_device = functools.partial(step, axis_name=DATA)
    mapped = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(DATA)), out_specs=P(), check_vma=False)
    return jax.jit(mapped, donate_argnums=(0,) if donate else ())


def pmap_data_parallel(step: Callable, devices: list | None = None) -> Callable:
    """The same data-parallel step through `jax.pmap`: takes the replicated state and a global batch, reshapes the
    batch to `(n_devices, B / n, ...)`, and returns the state and metrics of device 0."""
    devices = list(devices if devices is not None else jax.local_devices())
    pmapped = jax.pmap(functools.partial(step, axis_name=DATA), axis_name=DATA, devices=devices, donate_argnums=0)
    n = len(devices)

    def run(state, batch):
        stacked = jax.tree.map(lambda x: jnp.broadcast_to(x, (n,) + jnp.shape(x)), state)
        split = jax.tree.map(lambda x: jnp.reshape(x, (n, x.shape[0] // n) + x.shape[1:]), batch)
        new_state, metrics = pmapped(stacked, split)
        return jax.tree.map(lambda x: x[0], new_state), jax.tree.map(lambda x: x[0], metrics)

    return run
