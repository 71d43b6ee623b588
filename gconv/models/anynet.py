"""AnyNet and RegNet (Radosavovic et al., "On Network Design Spaces for Visual Recognition", ICCV 2019, and
"Designing Network Design Spaces", CVPR 2020), as pycls's AnyNetX and RegNetX build them.

AnyNet: a stem, then stages of residual bottleneck blocks, each stage with its own depth d_i, width w_i (block
outputs), stride s_i, bottleneck multiplier b_i (the grouped 3x3 has round(w_i * b_i) channels) and group width
g_i (channels per group: the 3x3 has round(w_i * b_i) / g_i groups), then global pooling and the classifier. The
block is ResNeXt's (`ResNeXtBottleneck`, stride on the 3x3, projection shortcut when the shape changes), so
ResNet-50 (widths 256..2048, b = 1/4, g = 64..512) and ResNeXt-50 32x4d (b = 1/2, g = 4..32) are AnyNet instances.

RegNet: widths from a quantized linear rule (`regnet_widths`), every stage stride 2 after a 3x3/2 stem of 32
channels, one bottleneck multiplier and one group width for all stages. `regnetx_200mf` ... `regnetx_32gf` are
pycls's RegNetX models; their parameters, MACs and activations equal pycls's (`tests/test_design_spaces.py`).
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import flax.linen as nn
import jax
import numpy as np

from gconv.ops.partition import MODEL
from gconv.models.common import ClassifierNet, ModelFamily, Stage, max_pool_3x3_s2
from gconv.models.resnext import ResNeXtBottleneck

__all__ = ["AnyNet", "ANYNET_FIELDS", "regnet_widths", "compatible", "regnet_fields", "complexity", "REGNETX", "FAMILY"]

STEMS = ("simple", "resnet", "cifar")


class AnyNet(ClassifierNet):
    """AnyNet classifier. `x: (N, H, W, 3) -> (N, num_classes)` float32 logits.

    `stem="simple"`: 3x3/2 conv (RegNet); `"resnet"`: 7x7/2 conv + 3x3/2 max-pool (ResNet/ResNeXt); `"cifar"`:
    3x3/1 conv. Each stage: `depths[i]` blocks of `widths[i]` output channels, the first with `strides[i]`.
    """
    depths: Sequence[int]
    widths: Sequence[int]
    strides: Sequence[int]
    bottleneck: Sequence[float]
    group_widths: Sequence[int]
    stem: str = "simple"
    stem_width: int = 32

    def stage_shapes(self) -> list[tuple[int, int]]:
        """(bottleneck channels, groups) of each stage's grouped 3x3; raises `ValueError` naming an incompatible
        stage and the fix."""
        lengths = [len(v) for v in (self.depths, self.widths, self.strides, self.bottleneck, self.group_widths)]
        if len(set(lengths)) != 1:
            raise ValueError(f"AnyNet needs one entry per stage in depths, widths, strides, bottleneck and "
                             f"group_widths (got lengths {lengths}).")
        shapes = []
        for i, (w, b, g) in enumerate(zip(self.widths, self.bottleneck, self.group_widths)):
            inner = int(round(w * b))
            if inner < 1 or g < 1 or inner % g:
                raise ValueError(f"stage {i + 1}: width {w} x bottleneck {b} = {inner} channels is not a multiple of "
                                 f"group width {g}: adjust with gconv.models.anynet.compatible(widths, bottleneck, "
                                 f"group_widths).")
            shapes.append((inner, inner // g))
        return shapes

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if self.stem not in STEMS:
            raise ValueError(f"stem={self.stem!r}: use one of {STEMS}.")
        shapes = self.stage_shapes()
        conv, norm = self.factories(train)
        kernel, stride = {"simple": (3, 2), "resnet": (7, 2), "cifar": (3, 1)}[self.stem]
        x = nn.relu(norm(name="stem_bn")(conv(self.stem_width, kernel, strides=stride, name="stem_conv")(x)))
        if self.stem == "resnet":
            x = max_pool_3x3_s2(x)
        for i, (depth, width, (inner, groups)) in enumerate(zip(self.depths, self.widths, shapes)):
            block = functools.partial(ResNeXtBottleneck, 0, inner, groups, conv, norm, features=width)
            x = Stage(block, depth, strides=self.strides[i], name=f"stage{i + 1}")(x)
        return self.head(x)


# --- RegNet: widths from the quantized linear rule ---------------------------------------------------------------

def regnet_widths(w0: float, wa: float, wm: float, depth: int, quantum: int = 8) -> tuple[list[int], list[int]]:
    """(stage widths, stage depths) of a RegNet: block j has u_j = w0 + wa * j, k_j = round(log(u_j / w0) /
    log(wm)), width round(w0 * wm^k_j / quantum) * quantum; a stage is a run of equal widths."""
    if not (w0 > 0 and wa >= 0 and wm > 1 and depth >= 1):
        raise ValueError(f"RegNet w0={w0}, wa={wa}, wm={wm}, depth={depth}: need w0 > 0, wa >= 0, wm > 1, depth >= 1.")
    u = np.arange(depth) * wa + w0
    k = np.round(np.log(u / w0) / np.log(wm))
    per_block = (np.round(w0 * np.power(wm, k) / quantum) * quantum).astype(int)
    widths, depths = np.unique(per_block, return_counts=True)
    return [int(w) for w in widths], [int(d) for d in depths]


def compatible(widths: Sequence[int], bottleneck: Sequence[float],
               group_widths: Sequence[int]) -> tuple[list[int], list[int]]:
    """pycls's compatibility adjustment: each group width at most the bottleneck width, and the bottleneck width
    rounded to a multiple of it (widths follow). Returns (widths, group widths)."""
    inner = [int(max(1, w * b)) for w, b in zip(widths, bottleneck)]
    groups = [int(min(g, v)) for g, v in zip(group_widths, inner)]
    multiples = [int(np.lcm(g, int(b))) if b > 1 else g for g, b in zip(groups, bottleneck)]
    inner = [max(m, int(round(v / m) * m)) for v, m in zip(inner, multiples)]
    return [int(v / b) for v, b in zip(inner, bottleneck)], groups


def regnet_fields(w0: float, wa: float, wm: float, depth: int, group_width: int, bottleneck: float = 1.0) -> dict:
    """AnyNet's fields for a RegNet (X: `bottleneck=1`): 3x3/2 stem of 32 channels, every stage stride 2."""
    widths, depths = regnet_widths(w0, wa, wm, depth)
    bottlenecks = [bottleneck] * len(widths)
    widths, group_widths = compatible(widths, bottlenecks, [group_width] * len(widths))
    return dict(depths=tuple(depths), widths=tuple(widths), strides=(2,) * len(widths),
                bottleneck=tuple(bottlenecks), group_widths=tuple(group_widths), stem="simple", stem_width=32)


