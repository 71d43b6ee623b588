"""IGCV3 (Sun et al. 2018): interleaved low-rank group convolutions, structured as imgclsmob's `igcv3_*`
(pytorchcv), so parameter counts and MACs equal its.

A unit is a 1x1 group conv (2 groups, linear), a 2-group channel shuffle, a 3x3 depthwise conv (ReLU6) and a 1x1
group conv (2 groups, linear), with the identity added when the shapes match: MobileNetV2's inverted residual with
both pointwise convs grouped, at MobileNetV2's widths and twice its depth. imgclsmob's layout has the first
permutation only (the paper draws a second after the last conv); its weights convert.

Names: `igcv3_w1`, `igcv3_w3d4`, `igcv3_wd2`, `igcv3_wd4`, or `igcv3` with `width_multiplier` given (default 1.0).
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax

from gconv import ops
from gconv.models.common import IMGCLSMOB, ClassifierNet, ModelFamily, ModuleDef, torch_namer, width_names

GROUPS = 2  # both pointwise convs
EXPANSION = 6
STEM, LAST = 32, 1280
# (output channels, units, whether the layer opens a new stride-2 stage): MobileNetV2's table at twice its depth.
LAYERS = ((16, 1, False), (24, 4, True), (32, 6, True), (64, 8, True), (96, 6, False), (160, 6, True),
          (320, 1, False))


UNITS = tuple(units for _, units, _ in LAYERS)


def stage_channels(width_multiplier: float, units: Sequence[int] = UNITS) -> tuple[tuple[int, ...], ...]:
    """Each stage's unit output channels at `width_multiplier` (each rounded down, then up to an even number), with
    `units[k]` units of the k-th row of `LAYERS`."""
    if len(units) != len(LAYERS) or min(units) < 1:
        raise ValueError(f"units={tuple(units)} must give {len(LAYERS)} counts >= 1, one per row of IGCV3's table "
                         f"(its own: {UNITS}).")
    stages: list[list[int]] = []
    for (channels, _, new_stage), count in zip(LAYERS, units):
        if new_stage or not stages:
            stages.append([])
        stages[-1] += [_even(channels, width_multiplier)] * count
    return tuple(map(tuple, stages))


def _even(channels: int, width_multiplier: float) -> int:
    c = int(channels * width_multiplier)
    return c + c % 2


class IGCV3Unit(nn.Module):
    """`x: (N, H, W, C_in) -> (N, H / strides, W / strides, out_features)`; the hidden width is `expansion x C_in`."""
    out_features: int
    conv: ModuleDef
    norm: ModuleDef
    strides: int = 1
    expansion: int = EXPANSION

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        hidden = x.shape[-1] * self.expansion
        y = self.norm(name="bn1")(self.conv(hidden, 1, groups=GROUPS, name="conv1")(x))
        y = ops.channel_shuffle(y, GROUPS)
        y = nn.relu6(self.norm(name="bn2")(self.conv(hidden, 3, groups=hidden, strides=self.strides, name="conv2")(y)))
        y = self.norm(name="bn3")(self.conv(self.out_features, 1, groups=GROUPS, name="conv3")(y))
        return y + x if y.shape == x.shape else y


class IGCV3Stage(nn.Module):
    """Units of `channels` output channels each, the first with `strides`; `first_expansion` for the first unit."""
    channels: tuple[int, ...]
    conv: ModuleDef
    norm: ModuleDef
    strides: int = 2
    first_expansion: int = EXPANSION

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for j, features in enumerate(self.channels):
            x = IGCV3Unit(features, self.conv, self.norm, strides=self.strides if j == 0 else 1,
                          expansion=self.first_expansion if j == 0 else EXPANSION, name=f"unit{j}")(x)
        return x


class IGCV3(ClassifierNet):
    """IGCV3-D at `width_multiplier`. `x: (N, H, W, 3) -> (N, num_classes)`. `units`: the units of each row of
    `LAYERS` (fewer for a shallower network of the same layout)."""
    width_multiplier: float = 1.0
    units: Sequence[int] = UNITS

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if self.width_multiplier <= 0:
            raise ValueError(f"width_multiplier={self.width_multiplier} must be positive (1.0, 0.75, 0.5, 0.25).")
        w = self.width_multiplier
        conv, norm = self.factories(train)
        x = nn.relu6(norm(name="stem_bn")(conv(_even(STEM, w), 3, strides=2, name="stem_conv")(x)))
        for i, channels in enumerate(stage_channels(w, self.units)):
            x = IGCV3Stage(channels, conv, norm, strides=1 if i == 0 else 2, first_expansion=1 if i == 0 else EXPANSION,
                           name=f"stage{i + 1}")(x)
        last = _even(LAST, w) if w > 1 else LAST
        x = nn.relu6(norm(name="last_bn")(conv(last, 1, name="last_conv")(x)))
        return self.head(x)


# --- the family: names, PyTorch layout ----------------------------------------------------------------------------

WIDTHS = {"w1": 1.0, "w3d4": 0.75, "wd2": 0.5, "wd4": 0.25}
VARIANTS, parse_name, name_of = width_names("igcv3", "igcv3_", WIDTHS, other="w{:g}")


FAMILY = ModelFamily(
    name="igcv3", module=IGCV3, parse=parse_name, variants=VARIANTS, name_fields=("width_multiplier",),
    bare_name="igcv3", name_of=name_of, fields_of=lambda m: {"width": m.width_multiplier}, sweep_axis="width",
    torch_name=torch_namer(  # imgclsmob's layout
        {"stem_conv": "features.init_block.conv", "stem_bn": "features.init_block.bn",
         "last_conv": "features.final_block.conv", "last_bn": "features.final_block.bn", "head": "output"},
        lambda stage, j, layer: f"features.stage{stage}.unit{j + 1}.conv{layer[-1]}."
                                f"{'bn' if layer.startswith('bn') else 'conv'}"),
    weights={(name, "cv_in1k"): f"{IMGCLSMOB}{release}/{name}-{error}-{sha1}.pth.zip"  # imgclsmob's, trained by them
             for name, release, error, sha1 in (("igcv3_wd4", "v0.0.142", "2871", "c9f28301"),
                                                ("igcv3_wd2", "v0.0.132", "1732", "8c504f44"),
                                                ("igcv3_w3d4", "v0.0.207", "1140", "63f43cf8"),
                                                ("igcv3_w1", "v0.0.243", "0920", "12385791"))})
