"""Model registry: `create_model(name, **overrides)` and `list_models(pattern)`.

Names:
  resnext{depth}_{C}x{d}d   depth 50/101/152 (ImageNet, torchvision structure), 29 (CIFAR, paper section 5.3) or
                            11 (a tiny CIFAR-style variant: one block per stage, planes 16/32/64); any C and d.
  shufflenet_g{g}_w{w}      ShuffleNet v1, g in 1/2/3/4/8, w in 2, 3d2, 1, 3d4, d2, d4 (2x ... 0.25x).
  shufflenet_v2_x{0_5,1_0,1_5,2_0}
Overrides are the model's fields (`num_classes`, `dtype`, `param_dtype`, `bn_momentum`, `bn_epsilon`,
`axis_name`, ...); one the model does not take raises `ValueError`.
"""
from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import re
from typing import Any

import flax.linen as nn

from gconv.models.resnext import ResNeXt, ResNeXtBottleneck
from gconv.models.shufflenet import ShuffleNetV1, ShuffleNetV2, ShuffleUnit, shufflenet_v1_channels

__all__ = ["create_model", "list_models", "model_spec", "ResNeXt", "ResNeXtBottleneck", "ShuffleNetV1",
           "ShuffleNetV2", "ShuffleUnit", "shufflenet_v1_channels"]

RESNEXT_DEPTHS = {
    11: dict(stage_sizes=(1, 1, 1), stem="cifar", stem_features=16, base_planes=16, num_classes=10),
    29: dict(stage_sizes=(3, 3, 3), stem="cifar", stem_features=64, base_planes=64, num_classes=10),
    50: dict(stage_sizes=(3, 4, 6, 3)),
    101: dict(stage_sizes=(3, 4, 23, 3)),
    152: dict(stage_sizes=(3, 8, 36, 3)),
}
V1_WIDTHS = {"2": 2.0, "3d2": 1.5, "1": 1.0, "3d4": 0.75, "d2": 0.5, "d4": 0.25}
V2_WIDTHS = {"0_5": 0.5, "1_0": 1.0, "1_5": 1.5, "2_0": 2.0}

_NAMED_RESNEXT = ["resnext11_8x4d", "resnext29_8x64d", "resnext29_16x64d", "resnext50_32x4d", "resnext101_32x4d",
                  "resnext101_32x8d", "resnext101_64x4d", "resnext152_32x4d"]
_REGISTERED = (
    _NAMED_RESNEXT
    + [f"shufflenet_g{g}_w{w}" for g in (1, 2, 3, 4, 8) for w in V1_WIDTHS]
    + [f"shufflenet_v2_x{w}" for w in V2_WIDTHS]
)

_RESNEXT_RE = re.compile(r"resnext(\d+)_(\d+)x(\d+)d")
_V1_RE = re.compile(r"shufflenet_g(\d+)_w(\w+)")
_V2_RE = re.compile(r"shufflenet_v2_x(\w+)")


def list_models(pattern: str = "*") -> list[str]:
    """Registered names matching a shell-style `pattern` (`list_models('resnext*')`). Any `resnext{depth}_{C}x{d}d`
    with a known depth also builds, listed or not."""
    return [name for name in _REGISTERED if fnmatch.fnmatchcase(name, pattern)]


def _unknown(name: str) -> ValueError:
    close = difflib.get_close_matches(name, _REGISTERED, n=3, cutoff=0.4)
    return ValueError(f"unknown model {name!r}; closest: {close}. `gconv.models.list_models()` lists them all, and "
                      f"any resnext{{{','.join(map(str, RESNEXT_DEPTHS))}}}_{{C}}x{{d}}d builds.")


def model_spec(name: str) -> tuple[type[nn.Module], dict[str, Any]]:
    """The module class and constructor arguments a registered name stands for."""
    if m := _RESNEXT_RE.fullmatch(name):
        depth, cardinality, width = map(int, m.groups())
        if depth not in RESNEXT_DEPTHS or cardinality < 1 or width < 1:
            raise _unknown(name)
        return ResNeXt, dict(RESNEXT_DEPTHS[depth], cardinality=cardinality, base_width=width)
    if (m := _V2_RE.fullmatch(name)) and m.group(1) in V2_WIDTHS:
        return ShuffleNetV2, dict(width_multiplier=V2_WIDTHS[m.group(1)])
    if (m := _V1_RE.fullmatch(name)) and m.group(2) in V1_WIDTHS and int(m.group(1)) in (1, 2, 3, 4, 8):
        return ShuffleNetV1, dict(groups=int(m.group(1)), width_multiplier=V1_WIDTHS[m.group(2)])
    raise _unknown(name)


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Builds a registered model; `overrides` replace its fields (e.g. `num_classes=10, dtype=jnp.bfloat16`)."""
    cls, kwargs = model_spec(name)
    fields = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in ("parent", "name")]
    bad = [k for k in overrides if k not in fields]
    if bad:
        hints = {k: difflib.get_close_matches(k, fields, n=2) for k in bad}
        raise ValueError(f"{name} ({cls.__name__}) takes no argument(s) {bad} (closest: {hints}); "
                         f"its fields are {fields}.")
    return cls(**{**kwargs, **overrides})