def complexity(fields: dict, input_shape: Sequence[int] = (224, 224, 3), num_classes: int = 1000) -> dict[str, int]:
    """`{"params", "macs", "acts"}` of the AnyNet with `fields`, computed in closed form (no model is built), in
    pycls's convention: `macs` counts the classifier's biases once each (pycls's "flops"); `acts` are the output
    elements of every conv, max-pool and the classifier. Equal to `gconv.complexity.counts(..., "pycls")`."""
    model = AnyNet(**{k: v for k, v in fields.items() if k in ANYNET_FIELDS}, num_classes=num_classes)
    shapes = model.stage_shapes()
    h, w, c = input_shape
    params = macs = acts = 0

    def conv(c_in: int, c_out: int, k: int, stride: int, groups: int = 1) -> None:
        nonlocal h, w, params, macs, acts
        h, w = (h - 1) // stride + 1, (w - 1) // stride + 1
        params += k * k * c_in // groups * c_out + 2 * c_out  # the conv and its BatchNorm's scale and bias
        macs += k * k * c_in // groups * c_out * h * w
        acts += c_out * h * w

    kernel, stride = {"simple": (3, 2), "resnet": (7, 2), "cifar": (3, 1)}[model.stem]
    conv(c, model.stem_width, kernel, stride)
    if model.stem == "resnet":
        h, w = (h - 1) // 2 + 1, (w - 1) // 2 + 1
        acts += model.stem_width * h * w
    c = model.stem_width
    for depth, width, stage_stride, (inner, groups) in zip(model.depths, model.widths, model.strides, shapes):
        for j in range(depth):
            s = stage_stride if j == 0 else 1
            if s != 1 or c != width:  # the projection shortcut, beside the block
                h0, w0 = h, w
                conv(c, width, 1, s)
                h, w = h0, w0
            conv(c, inner, 1, 1)
            conv(inner, inner, 3, s, groups)
            conv(inner, width, 1, 1)
            c = width
    params += c * num_classes + num_classes
    macs += c * num_classes + num_classes
    acts += num_classes
    return {"params": params, "macs": macs, "acts": acts}


