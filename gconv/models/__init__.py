"""Model registry: `create_model(name, **overrides)`, `list_models(pattern)` and each family's knowledge
(`family_of`), looked up from the families registered here.

Names (see each family's module):
  resnext{depth}_{C}x{d}d, resnext{depth}     gconv.models.resnext: depth 11/29 (CIFAR), 50/101/152 (ImageNet)
  shufflenet_g{g}_w{w}, shufflenet_v1         gconv.models.shufflenet
  shufflenet_v2_x{0_5,1_0,1_5,2_0}, shufflenet_v2   gconv.models.shufflenet_v2
  resnet50_root{2..64}                        gconv.models.resnext: per-stage groups (Ioannou et al.'s roots)
  alexnet_g{1,2,4}, alexnet                   gconv.models.alexnet: Caffe's bvlc_alexnet, filter groups
  nin_cifar, nin_cifar_{root,tree,col}{N}     gconv.models.nin: the thesis' NiN with filter-group schemes
  anynet, regnetx_{200mf,...,32gf}            gconv.models.anynet: pycls's AnyNetX (per-stage fields) and RegNetX
  igcv3_{w1,w3d4,wd2,wd4}, igcv3              gconv.models.igcv3: interleaved low-rank group convs (imgclsmob)
  condensenet74_c{4,8}_g{4,8}, condensenet{50,...,182}_cifar, condensenet
                                              gconv.models.condensenet: learned group convs, condensed or not
A name without its defining numbers (`resnext29`) takes them as arguments (`cardinality=8, base_width=64`).
Overrides are the model's fields (`num_classes`, `dtype`, `bn_momentum`, ...); one the model does
not take raises `ValueError`.
"""
from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import importlib
from typing import Any, Mapping

import flax.linen as nn
import jax.numpy as jnp

from gconv.models import alexnet, anynet, condensenet, igcv3, nin, resnext, shufflenet, shufflenet_v2
from gconv.models.alexnet import AlexNet
from gconv.models.anynet import AnyNet
from gconv.models.common import ModelFamily, model_state
from gconv.models.nin import NiN
from gconv.models.resnext import ResNeXt, ResNeXtBottleneck
from gconv.models.shufflenet import ShuffleNetV1, ShuffleUnit, shufflenet_v1_channels
from gconv.models.shufflenet_v2 import InvertedResidual, ShuffleNetV2

__all__ = ["create_model", "model_from_config", "list_models", "model_spec", "family_of", "register", "FAMILIES",
           "ModelFamily", "model_state", "ResNeXt", "ResNeXtBottleneck", "ShuffleNetV1", "ShuffleUnit", "ShuffleNetV2",
           "InvertedResidual", "shufflenet_v1_channels", "AlexNet", "NiN", "AnyNet"]

FAMILIES: list[ModelFamily] = [resnext.FAMILY, shufflenet.FAMILY, shufflenet_v2.FAMILY, alexnet.FAMILY, nin.FAMILY,
                               anynet.FAMILY, igcv3.FAMILY, condensenet.FAMILY]


def register(family: ModelFamily) -> ModelFamily:
    """Adds a family defined outside gconv (see docs/models.md); its names must not be taken already."""
    if any(f.name == family.name for f in FAMILIES):
        raise ValueError(f"a model family named {family.name!r} is registered already.")
    taken = [v for v in family.variants if any(f.parse(v) is not None for f in FAMILIES)]
    if taken:
        raise ValueError(f"family {family.name!r}: the names {taken} belong to a registered family already.")
    FAMILIES.append(family)
    return family


def list_models(pattern: str = "*") -> list[str]:
    """Registered names matching a shell-style `pattern` (`list_models('resnext*')`). Any `resnext{depth}_{C}x{d}d`
    with a known depth also builds, listed or not."""
    return [name for family in FAMILIES for name in family.variants if fnmatch.fnmatchcase(name, pattern)]


def _lookup(name: str) -> tuple[ModelFamily, dict[str, Any]]:
    for family in FAMILIES:
        kwargs = family.parse(name)
        if kwargs is not None:
            return family, kwargs
    close = difflib.get_close_matches(name, list_models(), n=3, cutoff=0.4)
    raise ValueError(f"unknown model {name!r}; closest: {close}. `gconv.models.list_models()` lists them all, and "
                     f"any resnext{{{','.join(map(str, resnext.DEPTHS))}}}_{{C}}x{{d}}d builds.")


def model_spec(name: str) -> tuple[type[nn.Module], dict[str, Any]]:
    """The module class and constructor arguments a registered name stands for."""
    family, kwargs = _lookup(name)
    return family.module, kwargs


