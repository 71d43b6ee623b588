"""gconv for Flax NNX: the layers as native NNX modules and every registered model as an NNX module.

`GroupedConv` and `ChannelShuffle` are NNX modules over the same ops as `gconv.layers` (same lowerings, same
`impl=` choice, same parameter names and shapes). A model (`create_model(name, rngs=nnx.Rngs(0))`) is a `Model`: an
`nnx.Module` whose NNX variables sit at the linen variables' paths (`params/stage1/block0/conv_group/kernel` is an
`nnx.Param`, `batch_stats/...` are `nnx.BatchStat`) and whose call runs the family's definition over them, so a
model computes exactly what its linen twin computes. `from_linen(model, variables)` and `to_linen(model)` move
weights both ways: checkpoints written by `launch.py`, published weights and `load_torch_weights`'s output in,
and an NNX-trained model's weights out to `launch.py eval`, counting and the analysis.

Modes follow NNX: `model.train()` (batch statistics, running averages updated in place, dropout from
`rngs.dropout`) and `model.eval()`, or `nnx.view(model, use_running_average=...)`.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from gconv import ops

__all__ = ["GroupedConv", "ChannelShuffle", "Model", "create_model", "from_linen", "to_linen"]


class GroupedConv(nnx.Module):
    """Grouped convolution, `gconv.layers.GroupedConv` in NNX. `x: (N, *spatial, in_features) -> (N, *spatial_out,
    features)`; `kernel: (*kernel_size, in_features // groups, features)`, `bias: (features,)`."""

    def __init__(self, in_features: int, features: int, kernel_size: Sequence[int], *, groups: int = 1,
                 strides: int | Sequence[int] = 1, padding: ops.Padding = "SAME", dilation: int | Sequence[int] = 1,
                 use_bias: bool = True, dtype: Any = None, param_dtype: Any = jnp.float32, precision: Any = None,
                 impl: str = "auto", kernel_init: Callable = nn.initializers.he_normal(),
                 bias_init: Callable = nn.initializers.zeros, rngs: nnx.Rngs):
        if groups < 1 or in_features % groups or features % groups:
            raise ValueError(f"GroupedConv: groups={groups} must divide in_features={in_features} and "
                             f"features={features}; choose groups among the common divisors of {in_features} and "
                             f"{features}.")
        kernel_size = tuple(kernel_size)
        self.kernel = nnx.Param(kernel_init(rngs.params(), kernel_size + (in_features // groups, features),
                                            param_dtype))
        self.bias = nnx.Param(bias_init(rngs.params(), (features,), param_dtype)) if use_bias else None
        self.in_features, self.features, self.groups = in_features, features, groups
        self.strides, self.padding, self.dilation = strides, padding, dilation
        self.dtype, self.precision, self.impl = dtype, precision, impl

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"GroupedConv: input has {x.shape[-1]} channels (shape {x.shape}), the layer was built "
                             f"for in_features={self.in_features}.")
        bias = self.bias[...] if self.bias is not None else None
        x, kernel, bias = nn.dtypes.promote_dtype(x, self.kernel[...], bias, dtype=self.dtype)
        y = ops.grouped_conv(x, kernel, self.groups, strides=self.strides, padding=self.padding,
                             dilation=self.dilation, precision=self.precision, impl=self.impl)
        return y + bias if bias is not None else y


class ChannelShuffle(nnx.Module):
    """`ops.channel_shuffle` as an NNX module. `x: (N, *spatial, C)`, C divisible by `groups`."""

    def __init__(self, groups: int):
        self.groups = groups

    def __call__(self, x: jax.Array) -> jax.Array:
        return ops.channel_shuffle(x, self.groups)


_KINDS = {"params": nnx.Param, "batch_stats": nnx.BatchStat}  # other collections: plain `nnx.Variable`s


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


class Model(nnx.Module):
    """A gconv model (a linen module `definition`) as an NNX module. `x: (N, H, W, C) -> (N, num_classes)`.

    `nnx.state(model)` holds the linen variables at their paths (`params/...`, `batch_stats/...`). In train mode
    (`model.train()`) BatchNorm normalises with the batch's statistics and updates the running averages in place
    (and every other collection the model changes while training, such as a learned CondenseNet's masks),
    and dropout draws from `rngs.dropout` (pass `rngs` for a model with dropout); in eval mode (`model.eval()`, the
    default) it uses the running averages.
    """

    def __init__(self, definition: nn.Module, variables: Mapping[str, Any], *, rngs: nnx.Rngs | None = None,
                 use_running_average: bool = True):
        self.definition = definition
        self.collections = tuple(variables)
        variables = {c: _plain(tree) for c, tree in variables.items()}
        specs = _partition_specs(definition, variables)
        for collection, tree in variables.items():
            kind = _KINDS.get(collection, nnx.Variable)
            setattr(self, collection, nnx.data(jax.tree.map(
                lambda value, spec: kind(value, out_sharding=tuple(spec), eager_sharding=_eager()) if spec
                else kind(value), tree, specs[collection])))
        self.rngs = rngs
        self.use_running_average = use_running_average

    def set_view(self, use_running_average: bool | None = None):
        """Used by `nnx.view`: `use_running_average=False` is train mode."""
        if use_running_average is not None:
            self.use_running_average = use_running_average

    def __call__(self, x: jax.Array) -> jax.Array:
        train = not self.use_running_average
        variables = to_linen(self)
        rngs = {"dropout": self.rngs.dropout()} if train and self.rngs is not None and "dropout" in self.rngs else {}
        state = [c for c in self.collections if c != "params"]  # BatchNorm's averages, CondenseNet's masks, ...
        if not train or not state:
            return self.definition.apply(variables, x, train=train, rngs=rngs)
        y, updates = self.definition.apply(variables, x, train=True, rngs=rngs, mutable=[*state, "losses"])
        for collection in state:
            jax.tree.map(lambda var, value: var.set_value(value), getattr(self, collection), dict(updates[collection]),
                         is_leaf=_is_variable)
        if "losses" in updates:  # terms the model adds to the loss (CondenseNet's group lasso), NNX's way:
            self.losses = nnx.Intermediate(sum(jax.tree.leaves(updates["losses"])))  # nnx.pop(model, Intermediate)
        return y


def _partition_specs(definition: nn.Module, variables: dict) -> dict:
    """Each variable's `PartitionSpec` under the family's group-parallel rules (`gconv.parallel.partition_specs`;
    replicated, `P()`, for a family without them), as NNX's `out_sharding` metadata carries it."""
    from jax.sharding import PartitionSpec as P

    from gconv import parallel
    from gconv.models import family_of

    try:
        rules = family_of(definition).split_rules
    except (ValueError, KeyError):  # a module of no registered family: replicated
        rules = ()
    return {c: parallel.partition_specs(tree, rules) if rules else jax.tree.map(lambda _: P(), tree)
            for c, tree in variables.items()}


def _eager() -> bool:
    """NNX's eager sharding places a variable as its `out_sharding` says when a mesh is set (`jax.set_mesh`);
    without one the metadata is kept and nothing is placed."""
    return nnx.using_eager_sharding() and not jax.sharding.get_abstract_mesh().empty


def _plain(tree: Any) -> Any:
    """Nested plain dicts (linen's `FrozenDict`s and orbax's restored dicts alike)."""
    return {k: _plain(v) for k, v in tree.items()} if isinstance(tree, Mapping) else tree


def from_linen(definition: nn.Module, variables: Mapping[str, Any], *, rngs: nnx.Rngs | None = None) -> Model:
    """The NNX model of a linen gconv model and its variables (`{"params": ..., "batch_stats": ...}`, as
    `model.init`, a `launch.py` checkpoint's `params`/`batch_stats` or `load_torch_weights` give them)."""
    return Model(definition, variables, rngs=rngs)


def to_linen(model: Model) -> dict[str, Any]:
    """The model's variables as the linen model takes them (`definition.apply(to_linen(model), x, train=False)`):
    the same arrays, bit for bit, that `from_linen` was given or training left."""
    return {c: jax.tree.map(lambda v: v[...], getattr(model, c), is_leaf=_is_variable) for c in model.collections}


def create_model(name: str, *, rngs: nnx.Rngs, input_shape: Sequence[int] | None = None, **fields) -> Model:
    """`gconv.models.create_model(name, **fields)` as an NNX `Model`, its variables initialised from
    `rngs.params()` at `input_shape` (`(H, W, C)`; default: the size its published counts are given at)."""
    from gconv.models import create_model as create_linen, family_of

    definition = create_linen(name, **fields)
    shape = tuple(input_shape) if input_shape is not None else family_of(definition).input_shape(definition)
    variables = jax.jit(lambda key: definition.init(key, jnp.zeros((1,) + shape), train=False))(rngs.params())
    return Model(definition, variables, rngs=rngs)
