"""Many devices: a `data` x `model` mesh from config (with a leading `member` axis when members are spread over
devices); data-parallel and group-parallel steps through `shard_map` (and data parallel through `pmap`).

Data parallel: the batch is split over `data`, parameters are replicated, and inside the step gradients, metrics
and BatchNorm statistics are averaged over `data` (`lax.pmean`; the model's `axis_name="data"`), so N devices
compute what one device computes on the global batch. Each device runs its grouped convolutions on its own slice:
nothing in the step all-gathers activations (the test suite checks the compiled HLO).

Group parallel (AlexNet's split, generalised): the groups of every grouped convolution are split over `model`;
each device holds only its groups' weights, BN parameters and activations (a model's `group_split` field says how,
its family's `split_rules` where each parameter goes; `partition_specs` places the state). Composes with data
parallel on a 2-D mesh.

Members (`gconv.members`): K runs stacked on a leading axis. With `mesh.member = M > 1` the mesh gets a leading
`member` axis and each of its M positions holds K / M of the members (ensemble parallel); the `data` and `model`
axes inside a position work as above.
"""
from __future__ import annotations

import functools
import math
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


from gconv.collectives import DATA, MEMBER, MODEL, GroupSplit

__all__ = ["DATA", "MODEL", "MEMBER", "make_mesh", "replicated", "shard_batch", "shard_step", "pmap_data_parallel",
           "group_parallel_rules", "partition_specs", "shard_state", "check_batch_divides", "input_shard",
           "place_rows", "compile_steps", "split_of", "member_block", "member_specs", "split_norm"]


def make_mesh(mesh_config: Any, devices: list | None = None) -> Mesh:
    """A `(data, model)` mesh over the first `data * model` devices; `-1` takes all remaining devices
    (`data=-1, model=1` = pure data parallel over every device, `data=1, model=1` = one device). With
    `mesh_config.get("member", 1) = M > 1`, a `(member, data, model)` mesh: M blocks of `data * model` neighbouring
    devices, one per share of the members.

    `mesh_config.get("layout")`: "data_major" (default: neighbouring devices, e.g. one host's, share a `model`
    group) or "model_major" (a `model` group takes every `data`-th device of its member block: across hosts)."""
    devices = list(devices if devices is not None else jax.devices())
    layout = mesh_config.get("layout", "data_major")
    if layout not in ("data_major", "model_major"):
        raise ValueError(f"mesh.layout={layout!r} is not known: use 'data_major' or 'model_major'.")
    sizes = {MEMBER: int(mesh_config.get(MEMBER, 1)), DATA: int(mesh_config[DATA]), MODEL: int(mesh_config[MODEL])}
    free = [k for k, v in sizes.items() if v == -1]
    if len(free) > 1 or any(v == 0 or v < -1 for v in sizes.values()):
        raise ValueError(f"mesh {sizes}: sizes must be positive, with at most one -1 (= the remaining devices).")
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if free:
        if len(devices) % fixed:
            raise ValueError(f"mesh {sizes}: {len(devices)} devices are not divisible by {fixed}.")
        sizes[free[0]] = len(devices) // fixed
    needed = math.prod(sizes.values())
    if needed > len(devices):
        raise ValueError(f"mesh member={sizes[MEMBER]} x data={sizes[DATA]} x model={sizes[MODEL]} needs {needed} "
                         f"devices, but only {len(devices)} are present: use -1 for one axis or sizes whose product "
                         f"is <= {len(devices)}.")
    grid = np.asarray(devices[:needed]).reshape(sizes[MEMBER], -1)
    grid = grid.reshape(-1, sizes[DATA], sizes[MODEL]) if layout == "data_major" else grid.reshape(
        -1, sizes[MODEL], sizes[DATA]).transpose(0, 2, 1)
    if sizes[MEMBER] == 1:
        return Mesh(grid[0], (DATA, MODEL))
    return Mesh(grid, (MEMBER, DATA, MODEL))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_batch_divides(batch_size: int, mesh: Mesh) -> None:
    n = mesh.shape[DATA]
    if batch_size % n:
        raise ValueError(f"batch_size={batch_size} is not divisible by the {n} devices of the mesh's data axis: "
                         f"use a multiple of {n}.")


