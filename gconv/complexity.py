"""Parameter and multiply-accumulate counts, computed from shapes alone (`jax.eval_shape`, nothing compiled).

MACs follow the ResNeXt/ShuffleNet papers and torchvision's "GFLOPS": one multiply-add of a convolution or dense
layer counts once; BatchNorm, activations, pooling and additions are not counted.

`counts(model, input_shape, convention=...)` also counts the way other papers do:
  "torchvision": every parameter (BatchNorm's too); MACs as above.
  "ioannou": Ioannou's thesis and Deep Roots: conv and fc weights plus biases, normalisation layers not counted;
    MACs plus one per bias (each bias counted once, not once per output position).
  "pycls": Radosavovic et al.'s (pycls's "flops"): every parameter; MACs plus one per bias, as "ioannou".
Every convention also gives the activations (`count_acts`, pycls's third measure): the output elements of every
conv, dense layer and max-pool for one image.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from gconv.layers import FullyLearnedGroupConv, GroupedConv, LearnedGroupConv, record_calls

__all__ = ["count_params", "count_macs", "count_acts", "count_flops", "counts", "Counts", "CONVENTIONS", "layer_costs",
           "LayerCost", "breakdown", "preserving_width"]

CONVENTIONS = ("torchvision", "ioannou", "pycls")


def count_params(params: Any) -> int:
    """Number of scalars in a pytree of arrays (or `jax.ShapeDtypeStruct`s), or in a `gconv.nnx.Model`'s params."""
    if _is_nnx(params):
        from gconv.nnx import to_linen

        params = to_linen(params)["params"]
    return sum(math.prod(x.shape) for x in jax.tree.leaves(params))


def _is_nnx(model: Any) -> bool:
    return type(model).__module__ == "gconv.nnx"


def _linen(model: Any) -> nn.Module:
    """The linen definition of a `gconv.nnx.Model` (counting reads shapes alone); a linen model as it is."""
    return model.definition if _is_nnx(model) else model


@dataclasses.dataclass(frozen=True)
class LayerCost:
    path: str  # module path, e.g. "stage2/block0/conv_group"
    kind: str  # stem, dense_1x1, dense_kxk, grouped, depthwise, learned (masked, computed densely) or head
    params: int
    macs: int
    biases: int = 0


_LEARNED = (LearnedGroupConv, FullyLearnedGroupConv)


def _kind(module: nn.Module, c_in: int, first: bool) -> str:
    if isinstance(module, nn.Dense):
        return "head"
    if isinstance(module, _LEARNED):
        return "learned"
    if first:  # the first conv called: whatever its family names it
        return "stem"
    if module.groups > 1:
        return "depthwise" if module.groups == c_in else "grouped"
    return "dense_1x1" if math.prod(module.kernel_size) == 1 else "dense_kxk"


