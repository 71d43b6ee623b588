"""Schedules built from optax's primitives against their closed form; the optimizer's decay mask."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gconv.config import base_config
from gconv.optim import create_optimizer, create_schedule


def _closed_form(optim, steps_per_epoch: int, total: int, step: int) -> float:
    """Linear warmup to the rate (step s at (s + 1) / warmup), then cosine to 0, x factor per decay epoch, or flat."""
    warmup = int(optim.warmup_epochs * steps_per_epoch)
    warm = min(1.0, (step + 1) / warmup) if warmup else 1.0
    if optim.schedule == "cosine":
        progress = min(max((step - warmup) / max(1, total - warmup), 0.0), 1.0)
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif optim.schedule == "step":
        decay = optim.decay_factor ** sum(step >= int(e * steps_per_epoch) for e in optim.decay_epochs)
    else:
        decay = 1.0
    return optim.learning_rate * warm * decay


@pytest.mark.parametrize("schedule", ["cosine", "step", "constant"])
def test_schedule_equals_its_closed_form(schedule, rng):
    optim = base_config().optim
    optim.schedule, optim.learning_rate = schedule, float(rng.uniform(0.01, 1.0))
    optim.warmup_epochs = float(rng.choice([0.0, 0.5, 1.0, 2.5]))
    optim.decay_epochs = tuple(sorted(int(e) for e in rng.choice(np.arange(3, 10), 2, replace=False)))
    steps_per_epoch, total = int(rng.integers(3, 12)), 10 * 12
    fn = jax.jit(create_schedule(optim, steps_per_epoch, total))
    got = np.asarray([fn(s) for s in range(total + 1)])
    want = np.asarray([_closed_form(optim, steps_per_epoch, total, s) for s in range(total + 1)])
    # float32 schedule vs float64 closed form: a cosine or a product of a few factors, each within a few ulps
    # (2^-24 relative), so 1e-5 is ~100x the error; atol covers rates that decay to ~0.
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_unknown_schedule_and_optimizer_raise():
    optim = base_config().optim
    optim.schedule = "linear"
    with pytest.raises(ValueError, match="optim.schedule='linear' is not known"):
        create_schedule(optim, 10, 100)
    optim.schedule, optim.name = "cosine", "lamb"
    with pytest.raises(ValueError, match="optim.name='lamb' is not known"):
        create_optimizer(optim, 10, 100)


def test_weight_decay_skips_norms_and_biases():
    optim = base_config().optim
    optim.learning_rate, optim.momentum, optim.weight_decay = 1.0, 0.0, 0.5
    tx, _ = create_optimizer(optim, 10, 100)
    params = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))}
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    assert float(jnp.abs(updates["bias"]).max()) == 0.0 and float(jnp.abs(updates["kernel"]).min()) > 0.0


def test_rates_are_state_one_optimizer_serves_every_member(rng):
    """A state holding member B's rates (schedule, weight decay, momentum) makes A's optimizer update exactly as
    B's own optimizer does: the rates travel in the state, so K members share one optimizer (gconv.members)."""
    from gconv.optim import current_rate, hyperparams, with_hyperparams

    a, b = base_config().optim, base_config().optim
    b.learning_rate, b.weight_decay, b.momentum, b.schedule = 0.37, 1e-3, 0.5, "step"
    b.decay_epochs, b.warmup_epochs = (2, 5), 1.0
    tx_a, _ = create_optimizer(a, 10, 100)
    tx_b, schedule_b = create_optimizer(b, 10, 100)
    params = {"kernel": jnp.asarray(rng.standard_normal((3, 4)), jnp.float32),
              "bias": jnp.asarray(rng.standard_normal(4), jnp.float32)}
    state_a = with_hyperparams(tx_a.init(params), hyperparams(b, 10, 100))
    state_b = tx_b.init(params)
    for step in range(60):
        grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params)
        assert float(current_rate(state_a)) == float(current_rate(state_b)) == float(schedule_b(step))
        ua, state_a = tx_a.update(grads, state_a, params)
        ub, state_b = tx_b.update(grads, state_b, params)
        jax.tree.map(np.testing.assert_array_equal, ua, ub)
        params = optax.apply_updates(params, ub)
