"""Pieces every model family shares: the `ModelFamily` record that registers it, the fields and factories of a
classifier (conv, BatchNorm), a stage of blocks, PyTorch-style pooling and the head."""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from gconv.layers import BatchNorm, FullyLearnedGroupConv, GroupedConv

ModuleDef = Callable[..., nn.Module]
LayerPath = tuple[str, ...]


TORCHVISION = "https://download.pytorch.org/models/"  # the hex in a file's name: the start of its SHA-256
IMGCLSMOB = "https://github.com/osmr/imgclsmob/releases/download/"  # zipped, the SHA-1 of the file inside


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    """What gconv knows about a family of models, kept beside its module class and registered in `gconv.models`.

    name: the family's name ("resnext").
    module: the `nn.Module` class.
    parse: registry name -> constructor arguments, or None when the name is not this family's.
    variants: the registered names, listed by `list_models`.
    name_fields: the fields a full name fixes (`resnext50_32x4d`: cardinality, base_width); a config naming a full
      name may not set them again.
    bare_name: the name without those fields, which takes them as arguments ("resnext{depth}").
    name_of: a built module -> its full name (the run's name in reports).
    fields_of: a built module -> the report's columns for it, in order (`{"cardinality": 32, "width d": 4}`).
    sweep_axis: the key of `fields_of` that ablations plot against.
    torch_name: a gconv module path (`("stage1", "block0", "conv_group")`) -> the PyTorch module name in the
      layout of the family's reference code (`"layer1.0.conv2"`); None: no PyTorch weights to convert.
    split_rules: group parallel's `(path regex, partition)` rules (empty: no group-parallel form).
    groups_of: a built module -> the groups that group parallelism splits over devices.
    layer_pairs: a built module -> the (layer, next grouped layer) paths whose filter correlations the analysis
      reports.
    first_conv: the path of the first conv (the stem's, or the only one), whose kernels the analysis draws.
    first_conv_groups: a built module -> the groups of the layer that consumes the first conv's output (AlexNet:
      conv2's), by which the analysis sorts the first conv's kernels (1: one panel).
    input_shape: a built module -> the `(H, W, C)` its published counts are given at (224x224 ImageNet, 32x32 CIFAR).
    head: the path of the classifier, whose outputs are the classes (evaluation reads the class count there,
      weight conversion replaces it for another class count).
    for_run: a built module and the run's step count -> the module that run trains (CondenseNet: condensing over
      the first half of the run unless its config says otherwise).
    weights: published PyTorch weights, `(variant, tag) -> URL` (`gconv.convert.pretrained_file` says how the URL
      names its hash); weights_fields: the fields of the network they were trained as, beyond the name's.

    Code outside `gconv.models` reaches a family's layers through these paths (`params_at`), never by name.
    """
    name: str
    module: type
    parse: Callable[[str], dict | None]
    variants: Sequence[str]
    name_fields: Sequence[str]
    bare_name: str
    name_of: Callable[[Any], str]
    fields_of: Callable[[Any], dict[str, Any]]
    sweep_axis: str
    torch_name: Callable[[LayerPath], str] | None = None
    split_rules: tuple = ()
    groups_of: Callable[[Any], int] = lambda model: 1
    layer_pairs: Callable[[Any], list[tuple[str, str]]] = lambda model: []
    first_conv: str = "stem_conv"
    first_conv_groups: Callable[[Any], int] = lambda model: 1
    input_shape: Callable[[Any], tuple[int, int, int]] = lambda model: (224, 224, 3)
    head: str = "head"
    for_run: Callable[[Any, int], Any] = lambda model, total_steps: model
    weights: Mapping[tuple[str, str], str] = dataclasses.field(default_factory=dict)
    weights_fields: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def params_at(self, params: dict, path: str) -> dict:
        """The parameters of the layer at `path` ("stage1/block0/conv_group") in a model's `params` tree."""
        node = params
        for name in path.split("/"):
            if name not in node:
                raise KeyError(f"the {self.name} family declares a layer {path!r}, but its parameters have no "
                               f"{name!r} (they have {sorted(node)}): correct the family's ModelFamily.")
            node = node[name]
        return node


def model_state(variables: dict) -> dict:
    """A model's collections other than `params` and `batch_stats` (a learned CondenseNet's masks and step)."""
    return {k: v for k, v in variables.items() if k not in ("params", "batch_stats")}



def width_names(bare: str, prefix: str, widths: Mapping[str, float], other: str = "{:g}"
                ) -> tuple[tuple[str, ...], Callable[[str], dict | None], Callable[[Any], str]]:
    """`(variants, parse_name, name_of)` of a family whose registered names differ in width only: `PREFIX{code}`
    for each `code -> width_multiplier` of `widths`, and `bare` taking the width as a field; a width not in
    `widths` is named by `other` (`"w{:g}"`: `igcv3_w0.6`)."""
    codes = {v: k for k, v in widths.items()}

    def parse_name(name: str) -> dict | None:
        if name == bare:
            return {}
        code = name[len(prefix):] if name.startswith(prefix) else None
        return dict(width_multiplier=widths[code]) if code in widths else None

    def name_of(model: Any) -> str:
        return prefix + codes.get(model.width_multiplier, other.format(model.width_multiplier))

    return tuple(prefix + code for code in widths), parse_name, name_of

def torch_padding(kernel: int, dilation: int = 1) -> tuple[tuple[int, int], tuple[int, int]]:
    """Symmetric padding `k // 2` as PyTorch models use it; "SAME" pads stride-2 convs differently."""
    p = dilation * (kernel - 1) // 2
    return ((p, p), (p, p))


GROUP_CONVS = ("fixed", "flgc", "flgc_balanced")


