"""ResNeXt (Xie et al. 2017): ImageNet depths 50/101/152 as torchvision builds them, and CIFAR ResNeXt-29.

A block's grouped 3x3 has `int(planes * base_width / base_planes) * cardinality` channels, where `planes` is the
stage's bottleneck size (64, 128, 256, 512 on ImageNet) and `base_width` is d of "CxDd"; block outputs are
`4 * planes`. This is torchvision's arithmetic, so parameter counts match it exactly.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from gconv import ops
from gconv.models.common import ModuleDef, classifier, conv_factory, max_pool_3x3_s2, norm_factory

EXPANSION = 4


class ResNeXtBottleneck(nn.Module):
    """1x1 reduce -> BN -> ReLU -> 3x3 grouped (stride) -> BN -> ReLU -> 1x1 expand -> BN, + shortcut, ReLU.

    `x: (N, H, W, C_in) -> (N, H / strides, W / strides, 4 * planes)`; the shortcut is a 1x1 conv + BN projection
    when the shape changes.

    Group parallel (`model_size > 1`, inside `shard_map` over `model_axis`): each device holds `1 / model_size` of
    the groups: the reduce 1x1 is column-parallel, the grouped 3x3 and its BNs are local, the expand 1x1 is
    row-parallel, and one `psum` per block joins the partial sums. Activations outside the block are replicated.
    """
    planes: int
    width: int  # channels of the grouped 3x3: cardinality * d
    cardinality: int
    strides: int
    conv: ModuleDef
    norm: ModuleDef
    zero_init_last_bn: bool = False
    model_axis: str | None = None
    model_size: int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        out_features = self.planes * EXPANSION
        m = self.model_size
        if self.cardinality % m:
            raise ValueError(f"cardinality={self.cardinality} is not divisible by the {m} devices of the model axis.")
        shortcut = x
        y = ops.model_parallel_input(x, self.model_axis) if m > 1 else x
        y = nn.relu(self.norm(name="bn_reduce")(self.conv(self.width // m, 1, name="conv_reduce")(y)))
        y = self.conv(self.width // m, 3, groups=self.cardinality // m, strides=self.strides, name="conv_group")(y)
        y = nn.relu(self.norm(name="bn_group")(y))
        y = self.conv(out_features, 1, name="conv_expand")(y)
        if m > 1:
            y = ops.model_parallel_output(y, self.model_axis)
        scale_init = nn.initializers.zeros if self.zero_init_last_bn else nn.initializers.ones
        y = self.norm(scale_init=scale_init, name="bn_expand")(y)
        if self.strides != 1 or x.shape[-1] != out_features:
            shortcut = self.conv(out_features, 1, strides=self.strides, name="proj_conv")(x)
            shortcut = self.norm(name="proj_bn")(shortcut)
        return nn.relu(y + shortcut)


class ResNeXtStage(nn.Module):
    """`num_blocks` bottlenecks; the first one strides and projects. Blocks are named `block0`, `block1`, ..."""
    num_blocks: int
    planes: int
    width: int
    cardinality: int
    strides: int
    conv: ModuleDef
    norm: ModuleDef
    zero_init_last_bn: bool = False
    model_axis: str | None = None
    model_size: int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for j in range(self.num_blocks):
            x = ResNeXtBottleneck(self.planes, self.width, self.cardinality, self.strides if j == 0 else 1,
                                  self.conv, self.norm, self.zero_init_last_bn, self.model_axis, self.model_size,
                                  name=f"block{j}")(x)
        return x


class ResNeXt(nn.Module):
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
    num_classes: int = 1000
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    axis_name: str | None = None
    zero_init_last_bn: bool = False
    model_axis: str | None = None  # group parallel: see ResNeXtBottleneck and gconv.parallel
    model_size: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if self.stem not in ("imagenet", "cifar"):
            raise ValueError(f"stem={self.stem!r}: expected 'imagenet' or 'cifar'.")
        conv = conv_factory(self.dtype, self.param_dtype)
        norm = norm_factory(train, self.bn_momentum, self.bn_epsilon, self.dtype, self.param_dtype, self.axis_name)
        imagenet = self.stem == "imagenet"
        x = conv(self.stem_features, 7 if imagenet else 3, strides=2 if imagenet else 1, name="stem_conv")(x)
        x = nn.relu(norm(name="stem_bn")(x))
        if imagenet:
            x = max_pool_3x3_s2(x)
        for i, num_blocks in enumerate(self.stage_sizes):
            planes = self.base_planes * 2**i
            width = int(planes * self.base_width / self.base_planes) * self.cardinality
            x = ResNeXtStage(num_blocks, planes, width, self.cardinality, 1 if i == 0 else 2, conv, norm,
                             self.zero_init_last_bn, self.model_axis, self.model_size, name=f"stage{i + 1}")(x)
        return classifier(x, self.num_classes, self.dtype, self.param_dtype)


# Group parallel: how each parameter (and its optimizer state) is split over the `model` axis; the rest is replicated.
GROUP_PARALLEL_RULES = (
    (r"conv_(reduce|group)/kernel", (None, None, None, "model")),  # output channels = this device's groups
    (r"bn_(reduce|group)/", ("model",)),
    (r"conv_expand/kernel", (None, None, "model", None)),  # input rows of the row-parallel 1x1
)