ANYNET_FIELDS = ("depths", "widths", "strides", "bottleneck", "group_widths", "stem", "stem_width")

# pycls's RegNetX models (configs/dds_baselines/regnetx): name -> (w0, wa, wm, depth, group width)
REGNETX = {
    "200mf": (24, 36.44, 2.49, 13, 8), "400mf": (24, 24.48, 2.54, 22, 16), "600mf": (48, 36.97, 2.24, 16, 24),
    "800mf": (56, 35.73, 2.28, 16, 16), "1.6gf": (80, 34.01, 2.25, 18, 24), "3.2gf": (88, 26.31, 2.25, 25, 48),
    "4.0gf": (96, 38.65, 2.43, 23, 40), "6.4gf": (184, 60.83, 2.07, 17, 56), "8.0gf": (80, 49.56, 2.88, 23, 120),
    "12gf": (168, 73.36, 2.37, 19, 112), "16gf": (216, 55.59, 2.1, 22, 128), "32gf": (320, 69.86, 2.0, 23, 168),
}
_REGNETX_NAME = {f"regnetx_{k.replace('.', '_')}": k for k in REGNETX}


def parse_name(name: str) -> dict | None:
    if name == "anynet":
        return {}
    if name in _REGNETX_NAME:
        return regnet_fields(*REGNETX[_REGNETX_NAME[name]])
    return None


def name_of(model: AnyNet) -> str:
    fields = dict(depths=tuple(model.depths), widths=tuple(model.widths), strides=tuple(model.strides),
                  bottleneck=tuple(model.bottleneck), group_widths=tuple(model.group_widths), stem=model.stem,
                  stem_width=model.stem_width)
    for name in _REGNETX_NAME:
        if parse_name(name) == fields:
            return name
    join = lambda values: "-".join(f"{v:g}" for v in values)  # noqa: E731
    return (f"anynet_d{join(model.depths)}_w{join(model.widths)}_b{join(model.bottleneck)}"
            f"_g{join(model.group_widths)}")


def fields_of(model: AnyNet) -> dict:
    return {"depth": sum(model.depths), "widths": "/".join(map(str, model.widths)),
            "group width": "/".join(map(str, sorted(set(model.group_widths))))}


FAMILY = ModelFamily(
    name="anynet", module=AnyNet, parse=parse_name, variants=tuple(_REGNETX_NAME), name_fields=(),
    bare_name="anynet", name_of=name_of, fields_of=fields_of, sweep_axis="group width",
    split_rules=(  # as ResNeXt's block: the bottleneck's groups split over the model axis
        (r"conv_(reduce|group)/kernel", (None, None, None, MODEL)),
        (r"bn_(reduce|group)/", (MODEL,)),
        (r"conv_expand/kernel", (None, None, MODEL, None)),
    ),
    groups_of=lambda m: math.gcd(*[groups for _, groups in m.stage_shapes()]),
    layer_pairs=lambda m: [(f"stage{i + 1}/block0/conv_reduce", f"stage{i + 1}/block0/conv_group")
                           for i in range(len(m.depths))],
    input_shape=lambda m: (32, 32, 3) if m.stem == "cifar" else (224, 224, 3),
)
