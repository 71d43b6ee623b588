"""Pure-functional grouped convolution and channel shuffle.

Layouts are channel-last throughout: activations `(N, *spatial, C)` and kernels `(*window, C_in // groups, C_out)`
(Flax's layout). Every function composes with `jit`, `vmap`, `grad` and `shard_map`; every check runs on static
shapes, so bad input raises `ValueError` before XLA sees it.

  args        the checks and normalisation of arguments
  conv        `grouped_conv` and its reference
  lowerings/  one module per lowering, registered by name
  choice      which lowering "auto" takes (measured, or a static rule)
  shuffle     `channel_shuffle` and its inverse
  learned     learned group convolution (CondenseNet): condensation stages, masks, condensing
"""
from gconv.ops import learned
from gconv.ops.args import IntOrSeq, Padding, normalize_padding
from gconv.ops.choice import AUTOTUNE_MIN_MACS, candidate_impls, static_impl
from gconv.ops.conv import IMPLS, grouped_conv, grouped_conv_reference
from gconv.ops.lowerings.blockdiag import block_diagonal_kernel
from gconv.ops.shuffle import channel_shuffle, channel_unshuffle, shuffle_permutation

__all__ = [
    "IMPLS",
    "AUTOTUNE_MIN_MACS",
    "candidate_impls",
    "static_impl",
    "grouped_conv",
    "block_diagonal_kernel",
    "grouped_conv_reference",
    "channel_shuffle",
    "channel_unshuffle",
    "shuffle_permutation",
    "normalize_padding",
    "IntOrSeq",
    "Padding",
    "learned",
]
