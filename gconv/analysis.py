"""What groups learn: inter-layer filter correlation (Ioannou et al. 2017), kernel views, compute breakdowns, and
which inputs learned groups keep (CondenseNet's masks) and whether they keep correlated inputs together.

Pure functions over a model, its variables and a batch; nothing here trains.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np

from gconv.complexity import breakdown
from gconv.layers import GroupedConv, LearnedGroupConv, record_calls
from gconv.models import family_of

__all__ = ["layer_outputs", "filter_correlation", "filter_correlations", "block_diagonality", "block_means",
           "score_blocks", "kernel_views", "first_layer_view", "first_layer_by_group", "colour_scores", "group_colour_scores",
           "default_layer_pairs", "compute_breakdown", "learned_masks", "connectivity_view", "kept_fractions",
           "learned_input_correlations", "learned_group_score"]


def _capture(model: nn.Module, variables: Any, batch: jax.Array, paths: Sequence[str]) -> dict[str, Any]:
    """Applies `model` in eval mode; `{path: (output, groups)}` for the modules at `paths` (`groups` is 1 for
    anything but a `GroupedConv`)."""
    if type(model).__module__ == "gconv.nnx":
        raise TypeError("the analysis takes a linen model and its variables: pass model.definition and "
                        "gconv.nnx.to_linen(model) for a gconv.nnx model.")
    found: dict[str, Any] = {}

    def record(module, args, out):
        path = "/".join(module.scope.path)
        if path in paths:
            found[path] = (out, module.groups if isinstance(module, GroupedConv) else 1)

    with record_calls(record):
        model.apply(variables, batch, train=False)
    missing = [p for p in paths if p not in found]
    if missing:
        raise ValueError(f"no layer at {missing} in {type(model).__name__}; layer paths look like "
                         f"'stage1/block0/conv_group' (see gconv.complexity.layer_costs for all of them).")
    return found


def layer_outputs(model: nn.Module, variables: Any, batch: jax.Array, paths: Sequence[str]) -> dict[str, jax.Array]:
    """Outputs of the modules at `paths` ("stage1/block0/conv_group") on `batch`, in eval mode (one compiled
    forward pass)."""
    paths = tuple(paths)
    return jax.jit(lambda v, x: {p: out for p, (out, _) in _capture(model, v, x, paths).items()})(variables, batch)


def _groups_of(model: nn.Module, variables: Any, batch: jax.Array, paths: Sequence[str]) -> dict[str, int]:
    """`groups` of each module at `paths`, from a shape-only trace."""
    groups = {}
    jax.eval_shape(lambda v, x: groups.update({p: g for p, (_, g) in _capture(model, v, x, tuple(paths)).items()}),
                   variables, batch[:1])
    return groups


def filter_correlations(model: nn.Module, variables: Any, batch: jax.Array,
                        pairs: Sequence[tuple[str, str]]) -> list[tuple[np.ndarray, float, int]]:
    """`filter_correlation` for each `(layer_a, layer_b)` in `pairs`, from one forward pass."""
    paths = sorted({path for pair in pairs for path in pair})
    outs = layer_outputs(model, variables, batch, paths)
    groups = _groups_of(model, variables, batch, paths)
    results = []
    for layer_a, layer_b in pairs:
        corr = _abs_correlation(*_same_size(np.asarray(outs[layer_a]), np.asarray(outs[layer_b])))
        results.append((corr, block_diagonality(corr, groups[layer_b]), groups[layer_b]))
    return results


def _abs_correlation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """`|corr| (C_a, C_b)` between the channels of two `(..., C)` maps of the same positions, over those positions
    (float64)."""
    a, b = (np.asarray(v, np.float64).reshape(-1, v.shape[-1]) for v in (a, b))
    a, b = ((v - v.mean(0)) / (v.std(0) + 1e-12) for v in (a, b))
    return np.abs(a.T @ b) / a.shape[0]


def _upsample_nearest(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """`x: (N, h, w, C) -> (N, H, W, C)`, each pixel repeated (H, W multiples of h, w; else the edge rows repeat)."""
    rows = np.arange(size[0]) * x.shape[1] // size[0]
    cols = np.arange(size[1]) * x.shape[2] // size[1]
    return x[:, rows][:, :, cols]


def _same_size(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The smaller of two `(N, H, W, C)` maps upsampled nearest-neighbour to the larger (Ioannou's thesis)."""
    if a.shape[1:3] == b.shape[1:3]:
        return a, b
    if a.shape[1] * a.shape[2] < b.shape[1] * b.shape[2]:
        return _upsample_nearest(a, b.shape[1:3]), b
    return a, _upsample_nearest(b, a.shape[1:3])


def filter_correlation(model: nn.Module, variables: Any, batch: jax.Array, layer_a: str,
                       layer_b: str) -> tuple[np.ndarray, float, int]:
    """|correlation| between each filter response of `layer_a` and each of `layer_b` over all images and positions.

    Returns `(corr: (C_a, C_b), score, groups)`: `score = block_diagonality(corr, groups)` with `groups` of
    `layer_b`. Each spatial position of each image is a sample; when the maps differ in size the smaller is
    upsampled nearest-neighbour to the larger, as Ioannou's thesis computes it.
    """
    return filter_correlations(model, variables, batch, [(layer_a, layer_b)])[0]


