"""Pieces every model shares: the conv/norm factories and PyTorch-style pooling."""
from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from gconv import ops
from gconv.layers import GroupedConv

ModuleDef = Callable[..., nn.Module]


def torch_padding(kernel: int, dilation: int = 1) -> tuple[tuple[int, int], tuple[int, int]]:
    """Symmetric padding `k // 2` as PyTorch models use it; "SAME" pads stride-2 convs differently."""
    p = dilation * (kernel - 1) // 2
    return ((p, p), (p, p))


def conv_factory(dtype: Any, param_dtype: Any) -> ModuleDef:
    """Bias-free grouped conv with PyTorch's padding: `conv(features, k, groups=1, strides=1, name=...)`."""

    def conv(features: int, kernel: int, *, groups: int = 1, strides: int = 1, name: str) -> GroupedConv:
        return GroupedConv(features, (kernel, kernel), groups=groups, strides=strides, padding=torch_padding(kernel),
                           use_bias=False, dtype=dtype, param_dtype=param_dtype, name=name)

    return conv


def norm_factory(train: bool, momentum: float, epsilon: float, dtype: Any, param_dtype: Any,
                 axis_name: str | None) -> ModuleDef:
    """BatchNorm with batch statistics in training (synchronised over `axis_name` when set)."""
    return functools.partial(nn.BatchNorm, use_running_average=not train, momentum=momentum, epsilon=epsilon,
                             dtype=dtype, param_dtype=param_dtype, axis_name=axis_name)


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


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    """`nn.MaxPool2d(3, 2, padding=1)`. `x: (N, H, W, C) -> (N, ceil(H/2), ceil(W/2), C)`."""
    return functools.reduce(jnp.maximum, _shifted_windows(x, -jnp.inf))


def avg_pool_3x3_s2(x: jax.Array) -> jax.Array:
    """`nn.AvgPool2d(3, 2, padding=1)` (zero padding counted, as PyTorch's default)."""
    return sum(_shifted_windows(x, 0.0)) / jnp.asarray(9, x.dtype)


class RowParallelDense(nn.Dense):
    """`nn.Dense` over features split across `model_axis`: local partial products, one `psum`, then the bias."""
    model_axis: str = "model"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        return ops.model_parallel_output(x @ kernel, self.model_axis) + bias


def classifier(x: jax.Array, num_classes: int, dtype: Any, param_dtype: Any,
               model_axis: str | None = None) -> jax.Array:
    """Global average pool + dense head. `x: (N, H, W, C) -> (N, num_classes)` float32 logits. With `model_axis`,
    `x` holds this device's block of channels and the head is row-parallel."""
    x = jnp.mean(x, axis=(1, 2))
    dense = functools.partial(RowParallelDense, model_axis=model_axis) if model_axis else nn.Dense
    x = dense(num_classes, dtype=dtype, param_dtype=param_dtype, name="head")(x)
    return x.astype(jnp.float32)