def shard_batch(batch: dict, mesh: Mesh, spec: P = P(DATA)) -> dict:
    """Host batch (this process's rows) -> global arrays split over `data` along the leading axis (members' batches
    `(K_here, rows, ...)`: `spec=P(MEMBER, DATA)`, this process's members and rows)."""
    sharding = NamedSharding(mesh, spec)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


def shard_step(step: Callable, mesh: Mesh, state_specs: Any = P(), *, returns_state: bool = True,
               donate: bool = True, batch_spec: P = P(DATA)) -> Callable:
    """`step(state, batch, axis_name=...)` -> a jitted step over `mesh` via `shard_map`.

    The batch is split over `data`; the state is replicated (`state_specs=P()`, data parallel) or split over
    `model` as `state_specs` says (group parallel, see `partition_specs`; the step's model must then be built with
    `group_split=GroupSplit(MODEL, mesh.shape[MODEL])`). `step` reduces over `axis_name` itself (`pmean` of
    gradients and metrics, `psum` of evaluation counts), so its other outputs are replicated. `shard_map`'s
    replication checks are on (`check_vma`): an output declared replicated that could differ between devices (BN
    statistics without `axis_name`, a group-parallel `grad_norm` without `split_norm`) is refused when the step is
    traced, before it runs.
    """
    out_specs = (state_specs, P()) if returns_state else P()
    mapped = jax.shard_map(functools.partial(step, axis_name=DATA), mesh=mesh, in_specs=(state_specs, batch_spec),
                           out_specs=out_specs)
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


# --- group parallel ---------------------------------------------------------------------------------------------

def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def group_parallel_rules(model: Any) -> tuple:
    """The (path regex, partition) rules of a model whose family has a group-parallel form."""
    from gconv.models import FAMILIES, family_of

    rules = family_of(model).split_rules
    if not rules:
        able = [f.name for f in FAMILIES if f.split_rules]
        raise ValueError(f"{type(model).__name__} has no group-parallel form: use a model of {able}, or mesh.model=1.")
    return rules


def partition_specs(tree: Any, rules: tuple) -> Any:
    """A `PartitionSpec` per leaf: the first rule whose regex matches the leaf's path ("stage2/unit0/dw_conv/kernel",
    also inside optimizer states and batch stats), else replicated."""
    compiled = [(re.compile(pattern), P(*spec)) for pattern, spec in rules]

    def spec(path, leaf):
        name = _path_str(path)
        for pattern, partition in compiled:
            if pattern.search(name) and len(partition) <= jnp.ndim(leaf):
                return partition
        return P()

    return jax.tree_util.tree_map_with_path(spec, tree)


def shard_state(state: Any, mesh: Mesh, state_specs: Any) -> Any:
    """Places a state onto `mesh`: replicated for `P()`, else split as the pytree of specs says."""
    if isinstance(state_specs, P):
        return jax.device_put(state, NamedSharding(mesh, state_specs))
    return jax.device_put(state, jax.tree.map(lambda s: NamedSharding(mesh, s), state_specs,
                                              is_leaf=lambda x: isinstance(x, P)))


# --- a run's input and steps on its mesh ---------------------------------------------------------------------

def _positions(mesh: Mesh, axis: str) -> list[int]:
    """This process's positions along `axis` of the mesh, checked to be one aligned block."""
    where = np.argwhere(np.vectorize(lambda d: d.process_index == jax.process_index())(mesh.devices))
    mine = sorted(set(where[:, mesh.axis_names.index(axis)].tolist()))
    if not mine or mine != list(range(mine[0], mine[0] + len(mine))) or mine[0] % len(mine):
        raise ValueError(f"process {jax.process_index()} holds the {axis}-axis positions {mine} of the mesh: each "
                         f"process must hold one aligned block of it (order devices by process).")
    return mine