def block_diagonality(corr: np.ndarray, groups: int) -> float:
    """Fraction of the correlation mass inside the `groups` diagonal blocks (rows and columns split evenly).

    1.0: the groups' responses are unrelated; `1 / groups`: no structure (what a dense random layer gives).
    """
    rows, cols = corr.shape
    if rows % groups or cols % groups:
        raise ValueError(f"a {rows}x{cols} correlation matrix does not split into {groups} groups.")
    inside = sum(corr[i * rows // groups:(i + 1) * rows // groups, i * cols // groups:(i + 1) * cols // groups].sum()
                 for i in range(groups))
    return float(inside / corr.sum())


def block_means(corr: np.ndarray, blocks: int) -> tuple[float, float]:
    """`(inside, outside)`: mean |corr| of the entries inside the `blocks` diagonal blocks and of those outside.
    Without structure the two are equal (their ratio's chance level is 1)."""
    corr = np.abs(np.asarray(corr, np.float64))
    rows, cols = corr.shape
    if blocks < 2 or rows % blocks or cols % blocks:
        raise ValueError(f"a {rows}x{cols} correlation matrix does not split into {blocks} >= 2 blocks.")
    mask = np.kron(np.eye(blocks, dtype=bool), np.ones((rows // blocks, cols // blocks), bool))
    return float(corr[mask].mean()), float(corr[~mask].mean())


def score_blocks(corr: np.ndarray, groups: int) -> dict[str, float]:
    """The block-diagonal scores of a layer pair whose second layer has `groups` groups: `blocks` (`groups`, or 2
    for an ungrouped layer, so that a dense network shows what no structure scores), `score`
    (`block_diagonality`), `chance` (1 / blocks), and `inside` / `outside` (`block_means`)."""
    blocks = groups if groups > 1 else 2
    inside, outside = block_means(corr, blocks)
    return {"blocks": blocks, "score": block_diagonality(corr, blocks), "chance": 1 / blocks, "inside": inside,
            "outside": outside}


def colour_scores(kernel: Any) -> np.ndarray:
    """How much each RGB kernel's colour channels differ, relative to its norm: `kernel: (kh, kw, 3, C_out) ->
    (C_out,)`, `||w - grey(w)|| / ||w||` with `grey(w)` the channel mean at each tap. 0: colour-agnostic (the same
    pattern in R, G and B); sqrt(2/3) for one channel alone; 1 for opponent colours with no grey part."""
    k = np.asarray(kernel, np.float64)
    if k.ndim != 4 or k.shape[2] != 3:
        raise ValueError(f"colour scores need an RGB kernel (kh, kw, 3, C_out), got shape {k.shape}.")
    colour = k - k.mean(axis=2, keepdims=True)
    norm = np.sqrt((k ** 2).sum(axis=(0, 1, 2)))
    return np.sqrt((colour ** 2).sum(axis=(0, 1, 2))) / np.where(norm > 0, norm, 1.0)


def group_colour_scores(kernel: Any, groups: int) -> list[tuple[float, float]]:
    """`(mean, std)` of `colour_scores` over the kernels of each of `groups` consecutive blocks of output channels
    (the blocks a grouped next layer consumes: AlexNet's conv2 groups read conv1's kernels in halves)."""
    scores = colour_scores(kernel)
    if scores.size % groups:
        raise ValueError(f"{scores.size} kernels do not split into {groups} groups.")
    return [(float(s.mean()), float(s.std())) for s in np.split(scores, groups)]


def _rescale_01(x: np.ndarray) -> np.ndarray:
    span = x.max() - x.min()
    return (x - x.min()) / span if span > 0 else np.zeros_like(x)


def kernel_views(kernel: Any, groups: int) -> list[np.ndarray]:
    """One grayscale image per group, in group order: `kernel: (kh, kw, C_in // groups, C_out)` -> images of shape
    `(C_out // groups * (kh + 1) - 1, C_in // groups * (kw + 1) - 1)`, a tile per (output, input) channel pair,
    scaled to [0, 1] over the whole kernel so groups compare."""
    k = _rescale_01(np.asarray(kernel, np.float64))
    kh, kw, cin, cout = k.shape
    if cout % groups:
        raise ValueError(f"C_out={cout} is not divisible by groups={groups}.")
    per = cout // groups
    views = []
    for g in range(groups):
        image = np.ones((per * (kh + 1) - 1, cin * (kw + 1) - 1))
        for o in range(per):
            for i in range(cin):
                image[o * (kh + 1):o * (kh + 1) + kh, i * (kw + 1):i * (kw + 1) + kw] = k[:, :, i, g * per + o]
        views.append(image)
    return views


def first_layer_view(kernel: Any, columns: int = 8) -> np.ndarray:
    """The first layer's filters as a grid of tiles (RGB when C_in = 3, else the mean over input channels)."""
    k = np.asarray(kernel, np.float64)
    kh, kw, cin, cout = k.shape
    tiles = k if cin == 3 else k.mean(axis=2, keepdims=True)
    rows = -(-cout // columns)
    image = np.ones((rows * (kh + 1) - 1, columns * (kw + 1) - 1, tiles.shape[2]))
    for o in range(cout):
        r, c = divmod(o, columns)
        image[r * (kh + 1):r * (kh + 1) + kh, c * (kw + 1):c * (kw + 1) + kw] = _rescale_01(tiles[..., o])
    return image if cin == 3 else image[..., 0]


def first_layer_by_group(kernel: Any, groups: int, columns: int = 8) -> list[np.ndarray]:
    """`first_layer_view` of each of `groups` consecutive blocks of the first layer's kernels, one panel per group
    of the layer that consumes them."""
    k = np.asarray(kernel)
    if k.shape[-1] % groups:
        raise ValueError(f"{k.shape[-1]} kernels do not split into {groups} groups.")
    return [first_layer_view(part, columns) for part in np.split(k, groups, axis=-1)]


def default_layer_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """Adjacent layer pairs whose second layer is grouped, one per stage, as the model's family lists them (ResNeXt:
    the first block's reduce 1x1 and grouped 3x3; ShuffleNet v1: the second unit's depthwise 3x3 and grouped
    expand 1x1)."""
    return family_of(model).layer_pairs(model)


def compute_breakdown(model: nn.Module, input_shape: Sequence[int]) -> dict[str, dict[str, dict[str, int]]]:
    """`{stage: {kind: {"params": ..., "macs": ...}}}` from `gconv.complexity`; kinds are stem, dense_1x1,
    dense_kxk, grouped, depthwise and head."""
    table: dict[str, dict[str, dict[str, int]]] = {}
    for (stage, kind), cost in breakdown(model, input_shape).items():
        table.setdefault(stage, {})[kind] = cost
    return table


# --- learned groups (CondenseNet) ---------------------------------------------------------------------------------

def learned_masks(variables: dict) -> dict[str, np.ndarray]:
    """`{layer path: keep (G, C_in)}`: the inputs each group of every learned group conv keeps (`condense/.../keep`),
    in call order."""
    from flax import traverse_util

    flat = traverse_util.flatten_dict(dict(variables.get("condense", {})))
    return {"/".join(path[:-1]): np.asarray(value, bool) for path, value in flat.items() if path[-1] == "keep"}


def connectivity_view(keep: Any) -> np.ndarray:
    """`keep: (G, C_in)` as a 0/1 image with the inputs sorted by the first group that keeps them (inputs no group
    keeps last): a grouping that partitions the inputs shows as blocks along the diagonal."""
    keep = np.asarray(keep, bool)
    first = np.where(keep.any(0), np.argmax(keep, axis=0), keep.shape[0])
    return keep[:, np.argsort(first, kind="stable")].astype(np.float32)


def kept_fractions(masks: dict[str, np.ndarray]) -> dict[str, float]:
    """The share of (group, input) connections kept, per stage (the first component of each layer's path)."""
    stages: dict[str, list[np.ndarray]] = {}
    for path, keep in masks.items():
        stages.setdefault(path.split("/")[0], []).append(keep.ravel())
    return {stage: float(np.concatenate(parts).mean()) for stage, parts in stages.items()}


def learned_input_correlations(model: nn.Module, variables: Any, batch: jax.Array) -> dict[str, np.ndarray]:
    """`{layer path: |corr| (C_in, C_in)}` between the input channels of every learned group conv over the images
    and positions of `batch` (eval mode): which inputs respond together."""
    inputs: dict[str, Any] = {}

    def record(module, args, out):
        if isinstance(module, LearnedGroupConv):
            inputs["/".join(module.scope.path)] = args[0]

    def forward(v, x):
        with record_calls(record):
            model.apply(v, x, train=False)
        return dict(inputs)

    return {path: _abs_correlation(a, a) for path, a in jax.jit(forward)(variables, batch).items()}


def learned_group_score(keep: Any, corr: Any) -> dict[str, float]:
    """Does a learned layer keep correlated inputs in the same group? `inside`: mean |corr| over pairs of distinct
    inputs that some group keeps both of; `outside`: over pairs of kept inputs that no group keeps together; `ratio`
    (chance: 1; no pair of either kind: NaN)."""
    keep, corr = np.asarray(keep, bool), np.asarray(corr, np.float64)
    together = (keep.T.astype(np.int64) @ keep.astype(np.int64)) > 0
    kept = keep.any(0)
    pairs = ~np.eye(len(kept), dtype=bool) & kept[:, None] & kept[None, :]
    inside = float(corr[together & pairs].mean()) if (together & pairs).any() else float("nan")
    outside = float(corr[~together & pairs].mean()) if (~together & pairs).any() else float("nan")
    return {"inside": inside, "outside": outside, "ratio": inside / outside if outside else float("nan")}
