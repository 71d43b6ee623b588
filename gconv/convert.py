"""Trained PyTorch weights into gconv models: torchvision/timm ResNeXt, torchvision ShuffleNet v2, imgclsmob
ShuffleNet v1.

    variables = load_torch_weights("resnext50_32x4d", "resnext50_32x4d-1a0047aa.pth")
    logits = create_model("resnext50_32x4d").apply(variables, images)      # images: (N, 224, 224, 3), NHWC

Kernels go OIHW -> HWIO (a grouped kernel `(O, I/g, kh, kw)` keeps its per-group layout), dense weights are
transposed, BatchNorm's running statistics become `batch_stats`. Every key is accounted for: missing, unexpected
or wrongly shaped keys raise `ValueError` listing them. `.pth` files are read with `torch.load(weights_only=True)`
(no pickled code runs; torch is imported only then); `.safetensors` need no torch.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from gconv.models import create_model, model_spec
from gconv.models.resnext import ResNeXt
from gconv.models.shufflenet import ShuffleNetV1, ShuffleNetV2

__all__ = ["load_torch_weights", "read_state_dict", "torch_key"]

_RESNEXT_LAYERS = {"conv_reduce": "conv1", "bn_reduce": "bn1", "conv_group": "conv2", "bn_group": "bn2",
                   "conv_expand": "conv3", "bn_expand": "bn3", "proj_conv": "downsample.0", "proj_bn": "downsample.1"}
_V2_LAYERS = {"branch1_dw_conv": "branch1.0", "branch1_dw_bn": "branch1.1", "branch1_conv": "branch1.2",
              "branch1_bn": "branch1.3", "branch2_conv1": "branch2.0", "branch2_bn1": "branch2.1",
              "branch2_dw_conv": "branch2.3", "branch2_dw_bn": "branch2.4", "branch2_conv2": "branch2.5",
              "branch2_bn2": "branch2.6"}
_V1_LAYERS = {"compress_conv": "compress_conv1", "compress_bn": "compress_bn1", "dw_conv": "dw_conv2",
              "dw_bn": "dw_bn2", "expand_conv": "expand_conv3", "expand_bn": "expand_bn3"}
_LEAVES = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


def _module_name(cls: type, path: tuple[str, ...]) -> str:
    """The PyTorch module name of a gconv module path, in the layout of the family's reference code."""
    if cls is ResNeXt:  # torchvision and timm: conv1/bn1, layer{i}.{j}.conv1..., fc
        top = {"stem_conv": "conv1", "stem_bn": "bn1", "head": "fc"}
        if path[0] in top:
            return top[path[0]]
        stage, block, layer = path
        return f"layer{stage[len('stage'):]}.{block[len('block'):]}.{_RESNEXT_LAYERS[layer]}"
    if cls is ShuffleNetV2:  # torchvision: conv1.{0,1}, stage{2,3,4}.{j}.branch{1,2}.{k}, conv5.{0,1}, fc
        top = {"stem_conv": "conv1.0", "stem_bn": "conv1.1", "last_conv": "conv5.0", "last_bn": "conv5.1",
               "head": "fc"}
        if path[0] in top:
            return top[path[0]]
        stage, unit, layer = path
        return f"{stage}.{unit[len('unit'):]}.{_V2_LAYERS[layer]}"
    if cls is ShuffleNetV1:  # imgclsmob: features.init_block.{conv,bn}, features.stage{1,2,3}.unit{1..}, output
        top = {"stem_conv": "features.init_block.conv", "stem_bn": "features.init_block.bn", "head": "output"}
        if path[0] in top:
            return top[path[0]]
        stage, unit, layer = path
        return f"features.stage{int(stage[len('stage'):]) - 1}.unit{int(unit[len('unit'):]) + 1}.{_V1_LAYERS[layer]}"
    raise ValueError(f"no PyTorch layout is known for {cls.__name__}.")


def torch_key(cls: type, collection: str, path: tuple[str, ...]) -> str:
    """`(ResNeXt, "params", ("stage1", "block0", "conv_group", "kernel"))` -> "layer1.0.conv2.weight"."""
    return f"{_module_name(cls, path[:-1])}.{_LEAVES[path[-1]]}"


def read_state_dict(source: str | Path | Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A state dict as numpy arrays from a mapping, a `.safetensors` file, or a `.pth`/`.pt` file (tensors only)."""
    if isinstance(source, Mapping):
        return {k: np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v) for k, v in source.items()}
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {str(path)!r}: pass a .pth/.pt/.safetensors file or a mapping.")
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        return load_file(str(path))
    if path.suffix in (".pth", ".pt"):
        try:
            import torch
        except ImportError as e:
            raise ImportError(f"reading {path.name} needs torch (pip install torch), or convert it to .safetensors "
                              f"on a machine that has torch.") from e
        state = torch.load(str(path), map_location="cpu", weights_only=True)  # tensors only, never pickled code
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        return read_state_dict(state)
    raise ValueError(f"{path.name}: unknown checkpoint format {path.suffix!r}; use .pth, .pt or .safetensors.")


def _to_flax(array: np.ndarray) -> np.ndarray:
    if array.ndim == 4:
        return array.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    if array.ndim == 2:
        return array.T  # (out, in) -> (in, out)
    return array


def load_torch_weights(model_name: str, source: str | Path | Mapping[str, Any], num_classes: int | None = None,
                       seed: int = 0, **model_overrides: Any) -> dict[str, Any]:
    """Flax variables (`params`, `batch_stats`) for `create_model(model_name, **model_overrides)` from a PyTorch
    state dict. `num_classes`: None keeps the checkpoint's classifier; another value replaces it with a freshly
    initialised head (from `seed`)."""
    state = read_state_dict(source)
    cls, _ = model_spec(model_name)
    head_key = _module_name(cls, ("head",)) + ".weight"
    if head_key not in state:
        raise ValueError(f"the checkpoint has no classifier {head_key!r}: is it a {cls.__name__} in the "
                         f"torchvision/timm/imgclsmob layout? Its first keys: {sorted(state)[:8]}.")
    ckpt_classes = state[head_key].shape[0]
    model = create_model(model_name, num_classes=num_classes or ckpt_classes, **model_overrides)
    fresh = jax.jit(model.init)(jax.random.PRNGKey(seed), jnp.zeros((1, 64, 64, 3)))
    replace_head = num_classes is not None and num_classes != ckpt_classes

    used, missing, bad_shape, out = set(), [], [], {}
    for collection in ("params", "batch_stats"):
        def convert(path, leaf, collection=collection):
            names = tuple(str(k.key) for k in path)
            key = torch_key(cls, collection, names)
            if replace_head and names[0] == "head":
                used.add(key)
                return leaf
            if key not in state:
                missing.append(key)
                return leaf
            used.add(key)
            value = _to_flax(state[key])
            if value.shape != leaf.shape:
                bad_shape.append(f"{key}: checkpoint {tuple(state[key].shape)} -> {value.shape}, model expects "
                                 f"{tuple(leaf.shape)}")
                return leaf
            return jnp.asarray(value, leaf.dtype)

        out[collection] = jax.tree_util.tree_map_with_path(convert, fresh[collection])
    unexpected = sorted(k for k in set(state) - used if not k.endswith("num_batches_tracked"))
    if missing or unexpected or bad_shape:
        raise ValueError(f"checkpoint does not fit {model_name}: missing keys {missing}, unexpected keys "
                         f"{unexpected}, wrong shapes {bad_shape}. Check the model name and its overrides "
                         f"(e.g. stage_sizes) against the checkpoint.")
    return out
