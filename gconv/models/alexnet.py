"""AlexNet (Krizhevsky et al. 2012) in Caffe's `bvlc_alexnet` layout, with its filter groups.

227x227 input; conv1 96 11x11/4 -> ReLU -> LRN -> max-pool 3/2; conv2 256 5x5 pad 2 -> ReLU -> LRN -> max-pool;
conv3 384 3x3; conv4 384 3x3; conv5 256 3x3 -> max-pool; fc6 4096, fc7 4096 (ReLU, dropout 0.5), fc8 classes.
Every conv and fc has a bias. `groups` applies to conv2, conv4 and conv5, as the paper's two-GPU split does (Caffe's
`group: 2`); g = 1 is the "no groups" network of Ioannou's thesis.

`norm="lrn"` is the paper's: local response normalisation (size 5, alpha 1e-4, beta 0.75, k 1) after conv1 and
conv2, and Caffe's initialisation (Gaussian std 0.01, fc6/fc7 0.005; biases 0.1 on conv2/4/5 and fc6/7).
`norm="batch"` puts BatchNorm after every conv instead, with He initialisation: it trains without that care.

Names: `alexnet_g{1,2,4}`, or `alexnet` with `groups` given. `width_multiplier` and `fc_features` shrink it for
quick runs (`alexnet_g2_w0.25_fc256`).
"""
from __future__ import annotations

import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from gconv.layers import GroupedConv
from gconv.models.common import ClassifierNet, ModelFamily

NORMS = ("lrn", "batch")


def local_response_norm(x: jax.Array, size: int = 5, alpha: float = 1e-4, beta: float = 0.75,
                        k: float = 1.0) -> jax.Array:
    """Caffe's across-channel LRN: `x / (k + alpha / size * sum of x^2 over `size` neighbouring channels)^beta`.
    `x: (N, H, W, C)`, same shape out."""
    half = size // 2
    squares = lax.pad(jnp.square(x), jnp.asarray(0, x.dtype), ((0, 0, 0),) * 3 + ((half, size - 1 - half, 0),))
    sums = lax.reduce_window(squares, 0.0, lax.add, (1, 1, 1, size), (1, 1, 1, 1), "VALID")  # a windowed sum
    return x / jnp.power(k + (alpha / size) * sums, beta)


def max_pool_3x3_s2_valid(x: jax.Array) -> jax.Array:
    """Caffe's 3x3, stride-2 max-pool without padding: `(N, H, W, C) -> (N, (H - 3) // 2 + 1, ...)` (AlexNet's
    sizes 55 -> 27 -> 13 -> 6 come out the same under Caffe's ceil and this floor)."""
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class AlexNet(ClassifierNet):
    """AlexNet classifier. `x: (N, 227, 227, 3) -> (N, num_classes)` float32 logits (other sizes work; fc6's
    input size follows them)."""
    groups: int = 1
    norm: str = "lrn"
    width_multiplier: float = 1.0
    fc_features: int = 4096
    dropout: float = 0.5

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if self.norm not in NORMS:
            raise ValueError(f"norm={self.norm!r}: use one of {NORMS} ('lrn' is the paper's).")
        caffe = self.norm == "lrn"
        _, norm = self.factories(train)
        widths = {c: int(c * self.width_multiplier) for c in (96, 256, 384)}
        if self.groups < 1 or any(w % self.groups for w in widths.values()):
            raise ValueError(f"groups={self.groups} must divide every grouped conv's channels {sorted(widths.values())}"
                             f" (width_multiplier={self.width_multiplier}): use 1, 2 or 4 (the thesis' networks).")
        width = widths.__getitem__

        def conv(features, kernel, name, *, strides=1, padding=0, groups=1, bias=0.0):
            init = nn.initializers.normal(0.01) if caffe else nn.initializers.he_normal()
            return GroupedConv(features, (kernel, kernel), groups=groups, strides=strides,
                               padding=((padding, padding), (padding, padding)), dtype=self.dtype,
                               param_dtype=self.param_dtype, kernel_init=init,
                               bias_init=nn.initializers.constant(bias if caffe else 0.0), name=name)

        def after_conv(y, name):  # ReLU, and BatchNorm before it when norm="batch"
            return nn.relu(y if caffe else norm(name=f"{name}_bn")(y))

        x = after_conv(conv(width(96), 11, "conv1", strides=4)(x), "conv1")
        x = max_pool_3x3_s2_valid(local_response_norm(x) if caffe else x)
        x = after_conv(conv(width(256), 5, "conv2", padding=2, groups=self.groups, bias=0.1)(x), "conv2")
        x = max_pool_3x3_s2_valid(local_response_norm(x) if caffe else x)
        x = after_conv(conv(width(384), 3, "conv3", padding=1)(x), "conv3")
        x = after_conv(conv(width(384), 3, "conv4", padding=1, groups=self.groups, bias=0.1)(x), "conv4")
        x = after_conv(conv(width(256), 3, "conv5", padding=1, groups=self.groups, bias=0.1)(x), "conv5")
        x = max_pool_3x3_s2_valid(x).reshape(x.shape[0], -1)
        for name, std in (("fc6", 0.005), ("fc7", 0.005)):
            x = nn.Dense(self.fc_features, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
                         kernel_init=nn.initializers.normal(std) if caffe else nn.initializers.he_normal(),
                         bias_init=nn.initializers.constant(0.1 if caffe else 0.0))(x)
            x = nn.Dropout(self.dropout, deterministic=not train)(nn.relu(x))
        x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype, name="head",
                     kernel_init=nn.initializers.normal(0.01) if caffe else nn.initializers.lecun_normal())(x)
        return x.astype(jnp.float32)


# --- the family ---------------------------------------------------------------------------------------------------

VARIANTS = ("alexnet_g1", "alexnet_g2", "alexnet_g4")
_NAME = re.compile(r"alexnet(?:_g(\d+))?")


def parse_name(name: str) -> dict[str, Any] | None:
    match = _NAME.fullmatch(name)
    if not match:
        return None
    if match.group(1) is None:
        return {}
    return dict(groups=int(match.group(1))) if int(match.group(1)) >= 1 else None


def name_of(model: AlexNet) -> str:
    name = f"alexnet_g{model.groups}"
    if model.width_multiplier != 1.0:
        name += f"_w{model.width_multiplier:g}"
    if model.fc_features != 4096:
        name += f"_fc{model.fc_features}"
    return name + ("_bn" if model.norm == "batch" else "")


FAMILY = ModelFamily(
    name="alexnet", module=AlexNet, parse=parse_name, variants=VARIANTS, name_fields=("groups",),
    bare_name="alexnet", name_of=name_of, fields_of=lambda m: {"groups": m.groups, "norm": m.norm},
    sweep_axis="groups", groups_of=lambda m: m.groups,
    layer_pairs=lambda m: [("conv1", "conv2"), ("conv4", "conv5")],  # conv2: the split the paper's Fig. 3 shows
    first_conv="conv1", first_conv_groups=lambda m: m.groups,  # conv2's groups consume conv1's kernels in blocks
    input_shape=lambda m: (227, 227, 3),
)