def _trace(model: nn.Module, input_shape: Sequence[int], **call_kwargs: Any) -> tuple[list[LayerCost], int, Any]:
    """One shape-only pass (`jax.eval_shape` of `init`): per-layer costs of every conv and dense layer in call
    order, the activations of one image (conv, dense and max-pool outputs) and the variables' shapes."""
    from gconv.models.common import MaxPool3x3

    model = _linen(model)

    shape = tuple(input_shape)
    if len(shape) == 3:
        shape = (1,) + shape
    records: list[LayerCost] = []
    acts = [0]

    def record(module, args, out):
        if isinstance(module, (GroupedConv, nn.Dense, *_LEARNED, MaxPool3x3)):
            acts[0] += math.prod(out.shape[1:])
        if not isinstance(module, (GroupedConv, nn.Dense, *_LEARNED)):
            return
        c_in = args[0].shape[-1]
        # learned group convs compute their masked kernels densely until deployed
        window = math.prod(getattr(module, "kernel_size", (1,)))
        fan_in = window * (c_in // module.groups if isinstance(module, GroupedConv) else c_in)
        biases = out.shape[-1] if getattr(module, "use_bias", False) else 0
        first = isinstance(module, GroupedConv) and not any(r.kind != "head" for r in records)
        records.append(LayerCost("/".join(module.scope.path), _kind(module, c_in, first), fan_in * out.shape[-1] + biases,
                                 math.prod(out.shape) * fan_in, biases))

    def init():
        with record_calls(record):
            return model.init(jax.random.PRNGKey(0), jnp.zeros(shape, jnp.float32), **call_kwargs)

    variables = jax.eval_shape(init)
    return records, acts[0] // shape[0], variables


def layer_costs(model: nn.Module, input_shape: Sequence[int], **call_kwargs: Any) -> list[LayerCost]:
    """Per-layer parameters and MACs of every conv and dense layer, in call order.

    `input_shape`: `(H, W, C)` for one image, or `(N, H, W, C)` for a batch of N (MACs scale with N).
    """
    return _trace(model, input_shape, **call_kwargs)[0]


def count_macs(model: nn.Module, input_shape: Sequence[int], **call_kwargs: Any) -> int:
    """Multiply-accumulates of one forward pass over `input_shape` (`(H, W, C)` = one image)."""
    return sum(layer.macs for layer in layer_costs(model, input_shape, **call_kwargs))


def count_acts(model: nn.Module, input_shape: Sequence[int], **call_kwargs: Any) -> int:
    """Activations of one forward pass over one image `(H, W, C)`: the output elements of every conv, dense layer
    and max-pool (pycls's "acts"; batch norms, activations and additions are not counted)."""
    return _trace(model, input_shape, **call_kwargs)[1]


@dataclasses.dataclass(frozen=True)
class Counts:
    params: int
    macs: int
    acts: int = 0


def counts(model: nn.Module, input_shape: Sequence[int], convention: str = "torchvision",
           **call_kwargs: Any) -> Counts:
    """Parameters and MACs of one forward pass over `input_shape` (`(H, W, C)`) in a paper's `convention` (see the
    module's docstring): "torchvision" or "ioannou"."""
    if convention not in CONVENTIONS:
        raise ValueError(f"convention={convention!r}: use one of {CONVENTIONS}.")
    layers, acts, variables = _trace(model, input_shape, **call_kwargs)
    macs, biases = sum(layer.macs for layer in layers), sum(layer.biases for layer in layers)
    if convention == "ioannou":
        return Counts(sum(layer.params for layer in layers), macs + biases, acts)
    return Counts(count_params(variables["params"]), macs + biases if convention == "pycls" else macs, acts)


def count_flops(model: nn.Module, input_shape: Sequence[int], **call_kwargs: Any) -> int:
    """Deprecated name of `count_macs` (it always counted multiply-accumulates, as the papers' "FLOPs" do)."""
    warnings.warn("gconv.complexity.count_flops is renamed count_macs (it counts multiply-accumulates).",
                  DeprecationWarning, stacklevel=2)
    return count_macs(model, input_shape, **call_kwargs)


def breakdown(model: nn.Module, input_shape: Sequence[int], depth: int = 1) -> dict[tuple[str, str], dict[str, int]]:
    """Params and MACs summed per (group of the path's first `depth` parts, kind): `{("stage2", "grouped"): ...}`."""
    table: dict[tuple[str, str], dict[str, int]] = {}
    for layer in layer_costs(model, input_shape):
        key = ("/".join(layer.path.split("/")[:depth]) if "/" in layer.path else "top", layer.kind)
        entry = table.setdefault(key, {"params": 0, "macs": 0})
        entry["params"] += layer.params
        entry["macs"] += layer.macs
    return table


def _block_params(channels: int, cardinality: int, width: int) -> int:
    inner = cardinality * width
    return channels * inner + 9 * inner * width + inner * channels  # 1x1 reduce, 3x3 grouped, 1x1 expand


def preserving_width(cardinality: int, channels: int = 256, base_width: int = 64) -> int:
    """Bottleneck width d that keeps a ResNeXt block at the complexity of the ResNet block of width `base_width`.

    The block `channels -> C*d (1x1) -> C*d (3x3, C groups) -> channels` has `C*d*(2*channels + 9*d)` weights;
    d is the integer bringing that closest to the `C=1, d=base_width` block (ResNeXt paper Table 2: with the
    defaults, ~70k weights, and C = 1, 2, 4, 8, 32 give d = 64, 40, 24, 14, 4).
    """
    if cardinality < 1:
        raise ValueError(f"cardinality={cardinality} must be >= 1.")
    target = _block_params(channels, 1, base_width)
    return min(range(1, base_width + 1), key=lambda d: (abs(_block_params(channels, cardinality, d) - target), d))
