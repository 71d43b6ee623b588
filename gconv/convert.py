"""Trained PyTorch weights into gconv models: torchvision/timm ResNeXt, torchvision ShuffleNet v2, imgclsmob
ShuffleNet v1, IGCV3 and (converted, `condensed=True`) CondenseNet.

    variables = load_torch_weights("resnext50_32x4d", "resnext50_32x4d-1a0047aa.pth")
    logits = create_model("resnext50_32x4d").apply(variables, images)      # images: (N, 224, 224, 3), NHWC

Kernels go OIHW -> HWIO (a grouped kernel `(O, I/g, kh, kw)` keeps its per-group layout), dense weights are
transposed, BatchNorm's running statistics become `batch_stats`, CondenseNet's `index` buffers its `condense`
gathers. Every key is accounted for: missing, unexpected
or wrongly shaped keys raise `ValueError` listing them. `.pth` files are read with `torch.load(weights_only=True)`
(no pickled code runs; torch is imported only then); `.safetensors` need no torch.

Published weights on demand: `load_pretrained("resnext50_32x4d", "tv2_in1k")` downloads torchvision's file once
into `$GCONV_CACHE/weights` (default `~/.cache/gconv/weights`), checks its SHA-256 against the hash in its name,
and converts it.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from gconv.models import FAMILIES, create_model, family_of

__all__ = ["load_torch_weights", "load_torch_weights_for", "load_pretrained", "pretrained_file", "PRETRAINED",
           "published_weights", "read_state_dict", "torch_key"]

# (model, tag) -> URL of published weights beyond those the families list (`ModelFamily.weights`); see
# `published_weights` and `pretrained_file`.
PRETRAINED: dict[tuple[str, str], str] = {}


def published_weights() -> dict[tuple[str, str], str]:
    """Every `(model, tag) -> URL` of published weights: each registered family's `weights` and `PRETRAINED`'s.
    tv_in1k / tv2_in1k: torchvision's IMAGENET1K_V1 / V2; cv_in1k: imgclsmob's (pytorchcv's) ImageNet-1k weights."""
    return {key: url for family in FAMILIES for key, url in family.weights.items()} | PRETRAINED


_LEAVES = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var",
           "index": "index"}  # a condensed CondenseNet's gathers (`condense` collection)


def torch_key(model: str | type | Any, path: tuple[str, ...]) -> str:
    """The PyTorch state-dict key of a gconv leaf, in the layout of the family's reference code (each family's
    `torch_name`): `("resnext50_32x4d", ("stage1", "block0", "conv_group", "kernel"))` -> "layer1.0.conv2.weight"."""
    family = family_of(model)
    if family.torch_name is None:
        raise ValueError(f"no PyTorch layout is known for the {family.name} family: give its ModelFamily a "
                         f"torch_name to convert PyTorch weights.")
    return f"{family.torch_name(path[:-1])}.{_LEAVES[path[-1]]}"


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
    head = tuple(family_of(model_name).head.split("/"))
    head_key = torch_key(model_name, head + ("kernel",))
    if head_key not in state:
        raise ValueError(f"the checkpoint has no classifier {head_key!r}: is it a {model_name} in the "
                         f"torchvision/timm/imgclsmob layout? Its first keys: {sorted(state)[:8]}.")
    ckpt_classes = state[head_key].shape[0]
    model = create_model(model_name, num_classes=num_classes or ckpt_classes, **model_overrides)
    replace_head = num_classes is not None and num_classes != ckpt_classes
    init = lambda: model.init(jax.random.PRNGKey(seed), jnp.zeros((1, 64, 64, 3)))  # noqa: E731
    # the model's tree; values only where a new head keeps them (every other leaf comes from the checkpoint)
    fresh = jax.jit(init)() if replace_head else jax.eval_shape(init)

    used, missing, bad_shape, out = set(), [], [], {}
    for collection in fresh:  # params, batch_stats and a condensed CondenseNet's gathers
        def convert(path, leaf, collection=collection):
            names = tuple(str(k.key) for k in path)
            key = torch_key(model_name, names)
            if replace_head and names[:len(head)] == head:
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


