"""Input pipelines: TFDS array_record sources read through grain, scikit-learn's digits, and synthetic data.

`data.name` is one of the offline sets (`digits`, `digits32`, `synthetic`), one of the four datasets gconv knows the
recipes of (`cifar10`, `cifar100`, `imagenette`, `imagenet2012`: their sizes, splits, means and stds), or any other
TFDS image-classification dataset (`svhn_cropped`, `oxford_flowers102`, ...): its classes from the builder's info,
`data.image_size`, `data.train_split` / `data.eval_split` (TFDS split strings, slices included: `train[:90%]`), and
`data.mean` / `data.std` from the config or measured once on a sample of the training split and cached beside the
data. `data.crop` chooses the training crop: `random_resized` (Inception-style; evaluation resizes to 256/224 of the
size and crops the center) or `pad_flip` (pad 4, crop, flip; evaluation resizes and crops only images of another
size); `auto`: `random_resized` from 128 pixels up.

Every pipeline is a grain `MapDataset`, so batch `i` of training is a pure function of (seed, i): resuming at step
`s` reads from batch `s` on, and a resumed run sees exactly the batches an uninterrupted one would.
Batches are dicts of numpy arrays: `image: (B, H, W, C)`, `label: (B,) int32`, `mask: (B,) bool`
(False marks the padding of the last eval batch). Images are float32, standardised, for the offline sets, and the
decoded `uint8` pixels for TFDS datasets and folders: the jitted steps standardise those (`standardized`).
"""
from __future__ import annotations

import dataclasses
import functools
import io
import math
import os
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import grain
import numpy as np

__all__ = ["DatasetInfo", "get_source", "get_sources", "train_batches", "eval_batches", "standardize", "standardized",
           "crop_box", "measured_mean_std", "prepare", "DATASETS", "OFFLINE", "CROPS"]


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    name: str
    image_shape: tuple[int, int, int]  # after preprocessing
    num_classes: int
    num_train: int
    num_eval: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop: str = "pad_flip"  # the training crop: "random_resized" or "pad_flip"
    classes: tuple[str, ...] = ()  # the class names, where the data has them (an image folder's sub-folders)
    pixels: str = "float32"  # what batches carry: "float32" standardised on the host, or "uint8" (see `standardize`)