def conv_factory(dtype: Any, param_dtype: Any, group_conv: str = "fixed") -> ModuleDef:
    """Bias-free grouped conv with PyTorch's padding: `conv(features, k, groups=1, strides=1, name=...)`.
    `group_conv`: "fixed" (`GroupedConv`), or "flgc" / "flgc_balanced": every group conv that is not depthwise
    (1 < groups != features) learns its groups (`FullyLearnedGroupConv`, FLGC)."""
    if group_conv not in GROUP_CONVS:
        raise ValueError(f"group_conv={group_conv!r} is not one of {GROUP_CONVS}.")

    def conv(features: int, kernel: int, *, groups: int = 1, strides: int = 1, name: str) -> nn.Module:
        args = dict(strides=strides, padding=torch_padding(kernel), use_bias=False, dtype=dtype,
                    param_dtype=param_dtype, name=name)
        if group_conv != "fixed" and 1 < groups != features:
            return FullyLearnedGroupConv(features, (kernel, kernel), groups=groups,
                                         balanced=group_conv == "flgc_balanced", **args)
        return GroupedConv(features, (kernel, kernel), groups=groups, **args)

    return conv


def norm_factory(train: bool, momentum: float, epsilon: float, dtype: Any, param_dtype: Any) -> ModuleDef:
    """BatchNorm with batch statistics in training (over the whole global batch, however it is sharded)."""
    return functools.partial(BatchNorm, use_running_average=not train, momentum=momentum, epsilon=epsilon,
                             dtype=dtype, param_dtype=param_dtype)


class ClassifierNet(nn.Module, kw_only=True):
    """The fields every gconv classifier has (keyword-only, after the family's own), and its conv/norm factories."""
    num_classes: int = 1000
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    group_conv: str = "fixed"  # or "flgc" / "flgc_balanced": group convs learn their groups (conv_factory)

    def factories(self, train: bool) -> tuple[ModuleDef, ModuleDef]:
        """`(conv, norm)` bound to this model's dtypes and BN settings."""
        return (conv_factory(self.dtype, self.param_dtype, self.group_conv),
                norm_factory(train, self.bn_momentum, self.bn_epsilon, self.dtype, self.param_dtype))

    def head(self, x: jax.Array) -> jax.Array:
        """Global average pool + dense head: `(N, H, W, C) -> (N, num_classes)` float32 logits."""
        return classifier(x, self.num_classes, self.dtype, self.param_dtype)


def torch_namer(top: dict[str, str], inner: Callable[[int, int, str], str]) -> Callable[[LayerPath], str]:
    """A family's `torch_name`: `top` names the layers outside the stages (`{"stem_conv": "conv1"}`), and
    `inner(stage, index, layer)` those at `stage{stage}/{block|unit}{index}/{layer}`."""

    def torch_name(path: LayerPath) -> str:
        if path[0] in top:
            return top[path[0]]
        stage, block, layer = path
        return inner(int(stage[len("stage"):]), int(block.lstrip("blockunit")), layer)

    return torch_name


class Stage(nn.Module):
    """`num_blocks` blocks, the first with `strides` (built by `first` when given), the rest with stride 1.
    Blocks are named `{prefix}0`, `{prefix}1`, ...; `block(strides=..., name=...)` builds one."""
    block: ModuleDef
    num_blocks: int
    strides: int = 2
    prefix: str = "block"
    first: ModuleDef | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for j in range(self.num_blocks):
            make = self.first if j == 0 and self.first is not None else self.block
            x = make(strides=self.strides if j == 0 else 1, name=f"{self.prefix}{j}")(x)
        return x


def _shifted_windows(x: jax.Array, pad_value: float) -> list[jax.Array]:
    """The 9 taps of a 3x3, stride-2, pad-1 window over `x: (N, H, W, C)`, each `(N, ceil(H/2), ceil(W/2), C)`.

    Pooling as an elementwise max/sum over these slices fuses into one loop, forward and backward; XLA's CPU
    backward of `reduce_window` (select-and-scatter) is ~10x slower than its forward.
    """
    n, h, w, c = x.shape
    xp = lax.pad(x, jnp.asarray(pad_value, x.dtype), ((0, 0, 0), (1, 1, 0), (1, 1, 0), (0, 0, 0)))
    oh, ow = (h - 1) // 2 + 1, (w - 1) // 2 + 1
    return [lax.slice(xp, (0, i, j, 0), (n, i + 2 * oh - 1, j + 2 * ow - 1, c), (1, 2, 2, 1))
            for i in range(3) for j in range(3)]


class MaxPool3x3(nn.Module):
    """`nn.MaxPool2d(3, 2, padding=1)`. `x: (N, H, W, C) -> (N, ceil(H/2), ceil(W/2), C)`. A module (with no
    parameters) so that `gconv.complexity` sees its output: pycls counts pooled outputs among the activations."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return functools.reduce(jnp.maximum, _shifted_windows(x, -jnp.inf))


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    """`MaxPool3x3` applied inside a module's `__call__`."""
    return MaxPool3x3()(x)


def avg_pool_3x3_s2(x: jax.Array) -> jax.Array:
    """`nn.AvgPool2d(3, 2, padding=1)` (zero padding counted, as PyTorch's default)."""
    return sum(_shifted_windows(x, 0.0)) / jnp.asarray(9, x.dtype)


def classifier(x: jax.Array, num_classes: int, dtype: Any, param_dtype: Any) -> jax.Array:
    """Global average pool + dense head. `x: (N, H, W, C) -> (N, num_classes)` float32 logits."""
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(num_classes, dtype=dtype, param_dtype=param_dtype, name="head")(x)
    return x.astype(jnp.float32)
