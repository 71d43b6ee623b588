"""ShuffleNet v1 (Zhang et al. 2017) and ShuffleNet v2 (Ma et al. 2018).

v1 follows the paper's Table 1 and is structured as osmr/imgclsmob's ShuffleNet, so parameter counts equal that
project's table; v2 is structured as torchvision's `shufflenet_v2_x*`, so counts equal torchvision's.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from gconv import ops
from gconv.models.common import (ModuleDef, avg_pool_3x3_s2, classifier, conv_factory, max_pool_3x3_s2,
                                 norm_factory)

# Table 1 of the ShuffleNet paper: stage-2 output channels at 1x for each number of groups.
V1_STAGE2_CHANNELS = {1: 144, 2: 200, 3: 240, 4: 272, 8: 384}
V1_STEM_CHANNELS = 24
V1_STAGE_SIZES = (4, 8, 4)


def _round_to(value: float, multiple: int) -> int:
    return max(multiple, int(round(value / multiple)) * multiple)


def _v1_channels_valid(stem: int, stages: Sequence[int], groups: int) -> bool:
    """Whether every grouped 1x1 of a v1 network with these widths has channels divisible by `groups`."""
    in_ch = stem
    for i, out in enumerate(stages):
        mid = out // 4
        compress_in_ok = (i == 0) or in_ch % groups == 0  # stage 2's first 1x1 is dense
        if not (compress_in_ok and mid % groups == 0 and (out - in_ch) % groups == 0 and out % groups == 0
                and out > in_ch):
            return False
        in_ch = out
    return True


def shufflenet_v1_channels(groups: int, width_multiplier: float) -> tuple[int, tuple[int, int, int]]:
    """Stem and stage 2/3/4 output channels for `groups` at `width_multiplier`.

    As imgclsmob: `int(channels * multiplier)`. Where that leaves a grouped conv with channels not divisible by
    `groups` (e.g. g=8 at 0.25x: a 6-channel stem), stages are rounded to multiples of `4 * groups` and the stem
    to a multiple of `groups`, the smallest change that makes the network valid.
    """
    if groups not in V1_STAGE2_CHANNELS:
        raise ValueError(f"groups={groups} is not in ShuffleNet v1's Table 1: use one of {sorted(V1_STAGE2_CHANNELS)}.")
    if width_multiplier <= 0:
        raise ValueError(f"width_multiplier={width_multiplier} must be positive (e.g. 0.25, 0.5, 1.0).")
    base = V1_STAGE2_CHANNELS[groups]
    stem = int(V1_STEM_CHANNELS * width_multiplier)
    stages = tuple(int(base * 2**i * width_multiplier) for i in range(3))
    if not _v1_channels_valid(stem, stages, groups):
        stem = _round_to(V1_STEM_CHANNELS * width_multiplier, groups)
        stages = tuple(_round_to(base * 2**i * width_multiplier, 4 * groups) for i in range(3))
    return stem, stages


class ShuffleUnit(nn.Module):
    """ShuffleNet v1 unit: 1x1 group conv -> BN -> ReLU -> shuffle -> 3x3 depthwise -> BN -> 1x1 group conv -> BN.

    Stride 2 concatenates a 3x3/2 average-pooled shortcut (so the branch produces `out_features - C_in` channels);
    stride 1 adds the identity; ReLU after either. `x: (N, H, W, C_in) -> (N, H / strides, W / strides, out)`.

    Group parallel (`model_size > 1`, inside `shard_map` over `model_axis`): channels are split in contiguous
    blocks, so each device holds `groups / model_size` whole groups and the unit is local except for its channel
    shuffle, one `all_to_all`. Stride-2 units gather their concatenation to keep the unsharded channel order.
    """
    out_features: int
    groups: int
    strides: int
    conv: ModuleDef
    norm: ModuleDef
    group_first: bool = True  # False for stage 2's first unit, whose 24-channel input is too thin to group
    shuffle: bool = True
    model_axis: str | None = None
    model_size: int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        m, axis = self.model_size, self.model_axis
        if self.groups % m:
            raise ValueError(f"groups={self.groups} is not divisible by the {m} devices of the model axis.")
        sharded_input = m > 1 and self.group_first  # only stage 2's first unit sees the replicated stem output
        if m > 1 and not sharded_input:
            x = ops.model_parallel_input(x, axis)
        c_in = x.shape[-1] * (m if sharded_input else 1)
        mid = self.out_features // 4
        branch_out = self.out_features - c_in if self.strides == 2 else self.out_features
        y = self.conv(mid // m, 1, groups=self.groups // m if self.group_first else 1, name="compress_conv")(x)
        y = nn.relu(self.norm(name="compress_bn")(y))
        if self.shuffle:
            y = ops.sharded_channel_shuffle(y, self.groups, axis, m) if m > 1 else ops.channel_shuffle(y, self.groups)
        y = self.conv(mid // m, 3, groups=mid // m, strides=self.strides, name="dw_conv")(y)
        y = self.norm(name="dw_bn")(y)
        y = self.conv(branch_out // m, 1, groups=self.groups // m, name="expand_conv")(y)
        y = self.norm(name="expand_bn")(y)
        if self.strides == 1:
            return nn.relu(y + x)
        pooled = avg_pool_3x3_s2(x)
        if m == 1:
            return nn.relu(jnp.concatenate([y, pooled], axis=-1))
        pooled = ops.gather_channels(pooled, axis) if sharded_input else pooled
        full = jnp.concatenate([ops.gather_channels(y, axis), pooled], axis=-1)
        return nn.relu(ops.local_channels(full, axis, m))


class ShuffleNetV1Stage(nn.Module):
    """`num_units` ShuffleUnits, the first with stride 2. Units are named `unit0`, `unit1`, ..."""
    num_units: int
    out_features: int
    groups: int
    conv: ModuleDef
    norm: ModuleDef
    group_first: bool = True
    shuffle: bool = True
    model_axis: str | None = None
    model_size: int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for j in range(self.num_units):
            x = ShuffleUnit(self.out_features, self.groups, 2 if j == 0 else 1, self.conv, self.norm,
                            group_first=self.group_first or j > 0, shuffle=self.shuffle, model_axis=self.model_axis,
                            model_size=self.model_size, name=f"unit{j}")(x)
        return x


class ShuffleNetV1(nn.Module):
    """ShuffleNet v1. `x: (N, H, W, 3) -> (N, num_classes)` float32 logits. Stages are named stage2..stage4."""
    groups: int = 3
    width_multiplier: float = 1.0
    shuffle: bool = True
    stage_sizes: Sequence[int] = V1_STAGE_SIZES
    num_classes: int = 1000
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    axis_name: str | None = None
    model_axis: str | None = None  # group parallel: see ShuffleUnit and gconv.parallel
    model_size: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        stem, stages = shufflenet_v1_channels(self.groups, self.width_multiplier)
        conv = conv_factory(self.dtype, self.param_dtype)
        norm = norm_factory(train, self.bn_momentum, self.bn_epsilon, self.dtype, self.param_dtype, self.axis_name)
        x = conv(stem, 3, strides=2, name="stem_conv")(x)
        x = max_pool_3x3_s2(nn.relu(norm(name="stem_bn")(x)))
        for i, (num_units, features) in enumerate(zip(self.stage_sizes, stages)):
            x = ShuffleNetV1Stage(num_units, features, self.groups, conv, norm, group_first=i > 0,
                                  shuffle=self.shuffle, model_axis=self.model_axis, model_size=self.model_size,
                                  name=f"stage{i + 2}")(x)
        return classifier(x, self.num_classes, self.dtype, self.param_dtype,
                          self.model_axis if self.model_size > 1 else None)


# torchvision's stage output channels (stages 2-4, then the final 1x1 conv) for each width.
V2_CHANNELS = {
    0.5: (48, 96, 192, 1024),
    1.0: (116, 232, 464, 1024),
    1.5: (176, 352, 704, 1024),
    2.0: (244, 488, 976, 2048),
}
V2_STAGE_SIZES = (4, 8, 4)


class InvertedResidual(nn.Module):
    """ShuffleNet v2 unit. Stride 1: split channels in half, transform one half; stride 2: two strided branches.
    Then concatenate and channel-shuffle with 2 groups. `x: (N, H, W, C_in) -> (N, H / strides, W / strides, out)`.
    """
    out_features: int
    strides: int
    conv: ModuleDef
    norm: ModuleDef

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        half = self.out_features // 2
        if self.strides == 1:
            keep, x2 = jnp.split(x, 2, axis=-1)
        else:
            keep = self.norm(name="branch1_dw_bn")(
                self.conv(x.shape[-1], 3, groups=x.shape[-1], strides=2, name="branch1_dw_conv")(x))
            keep = nn.relu(self.norm(name="branch1_bn")(self.conv(half, 1, name="branch1_conv")(keep)))
            x2 = x
        y = nn.relu(self.norm(name="branch2_bn1")(self.conv(half, 1, name="branch2_conv1")(x2)))
        y = self.norm(name="branch2_dw_bn")(
            self.conv(half, 3, groups=half, strides=self.strides, name="branch2_dw_conv")(y))
        y = nn.relu(self.norm(name="branch2_bn2")(self.conv(half, 1, name="branch2_conv2")(y)))
        return ops.channel_shuffle(jnp.concatenate([keep, y], axis=-1), 2)


class ShuffleNetV2Stage(nn.Module):
    """`num_units` InvertedResiduals, the first with stride 2. Units are named `unit0`, `unit1`, ..."""
    num_units: int
    out_features: int
    conv: ModuleDef
    norm: ModuleDef

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for j in range(self.num_units):
            x = InvertedResidual(self.out_features, 2 if j == 0 else 1, self.conv, self.norm, name=f"unit{j}")(x)
        return x


class ShuffleNetV2(nn.Module):
    """ShuffleNet v2 at `width_multiplier` in {0.5, 1.0, 1.5, 2.0}. `x: (N, H, W, 3) -> (N, num_classes)`."""
    width_multiplier: float = 1.0
    stage_sizes: Sequence[int] = V2_STAGE_SIZES
    num_classes: int = 1000
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if self.width_multiplier not in V2_CHANNELS:
            raise ValueError(
                f"width_multiplier={self.width_multiplier} has no ShuffleNet v2 definition: use one of "
                f"{sorted(V2_CHANNELS)}.")
        *stages, last = V2_CHANNELS[self.width_multiplier]
        conv = conv_factory(self.dtype, self.param_dtype)
        norm = norm_factory(train, self.bn_momentum, self.bn_epsilon, self.dtype, self.param_dtype, self.axis_name)
        x = max_pool_3x3_s2(nn.relu(norm(name="stem_bn")(conv(24, 3, strides=2, name="stem_conv")(x))))
        for i, (num_units, features) in enumerate(zip(self.stage_sizes, stages)):
            x = ShuffleNetV2Stage(num_units, features, conv, norm, name=f"stage{i + 2}")(x)
        x = nn.relu(norm(name="last_bn")(conv(last, 1, name="last_conv")(x)))
        return classifier(x, self.num_classes, self.dtype, self.param_dtype)


# Group parallel: how each parameter (and its optimizer state) is split over the `model` axis; the rest is replicated.
V1_GROUP_PARALLEL_RULES = (
    (r"unit\d+/(compress|dw|expand)_conv/kernel", (None, None, None, "model")),
    (r"unit\d+/(compress|dw|expand)_bn/", ("model",)),
    (r"head/kernel", ("model", None)),  # row-parallel classifier over the split features
)
