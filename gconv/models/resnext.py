"""ResNeXt (Xie et al. 2017): ImageNet depths 50/101/152 as torchvision builds them, and CIFAR ResNeXt-29.

A block's grouped 3x3 has `int(planes * base_width / base_planes) * cardinality` channels, where `planes` is the
stage's bottleneck size (64, 128, 256, 512 on ImageNet) and `base_width` is d of "CxDd"; block outputs are
`4 * planes`. This is torchvision's arithmetic, so parameter counts match it exactly.

Names: `resnext{depth}_{C}x{d}d` (any C and d), or `resnext{depth}` with `cardinality` and `base_width` given as
arguments; depth 50/101/152 (ImageNet), 29 (CIFAR, paper section 5.3) or 11 (a tiny CIFAR-style variant: one
block per stage, planes 16/32/64).

Per-stage groups at a fixed bottleneck width (`stage_groups`, one entry per stage; the width is that of C = 1)
give Ioannou et al.'s ResNet-50 root networks: `resnet50_root{N}` has N, N/2, N/4, N/8 groups (at least 1) on the
3x3 convs of stages 2-5, in torchvision's layout (stride on the 3x3, no conv biases).
"""
from __future__ import annotations

import functools
import re
from typing import Sequence

import flax.linen as nn
import jax

from gconv.ops.partition import MODEL
from gconv.models.common import (TORCHVISION, ClassifierNet, ModelFamily, ModuleDef, Stage, max_pool_3x3_s2,
                                 torch_namer)

EXPANSION = 4