def input_shard(mesh: Mesh) -> dict:
    """`{shard_index, shard_count}` of this process's rows of each global batch: the block of the mesh's `data` axis
    that its devices hold (all of it when the `model` or `member` axis, not `data`, spans the processes)."""
    mine = _positions(mesh, DATA)
    return {"shard_index": mine[0] // len(mine), "shard_count": mesh.shape[DATA] // len(mine)}


def member_block(mesh: Mesh, count: int) -> range:
    """The members (of `count`) whose batches this process feeds: those on its positions of the `member` axis."""
    if MEMBER not in mesh.axis_names:
        return range(count)
    mine, per = _positions(mesh, MEMBER), count // mesh.shape[MEMBER]
    return range(mine[0] * per, (mine[-1] + 1) * per)


def member_specs(specs: Any, mesh: Mesh) -> Any:
    """Partition specs of a members' state (a leading member axis) from one member's: the member axis split over
    the mesh's `member` axis, or not split (every device holds every member) on a mesh without one."""
    lead = MEMBER if MEMBER in mesh.axis_names else None
    if isinstance(specs, P):
        return P(lead, *specs)
    return jax.tree.map(lambda s: P(lead, *s), specs, is_leaf=lambda x: isinstance(x, P))


def split_norm(param_specs: Any, axis: str = MODEL) -> Callable[[Any], jax.Array]:
    """The global L2 norm of a gradient tree, inside a group-parallel step: the squares of the leaves split over
    `axis` (as `param_specs`, the parameters' partition specs, say) are summed over it, the replicated ones counted
    once: the norm one device computes on the whole model."""

    def norm(grads: Any) -> jax.Array:
        flags = jax.tree.map(lambda s: axis in tuple(s), param_specs, is_leaf=lambda x: isinstance(x, P))
        squares = jax.tree.map(lambda g: jnp.sum(jnp.square(g)), grads)
        split = sum((q for q, f in zip(jax.tree.leaves(squares), jax.tree.leaves(flags)) if f), jnp.float32(0))
        whole = sum((q for q, f in zip(jax.tree.leaves(squares), jax.tree.leaves(flags)) if not f), jnp.float32(0))
        return jnp.sqrt(jax.lax.psum(split, axis) + whole)

    return norm


def place_rows(batch: dict, mesh: Mesh) -> dict:
    """This process's rows of a global host batch (evaluation), as arrays split over the mesh's `data` axis."""
    shard = input_shard(mesh)
    rows = len(batch["label"]) // shard["shard_count"]
    start = shard["shard_index"] * rows
    return shard_batch(jax.tree.map(lambda x: x[start:start + rows], batch), mesh)


def compile_steps(train_step: Callable, eval_step: Callable, mesh: Mesh, state_specs: Any = P(),
                  mode: str = "shard_map", members: bool = False) -> tuple[Callable, Callable, Callable, Callable]:
    """`(train_fn, eval_fn, place_train, place_eval)` for a run on `mesh`: one jitted step on a single device, else
    steps over the mesh through `shard_map` (or data parallel through `pmap`, `mode="pmap"`). `place_train` takes
    this process's rows of a training batch, `place_eval` a global evaluation batch.

    `members`: the steps take a members' state (`state_specs` are one member's; the member axis is split over the
    mesh's `member` axis when it has one) and training batches `(K_here, rows, ...)`; their metrics are replicated."""
    if mesh.size == 1:
        return jax.jit(train_step, donate_argnums=0), jax.jit(eval_step), (lambda b: b), (lambda b: b)
    if mode == "pmap":
        return pmap_data_parallel(train_step), jax.jit(eval_step), (lambda b: b), (lambda b: b)
    batch_spec = P(DATA)
    if members:
        state_specs = member_specs(state_specs, mesh)
        batch_spec = P(MEMBER if MEMBER in mesh.axis_names else None, DATA)
    return (shard_step(train_step, mesh, state_specs, batch_spec=batch_spec),
            shard_step(eval_step, mesh, state_specs, returns_state=False, donate=False),
            functools.partial(shard_batch, mesh=mesh, spec=batch_spec), functools.partial(place_rows, mesh=mesh))


def split_of(mesh: Mesh) -> GroupSplit:
    """The group split a model needs for `mesh`: its `model` axis."""
    return GroupSplit(MODEL, mesh.shape[MODEL])
