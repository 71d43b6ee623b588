"""Flax (linen) modules over `gconv.ops`.

`GroupedConv` names and shapes its parameters as `flax.linen.Conv` does (`kernel: (*window, C_in // groups,
features)`, `bias: (features,)`), so dense, grouped and depthwise convolutions are one module with a different
`groups`.

The three equivalent forms of the ResNeXt block's transformation (Xie et al. 2017, Fig. 3) live here too:
(a) `SplitTransformSum`, (b) `SplitTransformConcat`, (c) `GroupedTransform`; `split_transform_params` maps (c)'s
weights onto (a) and (b), which then compute the same function.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import canonicalize_dtype

from gconv import autotune, ops
from gconv.ops import partition

Dtype = Any
Initializer = Callable[..., jax.Array]

__all__ = [
    "BatchNorm",
    "GroupedConv",
    "ChannelShuffle",
    "LearnedGroupConv",
    "GatherChannels",
    "FullyLearnedGroupConv",
    "GroupedTransform",
    "SplitTransformConcat",
    "SplitTransformSum",
    "split_transform_params",
    "record_calls",
]


@contextlib.contextmanager
def record_calls(record: Callable[[nn.Module, tuple, Any], None]):
    """Inside the block, `record(module, args, output)` runs after every submodule's `__call__` (Flax's method
    interception): for per-layer shapes, outputs and costs without changing the model."""

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__":
            record(context.module, args, out)
        return out

    with nn.intercept_methods(interceptor):
        yield


def _lowering(module: nn.Module) -> contextlib.AbstractContextManager:
    """Where a layer's conv is lowered: by the static rule during init (which needs only shapes and values) rather
    than by timing the lowerings; as `impl` says otherwise."""
    return autotune.static() if module.is_initializing() else contextlib.nullcontext()


class GroupedConv(nn.Module):
    """Grouped convolution. `x: (N, *spatial, C_in) -> (N, *spatial_out, features)`.

    The default kernel init is He-normal over each group's fan-in, `prod(kernel_size) * C_in // groups`
    (the kernel's in-channel axis already holds only one group's channels).
    """
    features: int
    kernel_size: Sequence[int]
    groups: int = 1
    strides: int | Sequence[int] = 1
    padding: ops.Padding = "SAME"
    dilation: int | Sequence[int] = 1
    use_bias: bool = True
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    precision: Any = None
    impl: str = "auto"  # see ops.grouped_conv
    kernel_init: Initializer = nn.initializers.he_normal()
    bias_init: Initializer = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel_size = tuple(self.kernel_size)
        c_in = x.shape[-1]
        if self.groups < 1 or c_in % self.groups or self.features % self.groups:
            raise ValueError(
                f"{self.name or 'GroupedConv'}: groups={self.groups} must divide C_in={c_in} and "
                f"features={self.features}; choose groups among the common divisors of {c_in} and {self.features}.")
        kernel = self.param("kernel", self.kernel_init, kernel_size + (c_in // self.groups, self.features),
                            self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        with _lowering(self):
            y = ops.grouped_conv(x, kernel, self.groups, strides=self.strides, padding=self.padding,
                                 dilation=self.dilation, precision=self.precision, impl=self.impl)
        if bias is not None:
            y = y + bias
        return y


class BatchNorm(nn.Module):
    """`flax.linen.BatchNorm` over every axis but the last, `(..., C) -> (..., C)`: its variables (`scale`, `bias`;
    `batch_stats` `mean`, `var`), defaults and arithmetic, float32 statistics; with the batch split over devices,
    its mean and mean square cross them as one array, not two (`ops.partition.batch_moments`)."""
    use_running_average: bool | None = None
    momentum: float = 0.99
    epsilon: float = 1e-5
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = nn.initializers.zeros
    scale_init: Initializer = nn.initializers.ones

    @nn.compact
    def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
        use_running_average = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        features = (x.shape[-1],)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros(features, jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones(features, jnp.float32))
        if use_running_average:
            mean, var = ra_mean.value, ra_var.value
        else:
            stats = jnp.asarray(x, jnp.promote_types(self.dtype or jnp.result_type(x), jnp.float32))
            mean, mean2 = partition.batch_moments(stats)  # one exchange of devices when the batch is split
            var = jnp.maximum(0.0, mean2 - jax.lax.square(mean))  # mean2 - mean^2 may round below 0
            if not self.is_initializing():
                ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
                ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        y, mul, args = x - mean, jax.lax.rsqrt(var + self.epsilon), [x]
        if self.use_scale:
            scale = self.param("scale", self.scale_init, features, self.param_dtype)
            mul, args = mul * scale, args + [scale]
        y = y * mul
        if self.use_bias:
            bias = self.param("bias", self.bias_init, features, self.param_dtype)
            y, args = y + bias, args + [bias]
        return jnp.asarray(y, canonicalize_dtype(*args, dtype=self.dtype))


class ChannelShuffle(nn.Module):
    """`ops.channel_shuffle` as a module. `x: (N, *spatial, C)`, C divisible by `groups`."""
    groups: int

    def __call__(self, x: jax.Array) -> jax.Array:
        return ops.channel_shuffle(x, self.groups)


class LearnedGroupConv(nn.Module):
    """CondenseNet's learned group convolution: a dense 1x1 conv whose filter `o` belongs to group `o mod groups`,
    times the mask of the inputs each group keeps (variables `condense/keep: (groups, C_in)` and `condense/stage`).
    Called with the training `stage` (`ops.learned.condensation_stage`) while the `condense` collection is mutable,
    the layer enters the stages it has not reached: each group drops `C_in / condense_factor` more inputs, those of
    least L1 norm over its filters. `lasso` > 0 sows `lasso * ops.learned.group_lasso` into the `losses` collection
    while it is mutable and the layer is not fully condensed (CondenseNet's `--group-lasso-lambda`; training adds
    the collection to the loss). `x: (N, H, W, C_in) -> (N, H, W, features)`. Condensed (`ops.learned`), it is
    `GatherChannels`, a `groups`-group 1x1 `GroupedConv` and `channel_shuffle(., groups)`.
    """
    features: int
    groups: int
    condense_factor: int = 0  # 0: equal to groups
    lasso: float = 0.0
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Initializer = nn.initializers.he_normal()

    @property
    def factor(self) -> int:
        return self.condense_factor or self.groups

    @nn.compact
    def __call__(self, x: jax.Array, stage: jax.Array | None = None) -> jax.Array:
        c_in = x.shape[-1]
        if self.groups < 1 or self.features % self.groups or c_in % self.groups or c_in % self.factor:
            raise ValueError(
                f"{self.name or 'LearnedGroupConv'}: groups={self.groups} must divide features={self.features} and "
                f"C_in={c_in}, and condense_factor={self.factor} must divide C_in: choose them among the divisors.")
        kernel = self.param("kernel", self.kernel_init, (1, 1, c_in, self.features), self.param_dtype)
        keep = self.variable("condense", "keep", jnp.ones, (self.groups, c_in), jnp.bool_)
        reached = self.variable("condense", "stage", jnp.zeros, (), jnp.int32)
        if stage is not None and self.is_mutable_collection("condense") and not self.is_initializing():
            entered = stage > reached.value
            keep.value = jnp.where(entered, ops.learned.condense_keep(jax.lax.stop_gradient(kernel), keep.value,
                                                                      stage, self.factor), keep.value)
            reached.value = jnp.maximum(stage, reached.value)
        if self.lasso and self.is_mutable_collection("losses") and not self.is_initializing():
            term = jnp.where(reached.value < self.factor - 1, ops.learned.group_lasso(kernel, keep.value), 0.0)
            self.sow("losses", "group_lasso", self.lasso * term)
        x, kernel = nn.dtypes.promote_dtype(x, ops.learned.masked_kernel(kernel, keep.value), dtype=self.dtype)
        with _lowering(self):
            return ops.grouped_conv(x, kernel, 1)


class GatherChannels(nn.Module):
    """The channels at `condense/index: (count,)` (a condensed layer's kept inputs), as `torch.index_select` on the
    channel axis; initialised to `0, 1, ..., count - 1` (mod C). `x: (..., C) -> (..., count)`."""
    count: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        index = self.variable("condense", "index", lambda: jnp.arange(self.count, dtype=jnp.int32) % x.shape[-1])
        return jnp.take(x, index.value, axis=-1)


class FullyLearnedGroupConv(GroupedConv):
    """FLGC (Wang et al. 2019): a conv whose input channels and filters are each assigned to one of `groups` groups
    by learned logits (`input_groups: (C_in, groups)`, `filter_groups: (features, groups)`); input `i` reaches filter
    `o` only when both are assigned the same group: the kernel times that 0/1 mask. The forward pass uses the hard
    assignments, the backward pass the softmax's gradients (straight-through). `balanced`: every group gets
    `C_in / groups` inputs and `features / groups` filters. Initialised as a standard group conv (contiguous groups)
    plus noise. The kernel is stored dense,
    `(*window, C_in, features)`; `ops.learned.assigned_conv` computes the deployed form.
    `x: (N, *spatial, C_in) -> (N, *spatial_out, features)`. The other fields are `GroupedConv`'s.
    """
    balanced: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c_in, window = x.shape[-1], tuple(self.kernel_size)
        if self.groups < 1 or (self.balanced and (c_in % self.groups or self.features % self.groups)):
            raise ValueError(f"{self.name or 'FullyLearnedGroupConv'}: groups={self.groups} must be >= 1 and, when "
                             f"balanced, divide C_in={c_in} and features={self.features}.")
        # He-normal over a group's fan-in, as a standard group conv of the same groups
        fan_scale = jnp.sqrt(jnp.asarray(self.groups, self.param_dtype))
        kernel = self.param("kernel", lambda k, s, d: self.kernel_init(k, s, d) * fan_scale,
                            window + (c_in, self.features), self.param_dtype)
        input_logits = self.param("input_groups", _contiguous_logits, (c_in, self.groups), self.param_dtype)
        filter_logits = self.param("filter_groups", _contiguous_logits, (self.features, self.groups),
                                   self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
        mask = ops.learned.assignment_mask(input_logits, filter_logits, self.balanced).astype(kernel.dtype)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel * mask, bias, dtype=self.dtype)
        with _lowering(self):
            y = ops.grouped_conv(x, kernel, 1, strides=self.strides, padding=self.padding, dilation=self.dilation,
                                 precision=self.precision, impl=self.impl)
        return y if bias is None else y + bias


def _contiguous_logits(key: jax.Array, shape: Sequence[int], dtype: Dtype = jnp.float32) -> jax.Array:
    """Assignment logits `(n, G)` preferring the contiguous grouping (row `i` to group `i * G // n`) by 1, plus
    N(0, 0.01) noise: training starts from the standard group conv."""
    n, groups = shape
    start = jax.nn.one_hot(jnp.arange(n) * groups // n, groups, dtype=dtype)
    return start + 0.01 * jax.random.normal(key, shape, dtype)


class GroupedTransform(nn.Module):
    """Form (c): 1x1 to `C*d` -> ReLU -> 3x3 grouped conv (C groups) -> ReLU -> 1x1 to `features`."""
    features: int
    cardinality: int
    width: int  # d, channels per path

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        inner = self.cardinality * self.width
        x = nn.relu(GroupedConv(inner, (1, 1), name="conv_reduce")(x))
        x = nn.relu(GroupedConv(inner, (3, 3), groups=self.cardinality, name="conv_group")(x))
        return GroupedConv(self.features, (1, 1), name="conv_expand")(x)


class _Path(nn.Module):
    """One low-dimensional path of forms (a) and (b): 1x1 to `d` -> ReLU -> 3x3 `d` -> ReLU."""
    width: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.relu(GroupedConv(self.width, (1, 1), name="conv_reduce")(x))
        return nn.relu(GroupedConv(self.width, (3, 3), name="conv_group")(x))


class SplitTransformConcat(nn.Module):
    """Form (b): C paths, concatenated, then one dense 1x1 to `features`."""
    features: int
    cardinality: int
    width: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = jnp.concatenate([_Path(self.width, name=f"path{i}")(x) for i in range(self.cardinality)], axis=-1)
        return GroupedConv(self.features, (1, 1), name="conv_expand")(h)


class SplitTransformSum(nn.Module):
    """Form (a): C paths, each ending in its own 1x1 to `features`, summed (one shared bias)."""
    features: int
    cardinality: int
    width: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        expand = functools.partial(GroupedConv, self.features, (1, 1), use_bias=False)
        y = sum(expand(name=f"expand{i}")(_Path(self.width, name=f"path{i}")(x)) for i in range(self.cardinality))
        return y + self.param("bias", nn.initializers.zeros, (self.features,))


def split_transform_params(params: dict, cardinality: int) -> tuple[dict, dict]:
    """Maps `GroupedTransform` params (form c) to `SplitTransformSum` (a) and `SplitTransformConcat` (b) params.

    Path `i` takes output channels `[i*d, (i+1)*d)` of the reduce conv, group `i` of the grouped conv and, in (a),
    rows `[i*d, (i+1)*d)` of the expand conv.
    """
    reduce_, group, expand = params["conv_reduce"], params["conv_group"], params["conv_expand"]
    chunks = lambda a, axis: jnp.split(a, cardinality, axis=axis)  # noqa: E731
    paths = [
        {"conv_reduce": {"kernel": rk, "bias": rb}, "conv_group": {"kernel": gk, "bias": gb}}
        for rk, rb, gk, gb in zip(chunks(reduce_["kernel"], -1), chunks(reduce_["bias"], -1),
                                  chunks(group["kernel"], -1), chunks(group["bias"], -1))
    ]
    concat = {f"path{i}": p for i, p in enumerate(paths)}
    concat["conv_expand"] = expand
    summed = {f"path{i}": p for i, p in enumerate(paths)}
    summed.update({f"expand{i}": {"kernel": k} for i, k in enumerate(chunks(expand["kernel"], -2))})
    summed["bias"] = expand["bias"]
    return summed, concat