class ResNeXtBottleneck(nn.Module):
    """1x1 reduce -> BN -> ReLU -> 3x3 grouped (stride) -> BN -> ReLU -> 1x1 expand -> BN, + shortcut, ReLU.

    `x: (N, H, W, C_in) -> (N, H / strides, W / strides, 4 * planes)`; the shortcut is a 1x1 conv + BN projection
    when the shape changes.
    """
    planes: int
    width: int  # channels of the grouped 3x3: cardinality * d
    cardinality: int
    conv: ModuleDef
    norm: ModuleDef
    strides: int = 1
    zero_init_last_bn: bool = False
    features: int = 0  # block outputs; 0: 4 * planes (AnyNet sets them per stage)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        out_features = self.features or self.planes * EXPANSION
        y = nn.relu(self.norm(name="bn_reduce")(self.conv(self.width, 1, name="conv_reduce")(x)))
        y = self.conv(self.width, 3, groups=self.cardinality, strides=self.strides, name="conv_group")(y)
        y = nn.relu(self.norm(name="bn_group")(y))
        y = self.conv(out_features, 1, name="conv_expand")(y)
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
    stage_groups: Sequence[int] = ()  # groups of each stage's 3x3 at the width of C = 1 (root networks); () = C

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if self.stem not in ("imagenet", "cifar"):
            raise ValueError(f"stem={self.stem!r}: expected 'imagenet' or 'cifar'.")
        conv, norm = self.factories(train)
        imagenet = self.stem == "imagenet"
        x = conv(self.stem_features, 7 if imagenet else 3, strides=2 if imagenet else 1, name="stem_conv")(x)
        x = nn.relu(norm(name="stem_bn")(x))
        if imagenet:
            x = max_pool_3x3_s2(x)
        if self.stage_groups and len(self.stage_groups) != len(self.stage_sizes):
            raise ValueError(f"stage_groups={tuple(self.stage_groups)} needs one entry per stage "
                             f"({len(self.stage_sizes)}).")
        for i, num_blocks in enumerate(self.stage_sizes):
            planes = self.base_planes * 2**i
            width = int(planes * self.base_width / self.base_planes) * self.cardinality
            groups = self.stage_groups[i] if self.stage_groups else self.cardinality
            block = functools.partial(ResNeXtBottleneck, planes, width, groups, conv, norm,
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
ROOTS = (2, 4, 8, 16, 32, 64)
VARIANTS = ("resnext11_8x4d", "resnext29_8x64d", "resnext29_16x64d", "resnext50_32x4d", "resnext101_32x4d",
            "resnext101_32x8d", "resnext101_64x4d", "resnext152_32x4d") + tuple(f"resnet50_root{n}" for n in ROOTS)
_NAME = re.compile(r"resnext(\d+)(?:_(\d+)x(\d+)d)?")
_ROOT = re.compile(r"resnet(50|101|152)_root(\d+)")


def root_groups(n: int, stages: int = 4) -> tuple[int, ...]:
    """Ioannou et al.'s root-N: N, N/2, N/4, ... groups on the 3x3s of successive stages, at least 1."""
    return tuple(max(1, n // 2**i) for i in range(stages))


def parse_name(name: str) -> dict | None:
    root = _ROOT.fullmatch(name)
    if root:
        n = int(root.group(2))
        return dict(DEPTHS[int(root.group(1))], cardinality=1, base_width=64, stage_groups=root_groups(n)) if (
            n >= 1) else None
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
    if model.stage_groups:
        groups = tuple(model.stage_groups)
        if (model.cardinality, model.base_width) == (1, 64) and groups == root_groups(groups[0], len(groups)):
            return f"resnet{depth}_root{groups[0]}"
        return f"resnext{depth}_{model.cardinality}x{model.base_width}d_g{'-'.join(map(str, groups))}"
    return f"resnext{depth}_{model.cardinality}x{model.base_width}d"


def fields_of(model: ResNeXt) -> dict:
    if model.stage_groups:
        return {"stage groups": "/".join(map(str, model.stage_groups)), "width d": model.base_width}
    return {"cardinality": model.cardinality, "width d": model.base_width}


_TORCH_LAYERS = {"conv_reduce": "conv1", "bn_reduce": "bn1", "conv_group": "conv2", "bn_group": "bn2",
                 "conv_expand": "conv3", "bn_expand": "bn3", "proj_conv": "downsample.0", "proj_bn": "downsample.1"}


FAMILY = ModelFamily(
    name="resnext", module=ResNeXt, parse=parse_name, variants=VARIANTS, name_fields=("cardinality", "base_width"),
    bare_name="resnext{depth}", name_of=name_of,
    fields_of=fields_of, sweep_axis="cardinality",
    torch_name=torch_namer({"stem_conv": "conv1", "stem_bn": "bn1", "head": "fc"},  # torchvision/timm layout
                           lambda stage, j, layer: f"layer{stage}.{j}.{_TORCH_LAYERS[layer]}"),
    split_rules=(  # how each parameter (and its optimizer state) is split over the model axis; the rest replicated
        (r"conv_(reduce|group)/kernel", (None, None, None, MODEL)),  # output channels = this device's groups
        (r"bn_(reduce|group)/", (MODEL,)),
        (r"conv_expand/kernel", (None, None, MODEL, None)),  # input rows of the row-parallel 1x1
    ),
    groups_of=lambda m: min(m.stage_groups) if m.stage_groups else m.cardinality,
    layer_pairs=lambda m: [(f"stage{i + 1}/block0/conv_reduce", f"stage{i + 1}/block0/conv_group")
                           for i in range(len(m.stage_sizes))],  # the first block's (reduce 1x1, grouped 3x3)
    input_shape=lambda m: (32, 32, 3) if m.stem == "cifar" else (224, 224, 3),
    weights={  # torchvision's IMAGENET1K_V1 (tv_in1k) and IMAGENET1K_V2 (tv2_in1k)
        ("resnext50_32x4d", "tv_in1k"): TORCHVISION + "resnext50_32x4d-7cdf4587.pth",
        ("resnext50_32x4d", "tv2_in1k"): TORCHVISION + "resnext50_32x4d-1a0047aa.pth",
        ("resnext101_32x8d", "tv_in1k"): TORCHVISION + "resnext101_32x8d-8ba56ff5.pth",
        ("resnext101_32x8d", "tv2_in1k"): TORCHVISION + "resnext101_32x8d-110c445d.pth",
        ("resnext101_64x4d", "tv_in1k"): TORCHVISION + "resnext101_64x4d-173b62eb.pth"},
)
