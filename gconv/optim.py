"""Optimizer and learning-rate schedule from a config's `optim` block, built from optax's primitives.

SGD (momentum, Nesterov) or AdamW; linear warmup, then cosine decay, step decay (`decay_factor` at each of
`decay_epochs`) or a constant rate. Weight decay skips BatchNorm parameters and biases (every parameter of rank < 2).

Every rate is optimizer state: weight decay and momentum through `optax.inject_hyperparams`, the learning rate
computed at each update from the schedule's numbers (`schedule_numbers`), which the state holds too. So one
optimizer serves K members with K different rates and schedules (gconv.members: each member's state holds its own,
`with_hyperparams`), and a resumed run reads them from its checkpoint.
"""
from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

__all__ = ["OPTIMIZERS", "SCHEDULES", "MAX_DECAYS", "schedule_numbers", "rate", "create_schedule",
           "create_optimizer", "build_optimizer", "hyperparams", "with_hyperparams", "current_rate"]

OPTIMIZERS, SCHEDULES = ("sgd", "adamw"), ("cosine", "step", "constant")
MAX_DECAYS = 8  # step-decay boundaries a schedule may have


def schedule_numbers(optim: ml_collections.ConfigDict, steps_per_epoch: int, total_steps: int) -> dict:
    """The numbers of the learning-rate schedule: `optim.learning_rate` (`peak`) after `optim.warmup_epochs` of
    linear warmup (`warmup` steps, from `peak / warmup` at step 0), then the decay `optim.schedule` names (`kind`)
    over the remaining `decay_steps`: cosine, x `scales[i]` from `boundaries[i]` on (step decay, counted from the
    end of warmup), or constant."""
    if optim.schedule not in SCHEDULES:
        raise ValueError(f"optim.schedule={optim.schedule!r} is not known: use one of {list(SCHEDULES)}.")
    warmup = int(optim.warmup_epochs * steps_per_epoch)
    scales: dict[int, float] = {}
    if optim.schedule == "step":
        for epoch in optim.decay_epochs:
            boundary = max(int(epoch * steps_per_epoch) - warmup, 0)
            scales[boundary] = scales.get(boundary, 1.0) * optim.decay_factor
    if len(scales) > MAX_DECAYS:
        raise ValueError(f"optim.decay_epochs={tuple(optim.decay_epochs)}: at most {MAX_DECAYS} decays.")
    boundaries = sorted(scales) + [np.iinfo(np.int32).max] * (MAX_DECAYS - len(scales))
    return {"peak": np.float32(optim.learning_rate), "warmup": np.int32(warmup),
            "kind": np.int32(SCHEDULES.index(optim.schedule)), "decay_steps": np.int32(max(1, total_steps - warmup)),
            "boundaries": np.asarray(boundaries, np.int32),
            "scales": np.asarray([scales[b] for b in sorted(scales)] + [1.0] * (MAX_DECAYS - len(scales)),
                                 np.float32)}


def rate(numbers: dict, step: jax.Array) -> jax.Array:
    """The learning rate at `step` of the schedule `numbers` describe (arrays, possibly traced)."""
    peak, warmup = jnp.asarray(numbers["peak"], jnp.float32), jnp.asarray(numbers["warmup"], jnp.int32)
    step = jnp.asarray(step, jnp.int32)
    ramp_steps = jnp.maximum(warmup - 1, 1).astype(jnp.float32)  # step s of warmup trains at peak (s + 1) / warmup
    start = peak / jnp.maximum(warmup, 1).astype(jnp.float32)
    ramp = jnp.where(warmup > 1, start + (peak - start) * jnp.minimum(step, warmup - 1) / ramp_steps, peak)
    after = jnp.maximum(step - warmup, 0)
    progress = jnp.minimum(after, numbers["decay_steps"]).astype(jnp.float32) / jnp.asarray(
        numbers["decay_steps"], jnp.float32)
    cosine = 0.5 * (1.0 + jnp.cos(math.pi * progress))
    stepped = jnp.prod(jnp.where(after >= numbers["boundaries"], numbers["scales"], 1.0))
    decay = jnp.select([numbers["kind"] == 0, numbers["kind"] == 1], [cosine, stepped], 1.0)
    return jnp.where(step < warmup, ramp, peak * decay)


