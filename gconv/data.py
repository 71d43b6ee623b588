"""Input pipelines: TFDS array_record sources read through grain, scikit-learn's digits, and synthetic data.

Every pipeline is a grain `MapDataset`, so batch `i` of training is a pure function of (seed, i): resuming at step
`s` reads from batch `s` on, and a resumed run sees exactly the batches an uninterrupted one would.
Batches are dicts of numpy arrays: `image: (B, H, W, C) float32`, `label: (B,) int32`, `mask: (B,) bool`
(False marks the padding of the last eval batch).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Iterator, Sequence

import grain
import numpy as np

__all__ = ["DatasetInfo", "get_source", "train_batches", "eval_batches", "DATASETS"]


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    name: str
    image_shape: tuple[int, int, int]  # after preprocessing
    num_classes: int
    num_train: int
    num_eval: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


# name -> (tfds name, train split, eval split, classes, image size after preprocessing, mean, std)
_TFDS = {
    "cifar10": ("cifar10", "train", "test", 10, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ("cifar100", "train", "test", 100, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenette": ("imagenette/full-size-v2", "train", "validation", 10, 224,
                   (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "imagenet2012": ("imagenet2012", "train", "validation", 1000, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
DATASETS = sorted(_TFDS) + ["digits", "digits32", "synthetic"]


class _ArraySource:
    """Random-access source over in-memory arrays: record `i` is `{"image": images[i], "label": labels[i]}`."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return {"image": self.images[i], "label": self.labels[i]}


def _digits(split: str) -> _ArraySource:
    """scikit-learn's bundled 8x8 digits (1,797 images, ships offline): a fixed stratified 1,437 / 360 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images[..., None] / 16.0).astype(np.float32)  # pixel values 0..16
    x_tr, x_te, y_tr, y_te = train_test_split(images, digits.target.astype(np.int32), test_size=360, random_state=0,
                                              stratify=digits.target)
    return _ArraySource(x_tr, y_tr) if split == "train" else _ArraySource(x_te, y_te)


def _digits32(split: str) -> _ArraySource:
    """`_digits` upsampled bilinearly to 32x32 and repeated over 3 channels: CIFAR-10's shapes, offline (a stand-in
    for CIFAR-size networks, not a substitute for CIFAR's difficulty)."""
    from scipy.ndimage import zoom

    small = _digits(split)
    images = np.clip(zoom(small.images[..., 0], (1, 4, 4), order=1, grid_mode=True, mode="nearest"), 0.0, 1.0)
    return _ArraySource(np.repeat(images[..., None], 3, axis=-1).astype(np.float32), small.labels)


def _synthetic(split: str, image_size: int, num_classes: int, size: int = 1024) -> _ArraySource:
    """Random images with random labels, for throughput measurements (nothing to learn)."""
    rng = np.random.default_rng(0 if split == "train" else 1)
    images = rng.standard_normal((size, image_size, image_size, 3), dtype=np.float32)
    return _ArraySource(images, rng.integers(0, num_classes, size, dtype=np.int32))


def _tfds_source(tfds_name: str, split: str, data_dir: str | None):
    import tensorflow_datasets as tfds

    try:
        return tfds.data_source(tfds_name, split=split, data_dir=data_dir, download=False)
    except Exception as e:  # tfds raises several types for "not prepared"; all end here with the same advice
        said = (str(e).strip().splitlines() or [""])[0][:300]
        raise FileNotFoundError(
            f"TFDS dataset {tfds_name!r} (split {split!r}) is not prepared in array_record format in "
            f"data.data_dir={data_dir or '~/tensorflow_datasets'}: prepare it once, on a machine with internet "
            f"access, with python -c \"import tensorflow_datasets as tfds; tfds.builder('{tfds_name}', data_dir=DIR)"
            f".download_and_prepare(file_format='array_record')\" (imagenet2012 needs the ILSVRC2012 tar files in "
            f"DIR/downloads/manual first), then pass --config.data.data_dir=DIR (TFDS said: {type(e).__name__}: "
            f"{said})") from e


def get_source(data: Any, split: str) -> tuple[Sequence[dict], DatasetInfo]:
    """The random-access source for `split` ("train" or "eval") and its `DatasetInfo`. `data` is `config.data`."""
    if split not in ("train", "eval"):
        raise ValueError(f"split={split!r}: expected 'train' or 'eval'.")
    name = data.name
    if name == "digits":
        source = _digits(split)
        info = DatasetInfo("digits", (8, 8, 1), 10, 1437, 360, (0.0,), (1.0,))
    elif name == "digits32":
        source = _digits32(split)
        mean = float(_digits32("train").images.mean()) if split == "eval" else float(source.images.mean())
        info = DatasetInfo("digits32", (32, 32, 3), 10, 1437, 360, (mean,) * 3, (1.0,) * 3)  # mean subtraction
    elif name == "synthetic":
        source = _synthetic(split, data.image_size, data.num_classes)
        info = DatasetInfo("synthetic", (data.image_size,) * 2 + (3,), data.num_classes, len(source), len(source),
                           (0.0,) * 3, (1.0,) * 3)
    elif name in _TFDS:
        tfds_name, train_split, eval_split, classes, size, mean, std = _TFDS[name]
        if data.get("crop_size"):
            if size != 224:
                raise ValueError(f"data.crop_size={data.crop_size}: {name} is not cropped (its images are "
                                 f"{size}x{size}); leave data.crop_size=0.")
            size = data.crop_size
        source = _tfds_source(tfds_name, train_split if split == "train" else eval_split, data.get("data_dir"))
        other = _tfds_source(tfds_name, eval_split if split == "train" else train_split, data.get("data_dir"))
        n_train, n_eval = (len(source), len(other)) if split == "train" else (len(other), len(source))
        info = DatasetInfo(name, (size, size, 3), classes, n_train, n_eval, mean, std)
    else:
        raise ValueError(f"unknown dataset {name!r}: use one of {DATASETS}.")
    return source, info


