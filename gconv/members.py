"""Members: runs that build the same shapes, trained together as one program over a leading member axis.

The seeds of a sweep point, and sweep points that differ only in values that change no shape (`JOINABLE`: seed,
learning rate and its schedule, weight decay, momentum, label smoothing), are K runs of one program. `launch.py`
groups them (`group_runs`) and `gconv.train.train_members` trains each group: the K states are stacked and the
train step is `vmap`ped over them, so the step, the evaluation and the initialisation compile once for K runs and
step together. Each member keeps its own init key, data order and augmentation, BatchNorm statistics, optimizer
state (holding its learning-rate schedule, weight decay and momentum: gconv.optim), label smoothing and NaN guard,
and its own run directory (`POINT_seedS/`, as if it had run alone).

`--config.members`: "auto" (default) joins on an accelerator and not on the CPU (see `member_limit`), "on" joins
everywhere, "off" trains every run on its own, N joins at most N runs. Memory: K times one run's state and
activations (`--config.member_vmap=W` computes W members at a time). `--config.mesh.member=M` spreads the members
over M blocks of devices (K / M members each).
"""
from __future__ import annotations

import json
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from gconv.config import flat_items
from gconv.ops import choice

__all__ = ["JOINABLE", "group_runs", "member_limit", "vmap_width", "member_train_step", "member_eval_step"]

# Config keys whose values may differ between members: they change no shape and no step of the loop.
JOINABLE = ("seed", "seeds", "members", "design_space", "paper_top1_error", "paper_top5_error",
            "optim.learning_rate", "optim.warmup_epochs", "optim.schedule", "optim.decay_epochs", "optim.decay_factor",
            "optim.weight_decay", "optim.momentum", "optim.label_smoothing")


def member_limit(config: ml_collections.ConfigDict) -> int:
    """The most runs one group may hold: `members` "on" (no limit), "off" (1), a whole number N >= 1, or "auto":
    no limit on an accelerator, 1 on the CPU. On the CPU a joined step computes no faster than its members one
    after another (the CPU is busy either way), so joining saves only tracing and start-up, less than it costs
    (bench/RESULTS.md); on an accelerator, one small run leaves most of the device idle."""
    value = str(config.get("members", "auto")).strip().lower()
    if value in ("auto", "on"):
        return 1 if value == "auto" and jax.default_backend() == "cpu" else 1 << 30
    if value == "off":
        return 1
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"members={config.get('members')!r} is not known: use auto (join on an accelerator), on "
                         f"(join every run that can join), off (each run on its own) or a whole number >= 1 (the "
                         f"most runs per group).")
    return int(value)


def _program(config: ml_collections.ConfigDict) -> str:
    """What the members of a group share: the config without its joinable keys."""
    flat = flat_items(json.loads(config.to_json_best_effort()))
    return json.dumps({k: v for k, v in flat.items() if k not in JOINABLE}, sort_keys=True)


def _can_join(config: ml_collections.ConfigDict) -> bool:
    """Runs that never join: precise BatchNorm (a separate pass per run) and the pmap step (no member axis)."""
    return config.get("precise_bn_images", 0) <= 0 and config.get("parallel", "jit") == "jit"


def group_runs(runs: Sequence[tuple[str, ml_collections.ConfigDict]]) -> list[list[tuple[str, Any]]]:
    """The runs of a sweep (`config.expand_sweep`'s `(name, config)` list) in groups that train as one program: runs
    with equal configs but for `JOINABLE` keys, in order of first appearance, at most `members` (see
    `member_limit`) per group. With `mesh.member = M > 1` every group's size must be a multiple of M."""
    groups: dict[str, list] = {}
    for i, (name, config) in enumerate(runs):
        key = _program(config) if _can_join(config) and member_limit(config) > 1 else f"alone {i}"
        groups.setdefault(key, []).append((name, config))
    out = []
    for group in groups.values():
        limit = member_limit(group[0][1])
        out += [group[i:i + limit] for i in range(0, len(group), limit)]
    for group in out:
        spread = int(group[0][1].mesh.get("member", 1))
        if len(group) % spread:
            names = [name for name, _ in group]
            raise ValueError(f"mesh.member={spread} spreads members over {spread} device blocks, but the runs "
                             f"{names} form a group of {len(group)}: use a mesh.member that divides {len(group)} "
                             f"(e.g. --config.mesh.member=1), or seeds/members in multiples of {spread}.")
    return out


def vmap_width(count: int, vmap: int = 0) -> int:
    """How many of `count` members one `vmap` computes at once: `vmap` (config `member_vmap`) when it divides
    `count`; 0: all of them. Fewer at once hold less memory (activations of `vmap` members, not `count`)."""
    if vmap <= 0:
        return count
    if count % vmap:
        raise ValueError(f"member_vmap={vmap} does not divide the {count} members of a group (on one device): use a "
                         f"divisor of {count}, or 0 (all at once).")
    return vmap


def _blocks(fn: Callable, xs: Any, width: int, member_axis: str | None) -> Any:
    """`fn` over the leading axis of `xs`, `width` members at a time through `vmap` (the member axis split over the
    mesh's `member_axis` when given); the blocks one after another in the program (unrolled: XLA's CPU runs a loop
    body several times slower than the same code outside one)."""
    count = jax.tree.leaves(xs)[0].shape[0]
    mapped = jax.vmap(fn, axis_name=choice.MEMBERS, spmd_axis_name=member_axis)  # the convs see the width
    if width == count:
        return mapped(xs)
    outs = [mapped(jax.tree.map(lambda x: x[i:i + width], xs)) for i in range(0, count, width)]
    return jax.tree.map(lambda *o: jnp.concatenate(o), *outs)


def member_train_step(states: Any, batches: dict, *, step: Callable, label_smoothing: np.ndarray,
                      member_axis: str | None = None, vmap: int = 0, **kwargs) -> tuple[Any, dict]:
    """`step` (gconv.train.train_step) `vmap`ped over the members: `states` with a leading member axis, `batches`
    `(K, B, ...)`, `label_smoothing` `(K,)`. Each member's optimizer state holds its own rates and schedule
    (gconv.optim), so the step is the one a single run takes. `vmap` members are computed at once (`vmap_width`),
    in a loop over the K / `vmap` such blocks; the member axis is split over the mesh's `member_axis` when given."""
    width = vmap_width(states.step.shape[0], vmap)
    return _blocks(lambda args: step(args[0], args[1], label_smoothing=args[2], **kwargs),
                   (states, batches, jnp.asarray(label_smoothing)), width, member_axis)


def member_eval_step(states: Any, batch: dict, *, step: Callable, member_axis: str | None = None, vmap: int = 0,
                     **kwargs) -> dict:
    """`step` (gconv.train.eval_step) of every member on the same `batch`: sums with a leading member axis."""
    width = vmap_width(states.step.shape[0], vmap)
    return _blocks(lambda state: step(state, batch, **kwargs), states, width, member_axis)
