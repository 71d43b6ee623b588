"""ResNeXt (Xie et al. 2017): ImageNet depths 50/101/152 as torchvision builds them, and CIFAR ResNeXt-29.

A block's grouped 3x3 has `int(planes * base_width / base_planes) * cardinality` channels, where `planes` is the
stage's bottleneck size (64, 128, 256, 512 on ImageNet) and `base_width` is d of "CxDd"; block outputs are
`4 * planes`. This is torchvision's arithmetic, so parameter counts match it exactly.

Names: `resnext{depth}_{C}x{d}d` (any C and d), or `resnext{depth}` with `cardinality` and `base_width` given as
arguments; depth 50/101/152 (ImageNet), 29 (CIFAR, paper section 5.3) or 11 (a tiny CIFAR-style variant: one
block per stage, planes 16/32/64).
"""
from __future__ import annotations

import functools
import re
from typing import Sequence

import flax.linen as nn
import jax

from gconv.collectives import MODEL, NO_SPLIT, GroupSplit
from gconv.models.common import ClassifierNet, ModelFamily, ModuleDef, Stage, max_pool_3x3_s2, torch_namer

EXPANSION = 4


class ResNeXtBottleneck(nn.Module):
    """1x1 reduce -> BN -> ReLU -> 3x3 grouped (stride) -> BN -> ReLU -> 1x1 expand -> BN, + shortcut, ReLU.

    `x: (N, H, W, C_in) -> (N, H / strides, W / strides, 4 * planes)`; the shortcut is a 1x1 conv + BN projection
    when the shape changes.

    Under group parallelism (the parent's `conv` carries the split) each device holds its share of the groups: the
    reduce 1x1 is column-parallel, the grouped 3x3 and its BNs are local, the expand 1x1 is row-parallel (one
    `psum` per block). Activations outside the block are replicated.
    """
    planes: int
    width: int  # channels of the grouped 3x3: cardinality * d
    cardinality: int
    conv: ModuleDef
    norm: ModuleDef
    strides: int = 1
    zero_init_last_bn: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        out_features = self.planes * EXPANSION
        y = nn.relu(self.norm(name="bn_reduce")(self.conv(self.width, 1, split="column", name="conv_reduce")(x)))
        y = self.conv(self.width, 3, groups=self.cardinality, strides=self.strides, split="local",
                      name="conv_group")(y)
        y = nn.relu(self.norm(name="bn_group")(y))
        y = self.conv(out_features, 1, split="row", name="conv_expand")(y)
        scale_init = nn.initializers.zeros if self.zero_init_last_bn else nn.initializers.ones
        y = self.norm(scale_init=scale_init, name="bn_expand")(y)
        shortcut = x
        if self.strides != 1 or x.shape[-1] != out_features:
            shortcut = self.norm(name="proj_bn")(self.conv(out_features, 1, strides=self.strides, name="proj_conv")(x))
        return nn.relu(y + shortcut)


class ResNeXt(ClassifierNet):
    """ResNeXt classifier. `x: (N, H, W, 3) -> (N, num_classes)` float32 logits.

    `stem="imagenet"`: 7x7/2 conv + 3x3/2 max-pool, stage strides 1, 2, 2, 2.
    `stem="cifar"`: 3x3/1 conv, stage strides 1, 2, 2 (ResNeXt-29, paper section 5.3).
    """
    stage_sizes: Sequence[int]
    cardinality: int
    base_width: int
    stem: str = "imagenet"
    stem_features: int = 64
    base_planes: int = 64
    zero_init_last_bn: bool = False
    group_split: GroupSplit = NO_SPLIT  # group parallel: see ResNeXtBottleneck and gconv.parallel

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if self.stem not in ("imagenet", "cifar"):
            raise ValueError(f"stem={self.stem!r}: expected 'imagenet' or 'cifar'.")
        conv, norm = self.factories(train, self.group_split)
        imagenet = self.stem == "imagenet"
        x = conv(self.stem_features, 7 if imagenet else 3, strides=2 if imagenet else 1, name="stem_conv")(x)
        x = nn.relu(norm(name="stem_bn")(x))
        if imagenet:
            x = max_pool_3x3_s2(x)
        for i, num_blocks in enumerate(self.stage_sizes):
            planes = self.base_planes * 2**i
            width = int(planes * self.base_width / self.base_planes) * self.cardinality
            block = functools.partial(ResNeXtBottleneck, planes, width, self.cardinality, conv, norm,
                                      zero_init_last_bn=self.zero_init_last_bn)
            x = Stage(block, num_blocks, strides=1 if i == 0 else 2, name=f"stage{i + 1}")(x)
        return self.head(x)