def family_of(model: nn.Module | type | str) -> ModelFamily:
    """The registered family of a module, a module class or a model name."""
    if isinstance(model, str):
        return _lookup(model)[0]
    cls = model if isinstance(model, type) else type(model)
    for family in FAMILIES:
        if issubclass(cls, family.module):
            return family
    if issubclass(cls, nn.Module) and not isinstance(model, str):
        return user_family(cls)
    raise ValueError(f"{cls.__name__} is not a registered model family: register its ModelFamily in "
                     f"gconv.models.FAMILIES (see docs/models.md).")


def _init_fields(cls: type) -> list[dataclasses.Field]:
    """The fields a module class is built with (less Flax's `parent` and `name`)."""
    return [f for f in dataclasses.fields(cls) if f.init and f.name not in ("parent", "name")]


def user_family(cls: type) -> ModelFamily:
    """What gconv knows of a user's own module (`model.name="package.module:Class"`): its import path as its name,
    its scalar fields as the report's columns; no group-parallel rules (give `config.sharding` as rules), no
    PyTorch layout, no analysis pairs."""
    path = f"{cls.__module__}:{cls.__qualname__}"
    scalar = (bool, int, float, str)

    def fields_of(model: nn.Module) -> dict[str, Any]:
        return {f.name: getattr(model, f.name) for f in _init_fields(type(model))
                if isinstance(getattr(model, f.name), scalar)}

    return ModelFamily(name=path, module=cls, parse=lambda name: None, variants=(), name_fields=(), bare_name=path,
                       name_of=lambda model: path, fields_of=fields_of, sweep_axis="")


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Builds a registered model; `overrides` replace its fields (e.g. `num_classes=10, dtype=jnp.bfloat16`)."""
    family, kwargs = _lookup(name)
    fields = [f.name for f in _init_fields(family.module)]
    bad = [k for k in overrides if k not in fields]
    if bad:
        hints = {k: difflib.get_close_matches(k, fields, n=2) for k in bad}
        raise ValueError(f"{name} ({family.module.__name__}) takes no argument(s) {bad} (closest: {hints}); "
                         f"its fields are {fields}.")
    kwargs = {**kwargs, **overrides}
    required = [f.name for f in _init_fields(family.module)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in kwargs]
    if required:
        raise ValueError(f"{name} needs {required}: pass them (create_model({name!r}, "
                         f"{', '.join(f'{k}=...' for k in required)})) or use a full name such as "
                         f"{family.variants[0]!r}.")
    return family.module(**kwargs)


def import_module_class(name: str) -> type:
    """The Flax module class at an import path `"package.module:Class"`."""
    module_name, _, attr = name.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"model.name={name!r}: {e}; give an importable 'package.module:Class' (on PYTHONPATH) or a "
                         f"registered name (gconv.models.list_models()).") from None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"model.name={name!r} is {cls!r}, not a flax.linen.Module class.")
    return cls


def _user_model(name: str, kwargs: dict, num_classes: int) -> nn.Module:
    """A user's Flax module from its import path, built with the config's other fields (and `num_classes` when it
    has such a field); the same `__call__(x, train)` contract as gconv's models."""
    cls = import_module_class(name)
    fields = [f.name for f in _init_fields(cls)]
    bad = [k for k in kwargs if k not in fields]
    if bad:
        raise ValueError(f"model.name={name!r} takes no field(s) {bad}; its fields are {fields}.")
    if "dtype" in kwargs:
        kwargs["dtype"] = jnp.dtype(kwargs["dtype"])
    return cls(**kwargs, **({"num_classes": num_classes} if "num_classes" in fields else {}))


def model_from_config(model_config: Mapping[str, Any], num_classes: int, total_steps: int | None = None,
                      **overrides: Any) -> nn.Module:
    """A config's model: `name` plus every other key as a field (`dtype` given by name). A key that the name already
    fixes (`name="resnext29_8x64d"` with `cardinality`) is refused: say it once. `name` may be an import path,
    `"package.module:Class"`: a Flax module of the user's own. `total_steps`: the model a run of that many steps
    trains (its family's `for_run`)."""
    model = _from_config(model_config, num_classes, **overrides)
    return model if total_steps is None else family_of(model).for_run(model, total_steps)


def _from_config(model_config: Mapping[str, Any], num_classes: int, **overrides: Any) -> nn.Module:
    name = model_config["name"]
    if ":" in name:
        return _user_model(name, {**{k: v for k, v in model_config.items() if k != "name"}, **overrides},
                           num_classes)
    family, fixed = _lookup(name)
    twice = sorted(k for k in model_config if k in fixed and k in family.name_fields)
    if twice:
        raise ValueError(f"model.name={name!r} already fixes {twice}, which the config sets too: name the model "
                         f"without them ({family.bare_name}) and keep model.{twice[0]}=..., or drop model.{twice[0]}.")
    kwargs = {k: v for k, v in model_config.items() if k != "name"}
    kwargs["dtype"] = jnp.dtype(kwargs.get("dtype", "float32"))
    return create_model(name, num_classes=num_classes, **{**kwargs, **overrides})
