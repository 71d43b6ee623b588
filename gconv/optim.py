"""Optimizer and learning-rate schedule from a config's `optim` block, built from optax's primitives.

SGD (momentum, Nesterov) or AdamW; linear warmup, then cosine decay, step decay (`decay_factor` at each of
`decay_epochs`) or a constant rate. Weight decay skips BatchNorm parameters and biases (every parameter of rank < 2).
"""
from __future__ import annotations

import jax
import ml_collections
import optax

__all__ = ["OPTIMIZERS", "SCHEDULES", "create_schedule", "create_optimizer", "build_optimizer"]

OPTIMIZERS, SCHEDULES = ("sgd", "adamw"), ("cosine", "step", "constant")


def create_schedule(optim: ml_collections.ConfigDict, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
    """Learning rate by step: `optim.learning_rate` after `optim.warmup_epochs` of linear warmup (from
    `lr / warmup_steps` at step 0), then the decay `optim.schedule` names over the remaining steps."""
    if optim.schedule not in SCHEDULES:
        raise ValueError(f"optim.schedule={optim.schedule!r} is not known: use one of {list(SCHEDULES)}.")
    lr, warmup = optim.learning_rate, int(optim.warmup_epochs * steps_per_epoch)
    if optim.schedule == "cosine":
        decay = optax.cosine_decay_schedule(lr, max(1, total_steps - warmup))
    elif optim.schedule == "step":  # x decay_factor from the first step of each decay epoch (counted from step 0)
        scales: dict[int, float] = {}
        for epoch in optim.decay_epochs:  # the decay's steps count from the end of warmup
            boundary = max(int(epoch * steps_per_epoch) - warmup, 0)
            scales[boundary] = scales.get(boundary, 1.0) * optim.decay_factor
        decay = optax.piecewise_constant_schedule(lr, scales)
    else:
        decay = optax.constant_schedule(lr)
    if not warmup:
        return decay
    # Warmup step s (0-based) trains at lr * (s + 1) / warmup, so the first step already moves.
    ramp = optax.linear_schedule(lr / warmup, lr, warmup - 1) if warmup > 1 else optax.constant_schedule(lr)
    return optax.join_schedules([ramp, decay], [warmup])


def build_optimizer(optim: ml_collections.ConfigDict, learning_rate: optax.ScalarOrSchedule, weight_decay,
                    momentum) -> optax.GradientTransformation:
    """The transformation `optim.name` names, with these rates (Python floats, or a member's traced values under
    `vmap`: gconv.members); its state's structure depends on `optim` alone."""
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)  # noqa: E731
    if optim.name == "sgd":
        return optax.chain(optax.add_decayed_weights(weight_decay, decay_mask),
                           optax.sgd(learning_rate, momentum=momentum, nesterov=optim.nesterov))
    if optim.name == "adamw":
        return optax.adamw(learning_rate, weight_decay=weight_decay, mask=decay_mask)
    raise ValueError(f"optim.name={optim.name!r} is not known: use one of {list(OPTIMIZERS)}.")


def create_optimizer(optim: ml_collections.ConfigDict, steps_per_epoch: int,
                     total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """`(tx, schedule)` for `optim` (see the module docstring)."""
    schedule = create_schedule(optim, steps_per_epoch, total_steps)
    return build_optimizer(optim, schedule, optim.weight_decay, optim.momentum), schedule