# --- the family: names, PyTorch layout, group-parallel rules, analysis -------------------------------------------

DEPTHS = {
    11: dict(stage_sizes=(1, 1, 1), stem="cifar", stem_features=16, base_planes=16, num_classes=10),
    29: dict(stage_sizes=(3, 3, 3), stem="cifar", stem_features=64, base_planes=64, num_classes=10),
    50: dict(stage_sizes=(3, 4, 6, 3)),
    101: dict(stage_sizes=(3, 4, 23, 3)),
    152: dict(stage_sizes=(3, 8, 36, 3)),
}
VARIANTS = ("resnext11_8x4d", "resnext29_8x64d", "resnext29_16x64d", "resnext50_32x4d", "resnext101_32x4d",
            "resnext101_32x8d", "resnext101_64x4d", "resnext152_32x4d")
_NAME = re.compile(r"resnext(\d+)(?:_(\d+)x(\d+)d)?")


def parse_name(name: str) -> dict | None:
    match = _NAME.fullmatch(name)
    if not match or int(match.group(1)) not in DEPTHS:
        return None
    depth, cardinality, width = match.groups()
    if cardinality is None:
        return dict(DEPTHS[int(depth)])
    if int(cardinality) < 1 or int(width) < 1:
        return None
    return dict(DEPTHS[int(depth)], cardinality=int(cardinality), base_width=int(width))


def name_of(model: ResNeXt) -> str:
    depth = 3 * sum(model.stage_sizes) + 2  # three convs per block, plus stem and head
    return f"resnext{depth}_{model.cardinality}x{model.base_width}d"


_TORCH_LAYERS = {"conv_reduce": "conv1", "bn_reduce": "bn1", "conv_group": "conv2", "bn_group": "bn2",
                 "conv_expand": "conv3", "bn_expand": "bn3", "proj_conv": "downsample.0", "proj_bn": "downsample.1"}


FAMILY = ModelFamily(
    name="resnext", module=ResNeXt, parse=parse_name, variants=VARIANTS, name_fields=("cardinality", "base_width"),
    bare_name="resnext{depth}", name_of=name_of,
    fields_of=lambda m: {"cardinality": m.cardinality, "width d": m.base_width}, sweep_axis="cardinality",
    torch_name=torch_namer({"stem_conv": "conv1", "stem_bn": "bn1", "head": "fc"},  # torchvision/timm layout
                           lambda stage, j, layer: f"layer{stage}.{j}.{_TORCH_LAYERS[layer]}"),
    split_rules=(  # how each parameter (and its optimizer state) is split over the model axis; the rest replicated
        (r"conv_(reduce|group)/kernel", (None, None, None, MODEL)),  # output channels = this device's groups
        (r"bn_(reduce|group)/", (MODEL,)),
        (r"conv_expand/kernel", (None, None, MODEL, None)),  # input rows of the row-parallel 1x1
    ),
    groups_of=lambda m: m.cardinality,
    layer_pairs=lambda m: [(f"stage{i + 1}/block0/conv_reduce", f"stage{i + 1}/block0/conv_group")
                           for i in range(len(m.stage_sizes))],  # the first block's (reduce 1x1, grouped 3x3)
)
