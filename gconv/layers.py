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

from gconv import autotune, ops

Dtype = Any
Initializer = Callable[..., jax.Array]

__all__ = [
    "GroupedConv",
    "ChannelShuffle",
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
        # init only needs shapes and values: lower by the static rule rather than time the lowerings
        with autotune.static() if self.is_initializing() else contextlib.nullcontext():
            y = ops.grouped_conv(x, kernel, self.groups, strides=self.strides, padding=self.padding,
                                 dilation=self.dilation, precision=self.precision, impl=self.impl)
        if bias is not None:
            y = y + bias
        return y


class ChannelShuffle(nn.Module):
    """`ops.channel_shuffle` as a module. `x: (N, *spatial, C)`, C divisible by `groups`."""
    groups: int

    def __call__(self, x: jax.Array) -> jax.Array:
        return ops.channel_shuffle(x, self.groups)


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
