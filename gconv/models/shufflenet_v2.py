"""ShuffleNet v2 (Ma et al. 2018), structured as torchvision's `shufflenet_v2_x*`, so parameter counts equal
torchvision's.

Names: `shufflenet_v2_x{0_5,1_0,1_5,2_0}`, or `shufflenet_v2` with `width_multiplier` given (default 1.0).
"""
from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from gconv import ops
from gconv.models.common import (TORCHVISION, ClassifierNet, ModelFamily, ModuleDef, Stage, max_pool_3x3_s2,
                                 torch_namer, width_names)

# torchvision's stage output channels (stages 2-4, then the final 1x1 conv) for each width.
CHANNELS = {
    0.5: (48, 96, 192, 1024),
    1.0: (116, 232, 464, 1024),
    1.5: (176, 352, 704, 1024),
    2.0: (244, 488, 976, 2048),
}
STAGE_SIZES = (4, 8, 4)


class InvertedResidual(nn.Module):
    """ShuffleNet v2 unit. Stride 1: split channels in half, transform one half; stride 2: two strided branches.
    Then concatenate and channel-shuffle with 2 groups. `x: (N, H, W, C_in) -> (N, H / strides, W / strides, out)`.
    """
    out_features: int
    conv: ModuleDef
    norm: ModuleDef
    strides: int = 1

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


class ShuffleNetV2(ClassifierNet):
    """ShuffleNet v2 at `width_multiplier` in {0.5, 1.0, 1.5, 2.0}. `x: (N, H, W, 3) -> (N, num_classes)`."""
    width_multiplier: float = 1.0
    stage_sizes: Sequence[int] = STAGE_SIZES

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if self.width_multiplier not in CHANNELS:
            raise ValueError(
                f"width_multiplier={self.width_multiplier} has no ShuffleNet v2 definition: use one of "
                f"{sorted(CHANNELS)}.")
        *stages, last = CHANNELS[self.width_multiplier]
        conv, norm = self.factories(train)
        x = max_pool_3x3_s2(nn.relu(norm(name="stem_bn")(conv(24, 3, strides=2, name="stem_conv")(x))))
        for i, (num_units, features) in enumerate(zip(self.stage_sizes, stages)):
            unit = functools.partial(InvertedResidual, features, conv, norm)
            x = Stage(unit, num_units, prefix="unit", name=f"stage{i + 2}")(x)
        x = nn.relu(norm(name="last_bn")(conv(last, 1, name="last_conv")(x)))
        return self.head(x)


# --- the family: names, PyTorch layout ----------------------------------------------------------------------------

WIDTHS = {"0_5": 0.5, "1_0": 1.0, "1_5": 1.5, "2_0": 2.0}
VARIANTS, parse_name, name_of = width_names("shufflenet_v2", "shufflenet_v2_x", WIDTHS)


_TORCH_LAYERS = {"branch1_dw_conv": "branch1.0", "branch1_dw_bn": "branch1.1", "branch1_conv": "branch1.2",
                 "branch1_bn": "branch1.3", "branch2_conv1": "branch2.0", "branch2_bn1": "branch2.1",
                 "branch2_dw_conv": "branch2.3", "branch2_dw_bn": "branch2.4", "branch2_conv2": "branch2.5",
                 "branch2_bn2": "branch2.6"}


FAMILY = ModelFamily(
    name="shufflenet_v2", module=ShuffleNetV2, parse=parse_name, variants=VARIANTS, name_fields=("width_multiplier",),
    bare_name="shufflenet_v2", name_of=name_of, fields_of=lambda m: {"width": m.width_multiplier},
    sweep_axis="width",
    torch_name=torch_namer(  # torchvision layout
        {"stem_conv": "conv1.0", "stem_bn": "conv1.1", "last_conv": "conv5.0", "last_bn": "conv5.1", "head": "fc"},
        lambda stage, j, layer: f"stage{stage}.{j}.{_TORCH_LAYERS[layer]}"),
    weights={(name, "tv_in1k"): TORCHVISION + file for name, file in (  # torchvision's IMAGENET1K_V1
        ("shufflenet_v2_x0_5", "shufflenetv2_x0.5-f707e7126e.pth"),
        ("shufflenet_v2_x1_0", "shufflenetv2_x1-5666bf0f80.pth"),
        ("shufflenet_v2_x1_5", "shufflenetv2_x1_5-3c479a10.pth"),
        ("shufflenet_v2_x2_0", "shufflenetv2_x2_0-8be3c8ee.pth"))})