# name -> (tfds name, train split, eval split, classes, image size after preprocessing, mean, std)
_TFDS = {
    "cifar10": ("cifar10", "train", "test", 10, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ("cifar100", "train", "test", 100, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenette": ("imagenette/full-size-v2", "train", "validation", 10, 224,
                   (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "imagenet2012": ("imagenet2012", "train", "validation", 1000, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
OFFLINE = ["digits", "digits32", "synthetic"]
DATASETS = sorted(_TFDS) + OFFLINE + ["folder"]  # and any other TFDS image-classification name
CROPS = ("auto", "random_resized", "pad_flip")


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
        source = tfds.data_source(tfds_name, split=split, data_dir=data_dir, download=False)
    except Exception as e:  # tfds raises several types for "not prepared"; all end here with the same advice
        said = (str(e).strip().splitlines() or [""])[0][:300]
        raise FileNotFoundError(
            f"TFDS dataset {tfds_name!r} (split {split!r}) is not prepared in array_record format in "
            f"data.data_dir={data_dir or '~/tensorflow_datasets'}: prepare it once, on a machine with internet "
            f"access, with python launch.py prepare --config EXPERIMENT --config.data.data_dir=DIR (or python -c "
            f"\"import tensorflow_datasets as tfds; tfds.builder('{tfds_name}', data_dir=DIR)"
            f".download_and_prepare(file_format='array_record')\"; imagenet2012 needs the ILSVRC2012 tar files in "
            f"DIR/downloads/manual first), then pass --config.data.data_dir=DIR (TFDS said: {type(e).__name__}: "
            f"{said})") from e
    image = source.dataset_info.features["image"]
    if isinstance(image, tfds.features.Image) and image.np_dtype == np.uint8:
        source.decoders = {"image": tfds.decode.SkipDecoding()}  # encoded: decoded knowing the crop (_opened)
    return source


def prepare(data: Any) -> str:
    """Downloads and prepares `data`'s TFDS dataset in array_record format into `data.data_dir` (TFDS's progress
    bars), once: a prepared dataset is left as it is. Returns what was done, in words. Offline datasets and image
    folders need nothing. Raises `FileNotFoundError` in one line when the download fails (no network)."""
    if data.name in OFFLINE or data.name == "folder":
        return f"{data.name}: nothing to prepare ({'read from data.path' if data.name == 'folder' else 'offline'})"
    tfds_name = _TFDS[data.name][0] if data.name in _TFDS else data.name
    data_dir = data.get("data_dir") or None
    builder = _tfds_builder(tfds_name, data_dir)
    where = builder.data_dir
    if builder.is_prepared() and getattr(builder.info.file_format, "value", None) == "array_record":
        return f"{tfds_name}: prepared already in {where}"
    import tensorflow_datasets as tfds

    try:
        builder.download_and_prepare(file_format="array_record",
                                     download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    except Exception as e:  # download errors come in many types (network, missing manual files, checksums)
        said = (str(e).strip().splitlines() or [""])[0][:300]
        if "No module named 'tensorflow'" in str(e):  # TFDS encodes images given as arrays with TensorFlow
            raise ModuleNotFoundError(f"preparing {tfds_name} needs TensorFlow, which TFDS uses to encode its "
                                      f"images: pip install tensorflow-cpu where you prepare it and run it again "
                                      f"(the downloads in {where} are kept; training reads the prepared files "
                                      f"without TensorFlow).") from e
        raise FileNotFoundError(f"{tfds_name} could not be prepared in {where} ({type(e).__name__}: {said}): run "
                                f"python launch.py prepare --config EXPERIMENT --config.data.data_dir=DIR where there "
                                f"is a network (imagenet2012: with the ILSVRC2012 tar files in "
                                f"DIR/downloads/manual), then copy DIR here or to a bucket.") from e
    return f"{tfds_name}: prepared in {builder.data_dir}"


def get_source(data: Any, split: str) -> tuple[Sequence[dict], DatasetInfo]:
    """The random-access source for `split` ("train" or "eval") and its `DatasetInfo`. `data` is `config.data`."""
    if split not in ("train", "eval"):
        raise ValueError(f"split={split!r}: expected 'train' or 'eval'.")
    train, evaluation, info = get_sources(data)
    return (train if split == "train" else evaluation), info


def get_sources(data: Any) -> tuple[Sequence[dict], Sequence[dict], DatasetInfo]:
    """`(training source, evaluation source, info)` of `data` (`config.data`), each opened once."""
    name = data.name
    if name == "digits":
        info = DatasetInfo("digits", (8, 8, 1), 10, 1437, 360, (0.0,), (1.0,))
        return _digits("train"), _digits("eval"), info
    if name == "digits32":
        train = _digits32("train")
        info = DatasetInfo("digits32", (32, 32, 3), 10, 1437, 360, (float(train.images.mean()),) * 3, (1.0,) * 3)
        return train, _digits32("eval"), info  # mean subtraction
    if name == "synthetic":
        train = _synthetic("train", data.image_size, data.num_classes)
        info = DatasetInfo("synthetic", (data.image_size,) * 2 + (3,), data.num_classes, len(train), len(train),
                           (0.0,) * 3, (1.0,) * 3)
        return train, _synthetic("eval", data.image_size, data.num_classes), info
    return _folder_dataset(data) if name == "folder" else _tfds_dataset(data)


def _tfds_dataset(data: Any) -> tuple[Sequence[dict], Sequence[dict], DatasetInfo]:
    """A TFDS dataset's sources and info: the recipe of the four known ones, the builder's info and the config for
    any other."""
    name, data_dir = data.name, data.get("data_dir")
    if name in _TFDS:
        tfds_name, train_split, eval_split, classes, size, mean, std = _TFDS[name]
        if data.get("crop_size"):
            if size != 224:
                raise ValueError(f"data.crop_size={data.crop_size}: {name} is not cropped (its images are "
                                 f"{size}x{size}); leave data.crop_size=0.")
            size = data.crop_size
    else:
        builder = _tfds_builder(name, data_dir)
        tfds_name, train_split, eval_split = name, "train", _default_eval_split(builder)
        classes, size, mean, std = builder.info.features["label"].num_classes, data.image_size, (), ()
        names = tuple(builder.info.features["label"].names)
    train_split, eval_split = data.get("train_split") or train_split, data.get("eval_split") or eval_split
    train, evaluation = (_tfds_source(tfds_name, s, data_dir) for s in (train_split, eval_split))
    info = _described(data, train, evaluation, classes, size, mean, std,
                      _stats_root(data_dir or os.path.expanduser("~/tensorflow_datasets")) /
                      _stats_name(tfds_name, train_split, size, data.get("crop", "auto")))
    if data.name not in _TFDS:
        info = dataclasses.replace(info, classes=names)
    return train, evaluation, info


def _described(data: Any, train: Sequence[dict], evaluation: Sequence[dict], classes: int, size: int,
               mean: Sequence[float], std: Sequence[float], stats_path: Any) -> DatasetInfo:
    """The info of an image dataset read at `size`: the crop its size implies, and the mean and std the config
    gives, else `mean`/`std` (a known recipe's), else measured on `train` and cached at `stats_path`."""
    crop = _crop_policy(data.get("crop", "auto"), size)
    mean, std = tuple(data.get("mean") or mean), tuple(data.get("std") or std)
    info = DatasetInfo(data.name, (size, size, 3), classes, len(train), len(evaluation), mean, std, crop,
                       pixels="uint8")
    if not mean or not std:
        measured = measured_mean_std(train, info, stats_path)
        info = dataclasses.replace(info, mean=mean or measured[0], std=std or measured[1])
    if len(info.mean) != 3 or len(info.std) != 3 or min(info.std) <= 0:
        raise ValueError(f"data.mean={info.mean} and data.std={info.std}: give 3 values each (RGB, on pixels "
                         f"scaled to [0, 1]), every std > 0; or leave them empty to measure them.")
    return info


def _crop_policy(crop: str, size: int) -> str:
    if crop not in CROPS:
        raise ValueError(f"data.crop={crop!r}: use one of {CROPS} (auto: random_resized from 128 pixels up).")
    return ("random_resized" if size >= 128 else "pad_flip") if crop == "auto" else crop


def _tfds_builder(name: str, data_dir: str | None):
    """The TFDS builder of `name` (its info; the data need not be prepared)."""
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir or None)
    except tfds.core.registered.DatasetNotFoundError:
        raise ValueError(f"data.name={name!r} is not known: neither one of {DATASETS} nor a TFDS dataset "
                         f"(tfds.list_builders() names them; a config as 'name/config').") from None
    features = builder.info.features
    if "image" not in features or "label" not in features or not hasattr(features["label"], "num_classes"):
        raise ValueError(f"TFDS dataset {name!r} has features {sorted(features)}: gconv trains image "
                         f"classification datasets, with an 'image' and a class 'label'.")
    return builder


def _default_eval_split(builder) -> str:
    """"test", else "validation": the split a dataset's results are reported on."""
    splits = set(builder.info.splits) or {"test"}  # not prepared: tfds_source says so
    for candidate in ("test", "validation"):
        if candidate in splits:
            return candidate
    raise ValueError(f"TFDS dataset {builder.name!r} has splits {sorted(splits)} and no test or validation split: "
                     f"carve one from train, e.g. --config.data.train_split='train[:90%]' "
                     f"--config.data.eval_split='train[90%:]'.")


def _stats_root(root: str) -> Any:
    from etils import epath

    return epath.Path(root) / "gconv_stats"


def _stats_name(dataset: str, split: str, size: int, crop: str) -> str:
    """The cache file of a measured mean and std: what they depend on, in a file name."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{dataset}-{split}-{size}-{crop}") + ".json"


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class _FolderSource:
    """An ImageFolder split, `DIR/CLASS/*.{jpg,jpeg,png}` (local or `gs://`): record `i` is the `i`-th file in
    (class, file name) order, its encoded bytes (decoded by the augmentation, in the input workers, knowing the
    crop)."""

    def __init__(self, root: Any, classes: Sequence[str]):
        self.files, self.labels = [], []
        for label, name in enumerate(classes):
            if not (root / name).is_dir():
                continue  # a class without images in this split
            files = sorted((f for f in (root / name).iterdir() if f.suffix.lower() in IMAGE_SUFFIXES), key=str)
            self.files += files
            self.labels += [label] * len(files)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"image": self.files[i].read_bytes(), "label": np.int32(self.labels[i]), "file": str(self.files[i])}


def folder_classes(path: str, train_split: str = "train") -> list[str]:
    """The classes of an image folder: the sorted sub-folder names of its training split."""
    from etils import epath

    root = epath.Path(path) / train_split
    if not path or not root.is_dir():
        raise FileNotFoundError(f"data.path={path!r} has no {train_split}/ folder: an image folder is "
                                f"DIR/{train_split}/CLASS/*.jpg (and DIR/val/CLASS/*.jpg), as torchvision's "
                                f"ImageFolder reads it; pass --config.data.path=DIR.")
    return sorted(d.name for d in root.iterdir() if d.is_dir())


def _folder_dataset(data: Any) -> tuple[Sequence[dict], Sequence[dict], DatasetInfo]:
    """`data.name="folder"`: `data.path/{train_split, eval_split}/CLASS/*` (splits default to train and val)."""
    from etils import epath

    train_split, eval_split = data.get("train_split") or "train", data.get("eval_split") or "val"
    classes = folder_classes(data.get("path", ""), train_split)
    root = epath.Path(data.path)
    unknown = sorted(set(folder_classes(data.path, eval_split)) - set(classes)) if (root / eval_split).is_dir() \
        else None
    if unknown is None or unknown:
        raise ValueError(f"data.path={data.path!r}: the {eval_split}/ folder is "
                         f"{'missing' if unknown is None else f'holding classes not in {train_split}/: {unknown}'}; "
                         f"evaluation needs DIR/{eval_split}/CLASS/* with the training classes "
                         f"(or name another split: --config.data.eval_split=NAME).")
    train, evaluation = _FolderSource(root / train_split, classes), _FolderSource(root / eval_split, classes)
    for what, source in ((train_split, train), (eval_split, evaluation)):
        if not len(source):
            raise ValueError(f"data.path={data.path!r}: no {'/'.join(IMAGE_SUFFIXES)} images under {what}/CLASS/.")
    info = _described(data, train, evaluation, len(classes), data.image_size, (), (),
                      _stats_root(data.path) / _stats_name("folder", train_split, data.image_size,
                                                           data.get("crop", "auto")))
    return train, evaluation, dataclasses.replace(info, classes=tuple(classes))


def measured_mean_std(source: Sequence[dict], info: DatasetInfo, path: Any, sample: int = 2000
                      ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of pixels scaled to [0, 1], over up to `sample` training images evenly spaced in
    `source`, as evaluation preprocesses them (resized and center-cropped); read from `path` when measured before,
    else written there (a JSON beside the data) for every later run."""
    from gconv import storage

    if storage.exists(path):
        stats = storage.read_json(path)
        return tuple(stats["mean"]), tuple(stats["std"])
    view = _evaluation_view(info)
    index = np.unique(np.linspace(0, len(source) - 1, min(sample, len(source))).astype(int))
    sums = np.zeros((2, 3))
    for i in index:
        image = view(_opened(source[int(i)], info)).astype(np.float64) / 255.0
        image = image.reshape(-1, 3)
        sums += [image.mean(0), np.square(image).mean(0)]
    mean = sums[0] / len(index)
    std = np.sqrt(np.maximum(sums[1] / len(index) - np.square(mean), 0.0))
    stats = {"mean": [round(float(v), 6) for v in mean], "std": [round(float(v), 6) for v in std],
             "images": len(index), "split_size": len(source)}
    storage.write_json(path, stats)  # atomic: processes measuring at once write the same values
    return tuple(stats["mean"]), tuple(stats["std"])


# --- preprocessing (numpy, per example) -------------------------------------------------------------------------

def standardize(info: DatasetInfo) -> Callable[[dict], dict]:
    """What a batch goes through inside the jitted step, before the model: `uint8` pixels (`info.pixels`: images
    decoded from files, a quarter of float32's bytes on the way to the devices) standardised as `_standardize` does
    on the host, elementwise, compiled into the step's program; float batches pass as they are."""
    if info.pixels != "uint8":
        return lambda batch: batch
    return lambda batch: {**batch, "image": _standardize(batch["image"], info)}  # traced: the same operations


def standardized(step: Callable, info: DatasetInfo) -> Callable:
    """`step(state, batch, ...)` taking the batch as the input pipeline leaves it (see `standardize`)."""
    if info.pixels != "uint8":
        return step
    prepare = standardize(info)
    return functools.wraps(step)(lambda state, batch, *args, **kwargs: step(state, prepare(batch), *args, **kwargs))


def _standardize(image: Any, info: DatasetInfo) -> Any:
    """`(image / 255 - mean) / std` in float32 (`/ 1` for float images): numpy arrays on the host, traced arrays in
    a jitted step (`standardize`)."""
    scale = 255.0 if image.dtype == np.uint8 else 1.0
    image = image.astype(np.float32) / scale
    return (image - np.asarray(info.mean, np.float32)) / np.asarray(info.std, np.float32)


class _Jpeg(NamedTuple):
    """A JPEG's bytes and its size (from the header), not yet decoded."""
    data: bytes
    height: int
    width: int


def _opened(record: dict, info: DatasetInfo) -> Any:
    """A record's image: encoded bytes (a folder's file, a TFDS image read undecoded) with their size read from the
    header and pixels not yet decoded, so the crop is known before decoding (a JPEG as `_Jpeg`, other files as a
    lazily loaded PIL image), or decoded pixels `(H, W, C)` as they are (grey repeated to 3 channels where the
    dataset is colour)."""
    value = record["image"]
    if isinstance(value, (bytes, np.bytes_)):
        from PIL import Image, UnidentifiedImageError

        value = bytes(value)
        if value[:2] == b"\xff\xd8":
            import simplejpeg

            try:
                h, w, colorspace, _ = simplejpeg.decode_jpeg_header(value)
            except ValueError as e:
                raise ValueError(f"{record.get('file', 'a record')}: a broken JPEG ({e}); remove it, or convert it."
                                 ) from None
            if colorspace not in ("CMYK", "YCCK"):  # those PIL converts to RGB (libjpeg-turbo cannot)
                return _Jpeg(value, h, w)
        try:
            return Image.open(io.BytesIO(value))
        except UnidentifiedImageError:
            raise ValueError(f"{record.get('file', 'a record')}: not a JPEG or PNG image PIL can read (remove it, or "
                             f"convert it).") from None
    return _channels(np.asarray(value), info)


def _size(image: Any) -> tuple[int, int]:
    return image.shape[:2] if isinstance(image, np.ndarray) else (image.height, image.width)


def _decoded(image: Any, at_least: tuple[float, float] | None = None, bottom: int | None = None
             ) -> tuple[np.ndarray, float, float]:
    """`(RGB pixels (H, W, 3) uint8, sy, sx)`: an opened file decoded, a JPEG at 1/2, 1/4 or 1/8 of its size when
    it stays at least `at_least = (h, w)` (the DCT scaled in the decoder, libjpeg-turbo through simplejpeg: the
    pixels PIL's `draft` decodes) and, where only the rows above `bottom` are needed, down to just below it
    (`_rows_only`: fewer rows come back); `(sy, sx)` the scale it was decoded at. Pixels pass as they are."""
    if isinstance(image, np.ndarray):
        return image, 1.0, 1.0
    h, w = _size(image)
    if not isinstance(image, _Jpeg):
        return np.asarray(image if image.mode == "RGB" else image.convert("RGB")), 1.0, 1.0
    import simplejpeg

    need_h, need_w = (max(1, math.ceil(n)) for n in at_least or (h, w))
    k = next((k for k in (8, 4, 2) if h // need_h >= k and w // need_w >= k), 1)
    jpeg = image.data if bottom is None else _rows_only(image.data, bottom)
    rows = simplejpeg.decode_jpeg_header(jpeg)[0]  # all of them, or the fewer `_rows_only` declares
    pixels = simplejpeg.decode_jpeg(jpeg, "RGB", min_height=-(-rows // k), min_width=-(-w // k),
                                    strict=False)  # warnings (extraneous bytes, ...) pass, as in PIL
    return pixels, -(-h // k) / h, -(-w // k) / w  # libjpeg's scaled size: ceil(side / k)


def _segments(jpeg: bytes) -> Iterator[tuple[int, int]]:
    """`(marker, offset)` of a JPEG's marker segments up to its first scan (SOS) included."""
    i = 2
    while i + 4 <= len(jpeg) and jpeg[i] == 0xFF:
        marker = jpeg[i + 1]
        if marker == 0xFF:  # a fill byte
            i += 1
            continue
        yield marker, i
        if marker == 0xDA:
            return
        i += 2 + int.from_bytes(jpeg[i + 2:i + 4], "big")


def _rows_only(jpeg: bytes, rows: int) -> bytes:
    """The same JPEG declaring only its first `rows` rows, rounded up to whole MCU rows plus one (the context of
    the chroma upsampling), so that the decoder stops there: a single-scan sequential Huffman JPEG without restart
    markers (most photographs) decodes those rows to the pixels the whole file decodes to, and the entropy-coded
    data below is skipped (libjpeg warns of extraneous bytes). Any other file is returned as it is."""
    segments = dict(_segments(jpeg))  # marker -> offset (the first of each)
    sof, sos = segments.get(0xC0, segments.get(0xC1)), segments.get(0xDA)
    frames = [m for m in segments if 0xC0 <= m <= 0xCF and m not in (0xC4, 0xC8, 0xCC)]
    if sof is None or sos is None or len(frames) != 1 or 0xDD in segments or jpeg[sos + 4] != jpeg[sof + 9]:
        return jpeg  # progressive, lossless or arithmetic-coded, restart intervals, or a scan of some components
    mcu = 8 * max(jpeg[sof + 11 + 3 * c] & 0x0F for c in range(jpeg[sof + 9]))  # 8 x the largest vertical sampling
    rows = (-(-rows // mcu) + 1) * mcu
    height = int.from_bytes(jpeg[sof + 5:sof + 7], "big")
    return jpeg if rows >= height else jpeg[:sof + 5] + rows.to_bytes(2, "big") + jpeg[sof + 7:]


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


def crop_box(h: int, w: int, rng: np.random.Generator, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)
             ) -> tuple[int, int, int, int]:
    """`(top, left, height, width)` of an Inception-style crop of an `h x w` image: area fraction uniform in
    `scale`, aspect (width / height) log-uniform in `ratio`, position uniform; the first of 10 draws that fits,
    else the whole image (torchvision's `RandomResizedCrop` without its clamped fallback)."""
    for _ in range(10):
        area = h * w * rng.uniform(*scale)
        aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
        ch, cw = int(round(np.sqrt(area / aspect))), int(round(np.sqrt(area * aspect)))
        if 0 < ch <= h and 0 < cw <= w:
            return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
    return 0, 0, h, w


def _random_resized_crop(image: Any, rng: np.random.Generator, size: int) -> np.ndarray:
    """`crop_box`'s crop resized to `size` (bilinear), flipped with probability 1/2. A file is decoded knowing the
    crop: a JPEG at the smallest of 1, 1/2, 1/4, 1/8 of its size that keeps the crop at least `size` (the crop's
    box then resampled in place, at the scale it was decoded at)."""
    from PIL import Image

    h, w = _size(image)
    top, left, ch, cw = crop_box(h, w, rng)
    pixels, sy, sx = _decoded(image, (h * size / ch, w * size / cw), top + ch + ch // size + 2)  # + the filter's reach
    box = None if sy == sx == 1.0 else (left * sx, top * sy, (left + cw) * sx, (top + ch) * sy)
    if box is None:  # decoded whole: the crop's pixels resized
        pixels = pixels[top:top + ch, left:left + cw]
    image = Image.fromarray(np.ascontiguousarray(pixels, np.uint8)).resize((size, size), Image.BILINEAR, box=box)
    if rng.random() < 0.5:  # flipped by PIL (a copy whose rows are contiguous: batching copies them fast)
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(image)


def _center_crop(image: Any, size: int, resize_ratio: float = 256 / 224) -> np.ndarray:
    """Resize the shorter side to `size * resize_ratio`, then crop the center `size x size` (a JPEG decoded at a
    reduced size when that stays at least the resized one)."""
    h, w = _size(image)
    short = int(round(size * resize_ratio))
    nh, nw = (short, int(round(w * short / h))) if h <= w else (int(round(h * short / w)), short)
    image = _resize(_decoded(image, (nh, nw))[0], (nh, nw))
    top, left = (nh - size) // 2, (nw - size) // 2
    return image[top:top + size, left:left + size]


def _channels(image: np.ndarray, info: DatasetInfo) -> np.ndarray:
    """Grey images of a dataset read as colour (any TFDS dataset is: mean and std have 3 values) repeated to 3."""
    return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 and info.image_shape[-1] == 3 else image


def _evaluation_view(info: DatasetInfo) -> Callable[[Any], np.ndarray]:
    """Evaluation's geometry of an opened image: `random_resized` datasets resized to 256/224 of the size and
    center-cropped (always, as ImageNet's recipe does); `pad_flip` ones only when an image is not of the size
    already (then ratio 1)."""
    size = info.image_shape[0]
    if info.crop == "random_resized":
        return lambda image: _center_crop(image, size)
    return lambda image: (_decoded(image)[0] if _size(image) == (size, size)
                          else _center_crop(image, size, 1.0))


def _augmenter(info: DatasetInfo, train: bool, augment: bool) -> Callable[[dict, np.random.Generator], dict]:
    size, view = info.image_shape[0], _evaluation_view(info)

    def fn(record: dict, rng: np.random.Generator) -> dict:
        image = _opened(record, info)
        if train and augment and info.crop == "random_resized":
            image = _random_resized_crop(image, rng, size)
        elif train and augment:
            image = _pad_crop_flip(view(image), rng)
        else:
            image = view(image)
        image = np.asarray(image, np.uint8) if info.pixels == "uint8" else _standardize(image, info)
        return {"image": image, "label": np.int32(record["label"]), "mask": np.bool_(True)}

    return fn


def num_threads(num_workers: int) -> int:
    """`data.num_workers`: a count, or -1 for every core this process may use."""
    if num_workers == -1:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if num_workers < 1:
        raise ValueError(f"data.num_workers={num_workers} must be >= 1, or -1 for every core of the host.")
    return num_workers


def process_count(worker_processes: int) -> int:
    """`data.worker_processes`: grain worker processes, 0 for none (threads in this process only)."""
    if not isinstance(worker_processes, int) or isinstance(worker_processes, bool) or worker_processes < 0:
        raise ValueError(f"data.worker_processes={worker_processes!r} must be >= 0, a whole number (0: threads only; "
                         f"e.g. --config.data.worker_processes=4 on a host with many cores).")
    return worker_processes


def train_batches(source: Sequence[dict], info: DatasetInfo, batch_size: int, *, seed: int, start_step: int = 0,
                  augment: bool = True, num_workers: int = 2, prefetch: int = 4, shard_index: int = 0,
                  shard_count: int = 1, worker_processes: int = 0) -> Iterator[dict]:
    """Endless training batches from batch `start_step` on: reshuffled each epoch, augmented, prefetched, read by
    `num_workers` threads (-1: every core), in each of `worker_processes` grain worker processes when > 0 (batch
    `i` made by process `i mod worker_processes`: the same batches in the same order, for hosts with many cores,
    where threads contend for Python's lock).

    `batch_size` is global. Of each global batch, shard `shard_index` of `shard_count` (a process's share in a
    multi-process run) reads, decodes and augments only its rows `[shard_index * b, (shard_index + 1) * b)`,
    `b = batch_size / shard_count`: the shards together are the one-process batch, example for example and
    augmentation for augmentation.
    """
    if batch_size > len(source):
        raise ValueError(f"batch_size={batch_size} is larger than the {len(source)} training examples.")
    worker_processes = process_count(worker_processes)
    if batch_size % shard_count:
        raise ValueError(f"batch_size={batch_size} is not divisible by the {shard_count} input shards (processes): "
                         f"use a multiple of {shard_count}.")
    fn = _augmenter(info, train=True, augment=augment)
    rows = batch_size // shard_count
    ds = (grain.MapDataset.source(source).shuffle(seed=seed).repeat(None)
          .random_map(fn, seed=seed + 1).batch(rows, drop_remainder=True))  # records' randomness: by global index
    ds = ds[start_step * shard_count + shard_index::shard_count]
    options = grain.ReadOptions(num_threads=num_threads(num_workers), prefetch_buffer_size=prefetch)
    ds = ds.to_iter_dataset(options)
    if worker_processes:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags (their defaults: gconv parses none)
            flags.FLAGS.mark_as_parsed()
    return iter(ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_processes)) if worker_processes else ds)


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
