"""Many devices, declared: a `(member, data, model)` mesh and sharding rules from the config; the steps are
`jax.jit`s over global arrays with in/out shardings from those rules.

Models are global programs: they compute on the whole batch and the whole layer and never name a mesh axis.
Where each array lives is declared here, and XLA partitions the rest (BatchNorm's statistics, the gradients and
their norm are global computations, so N devices compute what one device computes). `grouped_conv` and
`channel_shuffle` split themselves over the mesh they are traced under (`gconv.ops.partition`), so a grouped conv
never gathers its activations.

`config.sharding.strategy` says where parameters, BatchNorm statistics and optimizer state live:
- "data": replicated (data parallel: the batch is split over `data`);
- "group": the model family's group-parallel rules (AlexNet's split generalised, Megatron-style around each
  grouped conv: column-parallel reduce 1x1, local grouped 3x3, row-parallel expand 1x1), over `model`;
- "fsdp": every leaf of at least `FSDP_MIN_SIZE` elements also split over `data` along its largest dimension
  that divides (parameters gathered per layer in the step, activations never);
- "auto" (default): "group" when `mesh.model > 1`, else "data".
`config.sharding.rules`, `((path regex, spec), ...)` with `spec` a mesh axis name or None per dimension, replace the
family's group rules (a user's own module has none): the first rule whose regex matches a leaf's path places it.
A rule that matches no parameter, a spec longer than a leaf's rank and a dimension that its axes do not divide are
errors naming the rule or the leaf, its shape and the mesh.

Members (`gconv.members`): K runs stacked on a leading axis, split over the mesh's `member` axis when it has one.
`parallel="pmap"`: the data-parallel step under `jax.pmap` (BatchNorm statistics per device, see docs/scaling.md).
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

from gconv.ops.partition import DATA, MEMBER, MODEL

__all__ = ["DATA", "MODEL", "MEMBER", "STRATEGIES", "FSDP_MIN_SIZE", "make_mesh", "replicated", "shard_batch",
           "pmap_data_parallel", "group_parallel_rules", "sharding_rules", "partition_specs", "state_specs",
           "named", "shard_state", "check_batch_divides", "input_shard", "place_rows", "compile_steps",
           "member_block", "member_specs", "MeshStep"]

STRATEGIES = ("auto", "data", "group", "fsdp")
FSDP_MIN_SIZE = 2**12  # leaves below this many elements stay replicated under "fsdp" (BN vectors, biases, scalars)


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


def pmap_data_parallel(step: Callable, devices: list | None = None) -> Callable:
    """The data-parallel step through `jax.pmap` (`step(state, batch, axis_name=...)` averages its gradients,
    metrics and BatchNorm statistics over the devices; each device normalises with its own batch's statistics):
    takes the replicated state and a global batch, reshapes the batch to `(n_devices, B / n, ...)`, and returns the
    state and metrics of device 0."""
    devices = list(devices if devices is not None else jax.local_devices())
    pmapped = jax.pmap(functools.partial(step, axis_name=DATA), axis_name=DATA, devices=devices, donate_argnums=0)
    n = len(devices)

    def run(state, batch):
        stacked = jax.tree.map(lambda x: jnp.broadcast_to(x, (n,) + jnp.shape(x)), state)
        split = jax.tree.map(lambda x: jnp.reshape(x, (n, x.shape[0] // n) + x.shape[1:]), batch)
        new_state, metrics = pmapped(stacked, split)
        return jax.tree.map(lambda x: x[0], new_state), jax.tree.map(lambda x: x[0], metrics)

    return run


# --- sharding rules -----------------------------------------------------------------------------------------

def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def group_parallel_rules(model: Any) -> tuple:
    """The (path regex, partition) rules of a model whose family has a group-parallel form."""
    from gconv.models import FAMILIES, family_of

    try:
        rules = family_of(model).split_rules
    except ValueError:
        rules = ()
    if not rules:
        able = [f.name for f in FAMILIES if f.split_rules]
        raise ValueError(f"{type(model).__name__} has no group-parallel form: use a model of {able}, give "
                         f"config.sharding as rules ((path regex, spec), ...), or mesh.model=1.")
    return rules


def sharding_rules(sharding: Any, model: Any, mesh: Mesh) -> tuple[tuple, bool]:
    """`(rules, fsdp)` that `config.sharding` (`strategy`, `rules`; see the module docstring) declares for `model`
    on `mesh`."""
    strategy, given = sharding["strategy"], tuple((str(p), tuple(s)) for p, s in sharding.get("rules", ()))
    if strategy not in STRATEGIES:
        raise ValueError(f"sharding.strategy={strategy!r} is not known: use one of {list(STRATEGIES)}.")
    for pattern, spec in given:
        unknown = [a for a in spec if a is not None and a not in mesh.axis_names]
        if unknown:
            raise ValueError(f"sharding rule {pattern!r}: {spec} names {unknown}, not axes of the mesh "
                             f"{dict(mesh.shape)}: use {list(mesh.axis_names)} or None.")
    group = strategy == "group" or (strategy in ("auto", "fsdp") and mesh.shape[MODEL] > 1)
    if given or not group or mesh.size == 1:
        return given, strategy == "fsdp"
    return group_parallel_rules(model), strategy == "fsdp"


def _check_divides(name: str, shape: tuple, spec: P, mesh: Mesh) -> None:
    for dim, axes in zip(shape, spec):
        axes = axes if isinstance(axes, tuple) else (axes,)
        size = math.prod(mesh.shape[a] for a in axes if a is not None)
        if dim % size:
            raise ValueError(f"{name} of shape {shape} cannot be split as {spec} over the mesh {dict(mesh.shape)}: "
                             f"{dim} is not divisible by {size}; change the sharding rule or the mesh.")


def _fsdp(name: str, shape: tuple, spec: P, mesh: Mesh) -> P:
    """`spec` with `data` added on the largest free dimension that `data` divides (leaves of >= FSDP_MIN_SIZE)."""
    n = mesh.shape[DATA]
    if n == 1 or math.prod(shape) < FSDP_MIN_SIZE:
        return spec
    axes = list(spec) + [None] * (len(shape) - len(spec))
    free = [i for i in sorted(range(len(shape)), key=lambda i: -shape[i]) if axes[i] is None and shape[i] % n == 0]
    if not free:
        raise ValueError(f"fsdp: {name} of shape {shape} (split {spec}) has no dimension divisible by data={n}: "
                         f"use a data axis that divides one of {shape}, or shard it by a rule.")
    axes[free[0]] = DATA
    return P(*axes)


def partition_specs(tree: Any, rules: tuple, mesh: Mesh | None = None, fsdp: bool = False) -> Any:
    """A `PartitionSpec` per leaf: the first rule whose regex matches the leaf's path ("stage2/unit0/dw_conv/kernel",
    also inside optimizer states and batch stats), else replicated; with `fsdp`, large leaves also split over
    `data`. With a `mesh`, every split is checked to divide, and every rule to match a leaf."""
    compiled = [(re.compile(pattern), P(*spec)) for pattern, spec in rules]
    used = set()

    def spec(path, leaf):
        name, shape = _path_str(path), tuple(jnp.shape(leaf))
        partition = P()
        for i, (pattern, rule) in enumerate(compiled):
            if pattern.search(name):
                if len(rule) > len(shape):
                    raise ValueError(f"sharding rule {rules[i][0]!r} gives {rule} to {name} of shape {shape}: "
                                     f"more dimensions than it has; narrow the rule's regex.")
                used.add(i)
                partition = rule
                break
        if fsdp and mesh is not None:
            partition = _fsdp(name, shape, partition, mesh)
        if mesh is not None:
            _check_divides(name, shape, partition, mesh)
        return partition

    specs = jax.tree_util.tree_map_with_path(spec, tree)
    unused = [rules[i][0] for i in range(len(rules)) if i not in used]
    if mesh is not None and unused:
        raise ValueError(f"sharding rules {unused} match no parameter: correct their regexes (paths look like "
                         f"'stage1/block0/conv_group/kernel').")
    return specs


def state_specs(state: Any, sharding: Any, model: Any, mesh: Mesh) -> Any:
    """The partition specs of a train state (`gconv.train.TrainState`, or its shapes) under `config.sharding`
    (`{"strategy": ..., "rules": ...}`, or a strategy's name)."""
    sharding = {"strategy": sharding} if isinstance(sharding, str) else sharding
    rules, fsdp = sharding_rules(sharding, model, mesh)
    return partition_specs(state, rules, mesh, fsdp)


def sharded_norm(specs: Any) -> Callable[[Any], jax.Array]:
    """`optax.tree.norm` of a tree laid out as `specs` (partition specs) say, summed where its leaves live: the
    leaves split along one dimension over the same axes are laid side by side as rows of their shards and summed as
    one array, so the devices exchange one value per set of axes (traced leaf by leaf, XLA exchanges each leaf's
    sum on its own: one exchange per leaf, the cost of a step on small models); the whole (replicated) leaves are
    summed as one array too. Squares in float32. Global: the same value on any mesh, up to the order of the
    additions."""
    def norm(tree: Any) -> jax.Array:
        mesh = jax.sharding.get_abstract_mesh()
        leaves = [jnp.asarray(leaf, jnp.float32) for leaf in jax.tree.leaves(tree)]
        leaf_specs = [P()] * len(leaves) if isinstance(specs, P) else jax.tree.leaves(
            specs, is_leaf=lambda x: isinstance(x, P))
        rows: dict[tuple, list] = {(): []}  # axes -> (shards, n) blocks: a leaf's shards in rows, () for whole ones
        sums = []  # leaves split along several dimensions: each summed on its own
        for leaf, spec in zip(leaves, leaf_specs, strict=True):
            dims = [d for d, axes in enumerate(spec) if axes is not None]
            if not dims or mesh.empty:
                rows[()].append(leaf.reshape(1, -1))
            elif len(dims) > 1:
                sums.append(jnp.sum(jnp.square(leaf)))
            else:
                axes = spec[dims[0]] if isinstance(spec[dims[0]], tuple) else (spec[dims[0]],)
                shards = math.prod(mesh.shape[a] for a in axes)
                rows.setdefault(axes, []).append(jnp.moveaxis(leaf, dims[0], 0).reshape(shards, -1))
        # one sum of squares over each concatenation (XLA fuses the concatenation into the reduction)
        return jnp.sqrt(sum(sums + [jnp.sum(jnp.square(jnp.concatenate(r, 1))) for r in rows.values() if r]))

    return norm


def named(specs: Any, mesh: Mesh) -> Any:
    """`NamedSharding`s on `mesh` of a tree of partition specs."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


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


def place_rows(batch: dict, mesh: Mesh) -> dict:
    """This process's rows of a global host batch (evaluation), as arrays split over the mesh's `data` axis."""
    shard = input_shard(mesh)
    rows = len(batch["label"]) // shard["shard_count"]
    start = shard["shard_index"] * rows
    return shard_batch(jax.tree.map(lambda x: x[start:start + rows], batch), mesh)


class MeshStep:
    """A jitted step called (and lowered) under `jax.set_mesh(mesh)`, so that the ops it traces see the mesh."""

    def __init__(self, jitted: Callable, mesh: Mesh):
        self.jitted, self.mesh = jitted, mesh

    def __call__(self, *args):
        with jax.set_mesh(self.mesh):
            return self.jitted(*args)

    def lower(self, *args):
        with jax.set_mesh(self.mesh):
            return self.jitted.lower(*args)


def compile_steps(train_step: Callable, eval_step: Callable, mesh: Mesh, specs: Any = P(), mode: str = "jit",
                  members: bool = False) -> tuple[Callable, Callable, Callable, Callable]:
    """`(train_fn, eval_fn, place_train, place_eval)` for a run on `mesh`: `jax.jit`s of the global steps with the
    state where `specs` (partition specs, see `state_specs`) put it, the batch split over `data`, the metrics
    replicated (or data parallel through `pmap`, `mode="pmap"`). `place_train` takes this process's rows of a
    training batch, `place_eval` a global evaluation batch.

    `members`: the steps take a members' state (`specs` are one member's; the member axis is split over the mesh's
    `member` axis when it has one) and training batches `(K_here, rows, ...)`."""
    if mesh.size == 1:
        return jax.jit(train_step, donate_argnums=0), jax.jit(eval_step), (lambda b: b), (lambda b: b)
    if mode == "pmap":
        return pmap_data_parallel(train_step), jax.jit(eval_step), (lambda b: b), (lambda b: b)
    batch_spec = P(DATA)
    if members:
        specs = member_specs(specs, mesh)
        batch_spec = P(MEMBER if MEMBER in mesh.axis_names else None, DATA)
    state, whole = named(specs, mesh), replicated(mesh)
    train = jax.jit(train_step, in_shardings=(state, NamedSharding(mesh, batch_spec)), out_shardings=(state, whole),
                    donate_argnums=0)
    evaluate = jax.jit(eval_step, in_shardings=(state, NamedSharding(mesh, P(DATA))), out_shardings=whole)
    return (MeshStep(train, mesh), MeshStep(evaluate, mesh),
            functools.partial(shard_batch, mesh=mesh, spec=batch_spec), functools.partial(place_rows, mesh=mesh))
