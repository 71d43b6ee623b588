"""`grouped_conv`: the public op, its checks, and the dispatch to a lowering (`gconv.ops.lowerings`)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from gconv.ops import choice
from gconv.ops.args import IntOrSeq, Padding, check_conv_args, normalize_padding, per_dim
from gconv.ops.lowerings import LOWERINGS, lower
from gconv.ops.partition import partitioned_conv

__all__ = ["IMPLS", "grouped_conv", "grouped_conv_reference"]

IMPLS = ("auto",) + tuple(LOWERINGS)


def grouped_conv(
    x: jax.Array,
    kernel: jax.Array,
    groups: int,
    *,
    strides: IntOrSeq = 1,
    padding: Padding = "SAME",
    dilation: IntOrSeq = 1,
    precision: lax.PrecisionLike = None,
    preferred_element_type: jnp.dtype | None = None,
    impl: str = "auto",
) -> jax.Array:
    """Grouped convolution: `groups` independent convolutions over disjoint channel slices.

    Args:
      x: `(N, *spatial, C_in)`.
      kernel: `(*window, C_in // groups, C_out)`; output channels `[j * C_out/groups, (j+1) * C_out/groups)`
        see only input channels of group `j`. `groups == C_in` is depthwise (`C_out` = multiplier * C_in).
      groups: number of groups; must divide `C_in` and `C_out`.
      strides, dilation: int or one int per spatial dim (`dilation` dilates the kernel).
      padding: "SAME", "VALID", an int, one int per dim, or one `(low, high)` pair per dim.
      impl: the lowering, all computing the same function: "xla" (`feature_group_count`), "blockdiag" (one dense
        conv over a block-diagonal kernel), "split" (one conv per group), "shift" (a sum of shifted multiply-adds,
        one per tap and channel of a group: for depthwise and few-channels-per-group convs), "dot" (1x1 convs as
        a matrix product), "pallas" (Pallas kernels: implicit GEMMs with the groups in the grid; Triton on a
        GPU, the interpreter elsewhere; 2-D only) or "auto" (default: the fastest for this shape, dtype and
        backend, measured once and cached, forward and backward chosen separately; see `gconv.ops.choice`; with
        `GCONV_AUTOTUNE=0` the deterministic `static_impl` rule).
    Under `jax.set_mesh` the op splits itself over the mesh's `data` and `model` axes (`gconv.ops.partition`):
    the lowering sees one device's images and groups.
    Returns:
      `(N, *spatial_out, C_out)`.
    """
    nd, groups = check_conv_args(x, kernel, groups)
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not one of {IMPLS}.")
    kwargs = dict(strides=per_dim(strides, nd, "strides"), padding=normalize_padding(padding, nd),
                  dilation=per_dim(dilation, nd, "dilation"), precision=precision,
                  preferred_element_type=preferred_element_type)

    def local(x: jax.Array, kernel: jax.Array, groups: int) -> jax.Array:  # one device's images and groups
        if impl != "auto":
            return lower(impl, x, kernel, groups, nd, **kwargs)
        fwd_impl, bwd_impl = choice.tuned_impls(x, kernel, groups, nd, kwargs)
        if choice.member_count() > 1 and choice.member_loop():
            return choice.per_member(fwd_impl, bwd_impl, groups, nd, kwargs)(x, kernel)
        if fwd_impl == bwd_impl:
            return lower(fwd_impl, x, kernel, groups, nd, **kwargs)
        return choice.forward_backward(fwd_impl, bwd_impl, groups, nd, kwargs)(x, kernel)

    return partitioned_conv(local, x, kernel, groups)


def grouped_conv_reference(x: jax.Array, kernel: jax.Array, groups: int, **conv_args) -> jax.Array:
    """The definition of a grouped conv: split the channels, one dense conv per group, concatenate.

    Same arguments and result as `grouped_conv` (`strides`, `padding`, ...): the reference its other lowerings are
    tested against, and its `impl="split"`.
    """
    if "impl" in conv_args:
        raise ValueError("grouped_conv_reference takes no impl: it is the 'split' lowering; call grouped_conv(impl=...).")
    return grouped_conv(x, kernel, groups, impl="split", **conv_args)
