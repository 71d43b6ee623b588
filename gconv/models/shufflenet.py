"""ShuffleNet v1 (Zhang et al. 2017), following the paper's Table 1 and structured as osmr/imgclsmob's ShuffleNet,
so parameter counts equal that project's table.

Names: `shufflenet_g{g}_w{w}` with g in 1/2/3/4/8 and w in 2, 3d2, 1, 3d4, d2, d4 (2x ... 0.25x), or `shufflenet_v1`
with `groups` and `width_multiplier` given as arguments (default 3 and 1.0).
"""
from __future__ import annotations

import functools
import re
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from gconv import ops
from gconv.models.common import (ClassifierNet, ModelFamily, ModuleDef, Stage, avg_pool_3x3_s2, max_pool_3x3_s2,
                                 torch_namer)
from gconv.ops.partition import MODEL

# Table 1 of the ShuffleNet paper: stage-2 output channels at 1x for each number of groups.
STAGE2_CHANNELS = {1: 144, 2: 200, 3: 240, 4: 272, 8: 384}
STEM_CHANNELS = 24
STAGE_SIZES = (4, 8, 4)


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
    if groups not in STAGE2_CHANNELS:
        raise ValueError(f"groups={groups} is not in ShuffleNet v1's Table 1: use one of {sorted(STAGE2_CHANNELS)}.")
    if width_multiplier <= 0:
        raise ValueError(f"width_multiplier={width_multiplier} must be positive (e.g. 0.25, 0.5, 1.0).")
    base = STAGE2_CHANNELS[groups]
    stem = int(STEM_CHANNELS * width_multiplier)
    stages = tuple(int(base * 2**i * width_multiplier) for i in range(3))
    if not _v1_channels_valid(stem, stages, groups):
        stem = _round_to(STEM_CHANNELS * width_multiplier, groups)
        stages = tuple(_round_to(base * 2**i * width_multiplier, 4 * groups) for i in range(3))
    return stem, stages


class ShuffleUnit(nn.Module):
    """ShuffleNet v1 unit: 1x1 group conv -> BN -> ReLU -> shuffle -> 3x3 depthwise -> BN -> 1x1 group conv -> BN.

    Stride 2 concatenates a 3x3/2 average-pooled shortcut (so the branch produces `out_features - C_in` channels);
    stride 1 adds the identity; ReLU after either. `x: (N, H, W, C_in) -> (N, H / strides, W / strides, out)`.
    """
    out_features: int
    groups: int
    conv: ModuleDef
    norm: ModuleDef
    strides: int = 1
    group_first: bool = True  # False for stage 2's first unit, whose 24-channel input is too thin to group
    shuffle: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        mid = self.out_features // 4
        branch_out = self.out_features - x.shape[-1] if self.strides == 2 else self.out_features
        y = self.conv(mid, 1, groups=self.groups if self.group_first else 1, name="compress_conv")(x)
        y = nn.relu(self.norm(name="compress_bn")(y))
        if self.shuffle:
            y = ops.channel_shuffle(y, self.groups)
        y = self.norm(name="dw_bn")(self.conv(mid, 3, groups=mid, strides=self.strides, name="dw_conv")(y))
        y = self.norm(name="expand_bn")(self.conv(branch_out, 1, groups=self.groups, name="expand_conv")(y))
        if self.strides == 1:
            return nn.relu(y + x)
        return nn.relu(jnp.concatenate([y, avg_pool_3x3_s2(x)], axis=-1))


class ShuffleNetV1(ClassifierNet):
    """ShuffleNet v1. `x: (N, H, W, 3) -> (N, num_classes)` float32 logits. Stages are named stage2..stage4."""
    groups: int = 3
    width_multiplier: float = 1.0
    shuffle: bool = True
    stage_sizes: Sequence[int] = STAGE_SIZES

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        stem, stages = shufflenet_v1_channels(self.groups, self.width_multiplier)
        conv, norm = self.factories(train)
        x = conv(stem, 3, strides=2, name="stem_conv")(x)
        x = max_pool_3x3_s2(nn.relu(norm(name="stem_bn")(x)))
        for i, (num_units, features) in enumerate(zip(self.stage_sizes, stages)):
            unit = functools.partial(ShuffleUnit, features, self.groups, conv, norm, shuffle=self.shuffle)
            first = functools.partial(unit, group_first=False) if i == 0 else None
            x = Stage(unit, num_units, prefix="unit", first=first, name=f"stage{i + 2}")(x)
        return self.head(x)


# --- the family: names, PyTorch layout, group-parallel rules, analysis -------------------------------------------

WIDTHS = {"2": 2.0, "3d2": 1.5, "1": 1.0, "3d4": 0.75, "d2": 0.5, "d4": 0.25}
VARIANTS = tuple(f"shufflenet_g{g}_w{w}" for g in (1, 2, 3, 4, 8) for w in WIDTHS)
_NAME = re.compile(r"shufflenet_g(\d+)_w(\w+)")


def parse_name(name: str) -> dict | None:
    if name == "shufflenet_v1":
        return {}
    match = _NAME.fullmatch(name)
    if not match or match.group(2) not in WIDTHS or int(match.group(1)) not in STAGE2_CHANNELS:
        return None
    return dict(groups=int(match.group(1)), width_multiplier=WIDTHS[match.group(2)])


def name_of(model: ShuffleNetV1) -> str:
    code = {v: k for k, v in WIDTHS.items()}.get(model.width_multiplier, f"{model.width_multiplier:g}")
    return f"shufflenet_g{model.groups}_w{code}" + ("" if model.shuffle else "_noshuffle")


_TORCH_LAYERS = {"compress_conv": "compress_conv1", "compress_bn": "compress_bn1", "dw_conv": "dw_conv2",
                 "dw_bn": "dw_bn2", "expand_conv": "expand_conv3", "expand_bn": "expand_bn3"}


FAMILY = ModelFamily(
    name="shufflenet_v1", module=ShuffleNetV1, parse=parse_name, variants=VARIANTS,
    name_fields=("groups", "width_multiplier"), bare_name="shufflenet_v1", name_of=name_of,
    fields_of=lambda m: {"groups": m.groups, "width": m.width_multiplier, "shuffle": m.shuffle},
    sweep_axis="groups",
    torch_name=torch_namer(  # imgclsmob layout
        {"stem_conv": "features.init_block.conv", "stem_bn": "features.init_block.bn", "head": "output"},
        lambda stage, j, layer: f"features.stage{stage - 1}.unit{j + 1}.{_TORCH_LAYERS[layer]}"),
    split_rules=(  # how each parameter (and its optimizer state) is split over the model axis; the rest replicated
        (r"unit\d+/(compress|dw|expand)_conv/kernel", (None, None, None, MODEL)),
        (r"unit\d+/(compress|dw|expand)_bn/", (MODEL,)),
        (r"head/kernel", (MODEL, None)),  # row-parallel classifier over the split features
    ),
    groups_of=lambda m: m.groups,
    layer_pairs=lambda m: [(f"stage{i + 2}/unit1/dw_conv", f"stage{i + 2}/unit1/expand_conv")
                           for i, n in enumerate(m.stage_sizes) if n > 1],  # (depthwise 3x3, grouped expand 1x1)
)