# --- preprocessing (numpy, per example) -------------------------------------------------------------------------

def _standardize(image: np.ndarray, info: DatasetInfo) -> np.ndarray:
    scale = 255.0 if image.dtype == np.uint8 else 1.0
    image = image.astype(np.float32) / scale
    return (image - np.asarray(info.mean, np.float32)) / np.asarray(info.std, np.float32)


def _pad_crop_flip(image: np.ndarray, rng: np.random.Generator, pad: int = 4) -> np.ndarray:
    """CIFAR augmentation: zero-pad by `pad`, random crop back to size, random horizontal flip."""
    h, w = image.shape[:2]
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
    top, left = rng.integers(0, 2 * pad + 1, size=2)
    image = padded[top:top + h, left:left + w]
    return image[:, ::-1] if rng.random() < 0.5 else image


def _resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(np.asarray(image, np.uint8)).resize(size[::-1], Image.BILINEAR))


def _random_resized_crop(image: np.ndarray, rng: np.random.Generator, size: int,
                         scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> np.ndarray:
    """Inception-style crop (area fraction in `scale`, aspect in `ratio`), resized to `size`, random flip."""
    h, w = image.shape[:2]
    for _ in range(10):
        area = h * w * rng.uniform(*scale)
        aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
        ch, cw = int(round(np.sqrt(area / aspect))), int(round(np.sqrt(area * aspect)))
        if 0 < ch <= h and 0 < cw <= w:
            top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
            break
    else:  # fall back to a center crop of the whole image
        ch, cw, top, left = h, w, 0, 0
    image = _resize(image[top:top + ch, left:left + cw], (size, size))
    return image[:, ::-1] if rng.random() < 0.5 else image


def _center_crop(image: np.ndarray, size: int, resize_ratio: float = 256 / 224) -> np.ndarray:
    """Resize the shorter side to `size * resize_ratio`, then crop the center `size x size`."""
    h, w = image.shape[:2]
    short = int(round(size * resize_ratio))
    nh, nw = (short, int(round(w * short / h))) if h <= w else (int(round(h * short / w)), short)
    image = _resize(image, (nh, nw))
    top, left = (nh - size) // 2, (nw - size) // 2
    return image[top:top + size, left:left + size]


def _augmenter(info: DatasetInfo, train: bool, augment: bool) -> Callable[[dict, np.random.Generator], dict]:
    size = info.image_shape[0]
    big = info.name in ("imagenette", "imagenet2012")

    def fn(record: dict, rng: np.random.Generator) -> dict:
        image = np.asarray(record["image"])
        if big:
            image = _random_resized_crop(image, rng, size) if (train and augment) else _center_crop(image, size)
        elif train and augment:
            image = _pad_crop_flip(image, rng)
        return {"image": _standardize(image, info), "label": np.int32(record["label"]), "mask": np.bool_(True)}

    return fn


def num_threads(num_workers: int) -> int:
    """`data.num_workers`: a count, or -1 for every core this process may use."""
    if num_workers == -1:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if num_workers < 1:
        raise ValueError(f"data.num_workers={num_workers} must be >= 1, or -1 for every core of the host.")
    return num_workers


def train_batches(source: Sequence[dict], info: DatasetInfo, batch_size: int, *, seed: int, start_step: int = 0,
                  augment: bool = True, num_workers: int = 2, prefetch: int = 4, shard_index: int = 0,
                  shard_count: int = 1) -> Iterator[dict]:
    """Endless training batches from batch `start_step` on: reshuffled each epoch, augmented, prefetched, read by
    `num_workers` threads (-1: every core).

    `batch_size` is global. Of each global batch, shard `shard_index` of `shard_count` (a process's share in a
    multi-process run) reads, decodes and augments only its rows `[shard_index * b, (shard_index + 1) * b)`,
    `b = batch_size / shard_count`: the shards together are the one-process batch, example for example and
    augmentation for augmentation.
    """
    if batch_size > len(source):
        raise ValueError(f"batch_size={batch_size} is larger than the {len(source)} training examples.")
    if batch_size % shard_count:
        raise ValueError(f"batch_size={batch_size} is not divisible by the {shard_count} input shards (processes): "
                         f"use a multiple of {shard_count}.")
    fn = _augmenter(info, train=True, augment=augment)
    rows = batch_size // shard_count
    ds = (grain.MapDataset.source(source).shuffle(seed=seed).repeat(None)
          .random_map(fn, seed=seed + 1).batch(rows, drop_remainder=True))  # records' randomness: by global index
    ds = ds[start_step * shard_count + shard_index::shard_count]
    options = grain.ReadOptions(num_threads=num_threads(num_workers), prefetch_buffer_size=prefetch)
    return iter(ds.to_iter_dataset(options))


def eval_batches(source: Sequence[dict], info: DatasetInfo, batch_size: int, num_workers: int = 2) -> Iterator[dict]:
    """One pass over `source` in order; the last batch is padded to `batch_size` with `mask=False` rows."""
    fn = _augmenter(info, train=False, augment=False)
    pad = -len(source) % batch_size

    def load(i: int) -> dict:
        if i < len(source):
            return fn(source[i], None)
        blank = fn(source[0], None)
        return {**blank, "mask": np.bool_(False)}

    ds = grain.MapDataset.range(len(source) + pad).map(load).batch(batch_size)
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads(num_workers), prefetch_buffer_size=2)))