def create_schedule(optim: ml_collections.ConfigDict, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
    """Learning rate by step (see `schedule_numbers`)."""
    return functools.partial(rate, schedule_numbers(optim, steps_per_epoch, total_steps))


def build_optimizer(optim: ml_collections.ConfigDict, learning_rate: optax.ScalarOrSchedule, weight_decay,
                    momentum) -> optax.GradientTransformation:
    """The transformation `optim.name` names, with these rates; its state's structure depends on `optim` alone."""
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)  # noqa: E731
    if optim.name == "sgd":
        return optax.chain(optax.add_decayed_weights(weight_decay, decay_mask),
                           optax.sgd(learning_rate, momentum=momentum, nesterov=optim.nesterov))
    if optim.name == "adamw":
        return optax.adamw(learning_rate, weight_decay=weight_decay, mask=decay_mask)
    raise ValueError(f"optim.name={optim.name!r} is not known: use one of {list(OPTIMIZERS)}.")


class ScheduledState(NamedTuple):
    """An optimizer state with its rates: the schedule's numbers, and optax's `InjectHyperparamsState`."""
    schedule: dict
    inner: Any


def hyperparams(optim: ml_collections.ConfigDict, steps_per_epoch: int, total_steps: int) -> dict:
    """The rates an optimizer state of `optim` holds: `{"schedule": numbers, "weight_decay", "momentum"}`."""
    return {"schedule": schedule_numbers(optim, steps_per_epoch, total_steps),
            "weight_decay": np.float32(optim.weight_decay), "momentum": np.float32(optim.momentum)}


def with_hyperparams(state: ScheduledState, values: dict) -> ScheduledState:
    """`state` holding the rates `values` (`hyperparams`' form: one member's, or under `vmap` each member's)."""
    inner = {**state.inner.hyperparams, **{k: jnp.asarray(values[k], state.inner.hyperparams[k].dtype)
                                            for k in ("weight_decay", "momentum")}}
    schedule = {k: jnp.asarray(v, state.schedule[k].dtype) for k, v in values["schedule"].items()}
    return ScheduledState(schedule, state.inner._replace(hyperparams=inner))


def current_rate(state: ScheduledState) -> jax.Array:
    """The learning rate the next update of `state` applies."""
    return rate(state.schedule, state.inner.count)


def create_optimizer(optim: ml_collections.ConfigDict, steps_per_epoch: int,
                     total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """`(tx, schedule)` for `optim` (see the module docstring): `tx`'s state is a `ScheduledState`."""
    if optim.name not in OPTIMIZERS:  # build_optimizer runs at init, too late to say so
        raise ValueError(f"optim.name={optim.name!r} is not known: use one of {list(OPTIMIZERS)}.")
    values = hyperparams(optim, steps_per_epoch, total_steps)
    inner = optax.inject_hyperparams(functools.partial(build_optimizer, optim))(
        learning_rate=float(values["schedule"]["peak"]), weight_decay=float(values["weight_decay"]),
        momentum=float(values["momentum"]))

    def init(params: Any) -> ScheduledState:
        return ScheduledState({k: jnp.asarray(v) for k, v in values["schedule"].items()}, inner.init(params))

    def update(updates: Any, state: ScheduledState, params: Any = None) -> tuple[Any, ScheduledState]:
        lr = current_rate(state).astype(state.inner.hyperparams["learning_rate"].dtype)
        hyper = {**state.inner.hyperparams, "learning_rate": lr}
        updates, inner_state = inner.update(updates, state.inner._replace(hyperparams=hyper), params)
        return updates, ScheduledState(state.schedule, inner_state)

    return optax.GradientTransformation(init, update), functools.partial(rate, values["schedule"])
