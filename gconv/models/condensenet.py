"""CondenseNet (Huang et al. 2018): a DenseNet whose 1x1 convs learn their groups (`gconv.layers.LearnedGroupConv`)
and condense into index gather + group conv + shuffle for inference.

The training network follows ShichenLiu/CondenseNet's `models/condensenet.py`; the condensed one (`condensed=True`,
`condense`) follows its `condensenet_converted.py` and imgclsmob's converted layout, so the condensed ImageNet
networks' parameter counts and MACs equal imgclsmob's `condensenet74_c4_g4` / `condensenet74_c8_g8`.

A unit: BN -> ReLU -> learned 1x1 conv (`groups`, condensed by `condense_factor`) to `bottleneck x growth` -> BN ->
ReLU -> 3x3 group conv (`groups`) to `growth`, concatenated to its input. Stages are joined by 2x2 average pooling;
the last ends in BN -> ReLU -> global pool -> linear (condensed: the half of its inputs of largest L1 weight).

The condensation schedule is a function of the training step, which the network counts itself (`condense/step`,
advanced by every training call while the `condense` collection is mutable): the `condense_factor - 1` stages fall
in the first `condense_steps` steps (CondenseNet: half the run). `group_lasso` > 0 adds CondenseNet's group-lasso
term, times it, to the training loss until the last stage.

Names: `condensenet74_c4_g4`, `condensenet74_c8_g8` (ImageNet), `condensenet{50,74,86,98,110,122}_cifar`
(growth 8-16-32) and `condensenet182_cifar` (growth 12-24-48), or `condensenet` with the fields given.
"""
from __future__ import annotations

import functools
import re
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gconv import ops
from gconv.layers import GatherChannels, LearnedGroupConv
from gconv.models.common import IMGCLSMOB, ClassifierNet, ModelFamily, ModuleDef

IMAGENET = dict(stage_sizes=(4, 6, 8, 10, 8), growth_rates=(8, 16, 32, 64, 128), stem_strides=2)
CIFAR_DEPTHS = (50, 74, 86, 98, 110, 122, 182)


