"""Precise BatchNorm (pycls's `compute_precise_bn_stats`): before an evaluation, every BatchNorm's running mean and
variance are replaced by the mean and variance of its input over a fixed set of training images, instead of the
exponential average of the last training batches.

Each batch runs in training mode with momentum 0, which gives every layer's batch mean m_b and (biased) variance
v_b over that batch; over the B batches of n_b images, mean = sum n_b m_b / N and var = sum n_b (v_b + m_b^2) / N
- mean^2: the exact mean and variance over all N images of each layer's input as training mode computes it (a
layer's input depends on its batch through the BatchNorms before it, as in training).
"""
from __future__ import annotations

import itertools
from typing import Any, Callable, Iterable

import flax.linen as nn
import jax
from flax import traverse_util

from gconv import data as data_lib
from gconv.loop import host_batches

__all__ = ["precise_batch_stats", "recompute"]


def precise_batch_stats(model: nn.Module, params: Any, batch_stats: Any, batches: Iterable[dict],
                        model_state: dict | None = None, prepare: Callable[[dict], dict] = lambda batch: batch
                        ) -> Any:
    """The `batch_stats` tree recomputed over `batches` (each `image: (n_b, H, W, C)`), with the structure and
    shardings of `batch_stats`. `model` is the global model; `model_state` its other collections (read only);
    `prepare` what a batch goes through in the jitted pass first (gconv.data.standardize)."""
    model = model.clone(bn_momentum=0.0)

    @jax.jit
    def moments(batch):
        variables = {"params": params, "batch_stats": batch_stats, **(model_state or {})}
        _, updates = model.apply(variables, prepare(batch)["image"], train=True, mutable=["batch_stats"],
                                 rngs={"dropout": jax.random.PRNGKey(0)})
        return traverse_util.flatten_dict(updates["batch_stats"])

    first: dict = {}  # per layer: sum over batches of n_b * m_b
    second: dict = {}  # per layer: sum over batches of n_b * (v_b + m_b^2)
    count = 0
    for batch in batches:
        n = batch["image"].shape[0]
        flat = moments({"image": batch["image"]})
        for path in flat:
            if path[-1] == "mean":
                layer = path[:-1]
                m, v = flat[path], flat[layer + ("var",)]
                first[layer] = first.get(layer, 0.0) + n * m
                second[layer] = second.get(layer, 0.0) + n * (v + m * m)
        count += n
    if not count:
        raise ValueError("precise BatchNorm got no training images: set precise_bn_images >= 1, or 0 to turn it off.")
    flat = {}
    for layer in first:
        mean = first[layer] / count
        flat[layer + ("mean",)], flat[layer + ("var",)] = mean, second[layer] / count - mean * mean
    return jax.device_put(traverse_util.unflatten_dict(flat), jax.tree.map(lambda x: x.sharding, batch_stats))


def recompute(config: Any, p: Any, place: Callable) -> Callable | None:
    """A train state -> the state with BN statistics over the run's `precise_bn_images` fixed training images (the
    first batches of its seed's order); None when it is off. `p`: the run's program (gconv.train)."""
    if config.get("precise_bn_images", 0) <= 0:
        return None
    batch_size = config.data.batch_size

    def recompute_state(state: Any) -> Any:
        images = itertools.islice(host_batches(config, p, config.seed, 0), -(-config.precise_bn_images // batch_size))
        return state.replace(batch_stats=precise_batch_stats(p.model, state.params, state.batch_stats,
                                                             map(place, images), state.model_state,
                                                             data_lib.standardize(p.info)))

    return recompute_state
