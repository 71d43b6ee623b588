"""Network-in-Network on CIFAR-10, as in Ioannou's thesis ("Deep Roots", Ioannou et al. CVPR 2017), with root,
tree and column filter groups.

conv1a 5x5 192 -> conv1b 1x1 160 -> conv1c 1x1 96 -> max-pool 3/2 -> conv2a 5x5 192 -> conv2b 1x1 192 ->
conv2c 1x1 192 -> max-pool 3/2 -> conv3a 3x3 192 -> conv3b 1x1 192 -> head 1x1 classes -> global average pool.
Maps are 32, 16 and 8 pixels (Caffe's ceil-mode pooling). Every conv has a bias and is followed by BatchNorm and
ReLU (but the classifying 1x1); He initialisation; no dropout.

Filter groups on the spatial convs conv2a / conv3a (the 1x1s stay dense: they learn to combine the groups):
  root N: N and N / 2 groups (at least 1);  tree N: N and 2N;  column N: N and N.
Names: `nin_cifar` (no groups), `nin_cifar_root{2,4,8,16}`, `nin_cifar_tree{...}`, `nin_cifar_col{...}`; the bare
`nin_cifar` takes `scheme` and `groups`. `width_multiplier` scales every layer's channels for quick runs.
"""
from __future__ import annotations

import functools
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gconv.layers import GroupedConv
from gconv.models.common import ClassifierNet, ModelFamily

SCHEMES = {"root": lambda n: (n, max(1, n // 2)), "tree": lambda n: (n, 2 * n), "column": lambda n: (n, n)}
_SHORT = {"root": "root", "tree": "tree", "column": "col"}


def scheme_groups(scheme: str, groups: int) -> tuple[int, int]:
    """`(conv2a groups, conv3a groups)` of a grouping scheme with N = `groups`."""
    if scheme not in SCHEMES:
        raise ValueError(f"scheme={scheme!r}: use one of {sorted(SCHEMES)}.")
    if groups < 1:
        raise ValueError(f"groups={groups} must be >= 1 (1: the network without groups).")
    return SCHEMES[scheme](groups)


def max_pool_3x3_s2_ceil(x: jax.Array) -> jax.Array:
    """Caffe's 3x3, stride-2 max-pool in ceil mode: `(N, H, W, C) -> (N, ceil((H - 3) / 2) + 1, ...)` (32 -> 16 -> 8)."""
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=[(0, (3 - d) % 2) for d in x.shape[1:3]])


class NiN(ClassifierNet):
    """NiN classifier. `x: (N, 32, 32, C) -> (N, num_classes)` float32 logits."""
    scheme: str = "root"
    groups: int = 1  # N of the scheme; 1: no filter groups
    width_multiplier: float = 1.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        groups2, groups3 = scheme_groups(self.scheme, self.groups) if self.groups > 1 else (1, 1)
        _, norm = self.factories(train)
        width = lambda c: max(1, int(c * self.width_multiplier))  # noqa: E731
        conv = functools.partial(GroupedConv, dtype=self.dtype, param_dtype=self.param_dtype)

        def unit(x, features, kernel, name, groups=1):
            p = kernel // 2
            y = conv(features, (kernel, kernel), groups=groups, padding=((p, p), (p, p)), name=name)(x)
            return nn.relu(norm(name=f"{name}_bn")(y))

        x = unit(x, width(192), 5, "conv1a")
        x = unit(x, width(160), 1, "conv1b")
        x = max_pool_3x3_s2_ceil(unit(x, width(96), 1, "conv1c"))
        x = unit(x, width(192), 5, "conv2a", groups2)
        x = unit(x, width(192), 1, "conv2b")
        x = max_pool_3x3_s2_ceil(unit(x, width(192), 1, "conv2c"))
        x = unit(x, width(192), 3, "conv3a", groups3)
        x = unit(x, width(192), 1, "conv3b")
        x = conv(self.num_classes, (1, 1), name="head")(x)
        return jnp.mean(x, axis=(1, 2)).astype(jnp.float32)


# --- the family ---------------------------------------------------------------------------------------------------

VARIANTS = ("nin_cifar",) + tuple(f"nin_cifar_{_SHORT[s]}{n}" for s in SCHEMES for n in (2, 4, 8, 16))
_NAME = re.compile(r"nin_cifar(?:_(root|tree|col)(\d+))?")


def parse_name(name: str) -> dict[str, Any] | None:
    match = _NAME.fullmatch(name)
    if not match:
        return None
    if match.group(1) is None:
        return dict(num_classes=10)
    scheme = {v: k for k, v in _SHORT.items()}[match.group(1)]
    return dict(scheme=scheme, groups=int(match.group(2)), num_classes=10) if int(match.group(2)) >= 2 else None


def name_of(model: NiN) -> str:
    name = "nin_cifar" if model.groups == 1 else f"nin_cifar_{_SHORT[model.scheme]}{model.groups}"
    return name + (f"_w{model.width_multiplier:g}" if model.width_multiplier != 1.0 else "")


FAMILY = ModelFamily(
    name="nin", module=NiN, parse=parse_name, variants=VARIANTS, name_fields=("scheme", "groups"),
    bare_name="nin_cifar", name_of=name_of,
    fields_of=lambda m: {"scheme": m.scheme if m.groups > 1 else "-", "groups": m.groups}, sweep_axis="groups",
    groups_of=lambda m: m.groups,
    layer_pairs=lambda m: [("conv2c", "conv3a")],  # the thesis' figure: the dense 1x1 before conv3a, and conv3a
    first_conv="conv1a", input_shape=lambda m: (32, 32, 3),
)