def init_from_path(config: Any) -> Path:
    """A config's `init_from` as a file: a path, or a published-weights tag of its model (downloaded when needed)."""
    if os.path.isfile(config.init_from) or os.sep in config.init_from or "." in config.init_from:
        return Path(config.init_from)
    from gconv.models import model_from_config

    model = model_from_config(config.model, 1000)
    return pretrained_file(family_of(model).name_of(model), config.init_from)


def load_torch_weights_for(config: Any, num_classes: int) -> dict[str, Any]:
    """`load_torch_weights` for a run's config: its `init_from` (a file, or a tag of `published_weights`) onto its model
    (`config.model`), the classifier replaced by a fresh one (from `config.seed`) when the classes differ."""
    overrides = {k: v for k, v in config.model.items() if k not in ("name", "dtype")}
    return load_torch_weights(config.model.name, init_from_path(config), num_classes=num_classes, seed=config.seed,
                              **overrides)


def pretrained_file(model_name: str, tag: str) -> Path:
    """The local file of published weights `tag` for `model_name`, downloaded into `storage.cache_dir()` the first
    time and checked against the hash in its name. Raises `ValueError` for an unknown tag or a wrong hash (the
    download is not kept) and `FileNotFoundError` when it is not cached and cannot be downloaded."""
    from gconv import storage

    published = published_weights()
    url = published.get((model_name, tag))
    if url is None:
        known = sorted(t for name, t in published if name == model_name)
        raise ValueError(f"no published weights {tag!r} for {model_name}: known tags {known or 'none'}; models with "
                         f"weights: {sorted({name for name, _ in published})}.")
    filename = url.rsplit("/", 1)[1]
    zipped = filename.endswith(".zip")
    path = Path(storage.cache_dir()) / filename.removesuffix(".zip")
    if path.is_file():
        return path
    expected = re.search(r"-([0-9a-f]+)\.[a-z]+$", path.name).group(1)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{filename}.{os.getpid()}.part")
    try:
        try:
            with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as out:
                shutil.copyfileobj(response, out, 1 << 20)
        except (OSError, urllib.error.URLError) as e:
            raise FileNotFoundError(
                f"{model_name} weights {tag!r} are not cached and could not be downloaded from {url} (no network? "
                f"{getattr(e, 'reason', e)}): download that file on a machine with internet access into "
                f"{path.parent}{' and unzip it' if zipped else ''} (GCONV_CACHE=DIR reads DIR/weights), or pass "
                f"--config.init_from=PATH.") from e
        if zipped:  # imgclsmob's release: one file, named as the weights
            _unzip_one(partial, path.name, url)
        digest = (hashlib.sha1 if zipped else hashlib.sha256)(partial.read_bytes()).hexdigest()
        if not digest.startswith(expected):
            raise ValueError(f"{url}: {'SHA-1' if zipped else 'SHA-256'} {digest[:16]}... does not start with "
                             f"{expected} as its name says; the download was damaged or the file changed. Nothing "
                             f"was kept; try again.")
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def _unzip_one(archive: Path, member: str, url: str) -> None:
    """Replaces the zip `archive` by its one file `member`."""
    try:
        with zipfile.ZipFile(archive) as z:
            if z.namelist() != [member]:
                raise ValueError(f"{url}: holds {z.namelist()}, not the one file {member!r} its name promises. "
                                 f"Nothing was kept.")
            data = z.read(member)
    except zipfile.BadZipFile as e:
        raise ValueError(f"{url}: not a readable zip ({e}); the download was damaged. Nothing was kept; try "
                         f"again.") from e
    archive.write_bytes(data)


def load_pretrained(model_name: str, tag: str, num_classes: int | None = None, seed: int = 0,
                    **model_overrides: Any) -> dict[str, Any]:
    """Flax variables of published weights (`published_weights`: torchvision's ResNeXt and ShuffleNet v2,
    imgclsmob's CondenseNet-74 and IGCV3), downloaded once and cached (see `pretrained_file`), converted by
    `load_torch_weights` onto the network they were trained as (the family's `weights_fields`: CondenseNet's
    condensed one)."""
    fields = {**family_of(model_name).weights_fields, **model_overrides}
    return load_torch_weights(model_name, pretrained_file(model_name, tag), num_classes=num_classes, seed=seed,
                              **fields)