def cifar(depth: int) -> dict[str, Any]:
    """The CIFAR CondenseNet of `depth` = 6 n + 2 (3 stages of n units, 2 convs each, stem and classifier)."""
    if depth not in CIFAR_DEPTHS:
        raise ValueError(f"CondenseNet-{depth} has no CIFAR configuration: use one of {CIFAR_DEPTHS}.")
    growth = (12, 24, 48) if depth == 182 else (8, 16, 32)
    return dict(stage_sizes=((depth - 2) // 6,) * 3, growth_rates=growth, stem_strides=1, groups=4)


def avg_pool_2x2(x: jax.Array) -> jax.Array:
    """`nn.AvgPool2d(2, 2)`: `(N, H, W, C) -> (N, H // 2, W // 2, C)`, as a reshape and a mean (XLA's CPU backward
    of `reduce_window` is several times slower)."""
    n, h, w, c = x.shape
    return x[:, :h // 2 * 2, :w // 2 * 2].reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


class CondenseUnit(nn.Module):
    """`x: (N, H, W, C) -> (N, H, W, C + growth)`. `stage`: the condensation stage while training (None: keep)."""
    growth: int
    groups: int
    condense_factor: int
    bottleneck: int
    condensed: bool
    conv: ModuleDef
    norm: ModuleDef
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    group_lasso: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, stage: jax.Array | None = None) -> jax.Array:
        hidden = self.growth * self.bottleneck
        if self.condensed:
            kept = x.shape[-1] * self.groups // self.condense_factor
            y = nn.relu(self.norm(name="bn1")(GatherChannels(kept, name="select1")(x)))
            y = ops.channel_shuffle(self.conv(hidden, 1, groups=self.groups, name="conv1")(y), self.groups)
        else:
            y = nn.relu(self.norm(name="bn1")(x))
            y = LearnedGroupConv(hidden, self.groups, self.condense_factor, self.group_lasso, dtype=self.dtype,
                                 param_dtype=self.param_dtype, name="conv1")(y, stage)
        y = self.conv(self.growth, 3, groups=self.groups, name="conv2")(nn.relu(self.norm(name="bn2")(y)))
        return jnp.concatenate([x, y], axis=-1)


class DenseStage(nn.Module):
    """`units` CondenseUnits (`unit0`, `unit1`, ...), each adding `growth` channels."""
    units: int
    unit: ModuleDef  # unit(name=...) builds one

    @nn.compact
    def __call__(self, x: jax.Array, stage: jax.Array | None = None) -> jax.Array:
        for j in range(self.units):
            x = self.unit(name=f"unit{j}")(x, stage)
        return x


class CondenseNet(ClassifierNet):
    """CondenseNet: `x: (N, H, W, 3) -> (N, num_classes)`. `groups` (G) of the learned 1x1 and the 3x3 convs;
    `condense_factor` (C; 0: G); `condensed`: the inference network; `condense_steps`: the training steps over which
    the C - 1 condensation stages happen (needed to train the learned network)."""
    stage_sizes: Sequence[int] = IMAGENET["stage_sizes"]
    growth_rates: Sequence[int] = IMAGENET["growth_rates"]
    groups: int = 4
    condense_factor: int = 0
    bottleneck: int = 4
    stem_strides: int = 2
    condensed: bool = False
    condense_steps: int = 0  # 0: half of the run's steps when launch.py trains it (FAMILY.for_run)
    head_keep: float = 0.5  # the condensed classifier's share of its inputs
    group_lasso: float = 0.0  # CondenseNet's --group-lasso-lambda (0 in its recipes): lambda of the lasso term

    @property
    def factor(self) -> int:
        return self.condense_factor or self.groups

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if len(self.stage_sizes) != len(self.growth_rates):
            raise ValueError(f"stage_sizes={tuple(self.stage_sizes)} and growth_rates={tuple(self.growth_rates)} "
                             f"must have one entry per stage.")
        conv, norm = self.factories(train)
        stage = self._condensation_stage(train)
        x = conv(2 * self.growth_rates[0], 3, strides=self.stem_strides, name="stem_conv")(x)
        for i, (units, growth) in enumerate(zip(self.stage_sizes, self.growth_rates)):
            if i:
                x = avg_pool_2x2(x)
            unit = functools.partial(CondenseUnit, growth, self.groups, self.factor, self.bottleneck, self.condensed,
                                     conv, norm, self.dtype, self.param_dtype, self.group_lasso)
            x = DenseStage(units, unit, name=f"stage{i + 1}")(x, stage)
        x = jnp.mean(nn.relu(norm(name="last_bn")(x)), axis=(1, 2))
        if self.condensed:
            x = GatherChannels(int(x.shape[-1] * self.head_keep), name="head_select")(x)
        return nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype, name="head")(x).astype(
            jnp.float32)

    def _condensation_stage(self, train: bool) -> jax.Array | None:
        """This training call's condensation stage, advancing the step counter (None: not training the learned
        network with a mutable `condense` collection)."""
        if self.condensed:
            return None
        step = self.variable("condense", "step", jnp.zeros, (), jnp.int32)
        if not train or not self.is_mutable_collection("condense") or self.is_initializing():
            return None
        if self.condense_steps < 1:
            raise ValueError(f"condense_steps={self.condense_steps}: training a learned CondenseNet needs the steps "
                             f"over which it condenses; set model.condense_steps (CondenseNet: half the run's steps).")
        stage = ops.learned.condensation_stage(step.value, self.condense_steps, self.factor)
        step.value = step.value + 1
        return stage


# --- the family: names, PyTorch layout ----------------------------------------------------------------------------

VARIANTS = ("condensenet74_c4_g4", "condensenet74_c8_g8") + tuple(f"condensenet{d}_cifar" for d in CIFAR_DEPTHS)
_IMAGENET_NAME = re.compile(r"condensenet74_c(\d+)_g(\d+)")
_CIFAR_NAME = re.compile(r"condensenet(\d+)_cifar")


def parse_name(name: str) -> dict | None:
    if name == "condensenet":
        return {}
    match = _IMAGENET_NAME.fullmatch(name)
    if match:
        factor, groups = map(int, match.groups())
        return dict(IMAGENET, groups=groups, condense_factor=factor)
    match = _CIFAR_NAME.fullmatch(name)
    if match and int(match.group(1)) in CIFAR_DEPTHS:
        return dict(cifar(int(match.group(1))), num_classes=10)
    return None


def name_of(model: CondenseNet) -> str:
    arch = dict(stage_sizes=tuple(model.stage_sizes), growth_rates=tuple(model.growth_rates),
                stem_strides=model.stem_strides)
    if arch == IMAGENET:
        return f"condensenet74_c{model.factor}_g{model.groups}"
    depth = 6 * model.stage_sizes[0] + 2
    if depth in CIFAR_DEPTHS and dict(arch, groups=model.groups) == cifar(depth) and model.factor == model.groups:
        return f"condensenet{depth}_cifar"
    return f"condensenet_{'-'.join(map(str, model.stage_sizes))}_k{'-'.join(map(str, model.growth_rates))}"


def _torch_name(path: tuple[str, ...]) -> str:
    """imgclsmob's converted layout (`features.stage1.unit1.conv1.conv`, ...)."""
    top = {"stem_conv": "features.init_block.conv", "last_bn": "features.post_activ.bn", "head": "output.linear",
           "head_select": "output"}
    if path[0] in top:
        return top[path[0]]
    stage, unit, layer = path
    conv = {"conv1": "conv1.conv", "bn1": "conv1.bn", "select1": "conv1", "conv2": "conv2.conv", "bn2": "conv2.bn"}
    return f"features.{stage}.unit{int(unit[len('unit'):]) + 1}.{conv[layer]}"


FAMILY = ModelFamily(
    name="condensenet", module=CondenseNet, parse=parse_name, variants=VARIANTS,
    name_fields=("stage_sizes", "growth_rates", "stem_strides", "groups", "condense_factor"), bare_name="condensenet",
    name_of=name_of, fields_of=lambda m: {"groups": m.groups, "condense factor": m.factor,
                                          "condensed": m.condensed, "group conv": m.group_conv},
    sweep_axis="groups", torch_name=_torch_name, groups_of=lambda m: m.groups,
    input_shape=lambda m: (224, 224, 3) if m.stem_strides == 2 else (32, 32, 3),
    for_run=lambda m, total_steps: m if m.condensed or m.condense_steps else m.clone(
        condense_steps=max(1, total_steps // 2)),
    weights={  # imgclsmob's conversion of the authors' condensed networks (top-1 error 26.25 / 28.93 %)
        ("condensenet74_c4_g4", "cv_in1k"): IMGCLSMOB + "v0.0.4/condensenet74_c4_g4-0828-5ba55049.pth.zip",
        ("condensenet74_c8_g8", "cv_in1k"): IMGCLSMOB + "v0.0.4/condensenet74_c8_g8-1006-3574d874.pth.zip"},
    weights_fields=dict(condensed=True))


def condense(model: CondenseNet, variables: dict) -> tuple[CondenseNet, dict]:
    """The condensed inference network and its variables from a learned network's, trained through every
    condensation stage: each learned 1x1 becomes the gather of its groups' kept inputs (its BatchNorm gathered
    with them), a group conv and a shuffle; the classifier keeps the `head_keep` share of its inputs of largest L1
    weight (CondenseNet's `CondensingLinear`). Computes the same function in evaluation mode."""
    if model.condensed:
        raise ValueError("the model is condensed already: condense takes the learned network and its variables.")
    params = jax.tree.map(np.asarray, dict(variables["params"]))
    stats = jax.tree.map(np.asarray, dict(variables.get("batch_stats", {})))
    selected = {}
    for i, units in enumerate(model.stage_sizes):
        stage = f"stage{i + 1}"
        params[stage], stats[stage] = dict(params[stage]), dict(stats[stage])
        selected[stage] = {}
        for j in range(units):
            unit = f"unit{j}"
            index = ops.learned.condensed_index(variables["condense"][stage][unit]["conv1"]["keep"])
            p, s = dict(params[stage][unit]), dict(stats[stage][unit])
            p["conv1"] = {"kernel": np.asarray(ops.learned.condensed_kernel(p["conv1"]["kernel"], index, model.groups))}
            p["bn1"] = {k: v[index] for k, v in p["bn1"].items()}
            s["bn1"] = {k: v[index] for k, v in s["bn1"].items()}
            params[stage][unit], stats[stage][unit] = p, s
            selected[stage][unit] = {"select1": {"index": index}}
    head = params["head"]
    kept = int(head["kernel"].shape[0] * model.head_keep)
    index = np.argsort(np.abs(head["kernel"]).sum(axis=1), kind="stable")[-kept:].astype(np.int32)
    params["head"] = {"kernel": head["kernel"][index], "bias": head["bias"]}
    selected["head_select"] = {"index": index}
    return model.clone(condensed=True), {"params": params, "batch_stats": stats, "condense": selected}
