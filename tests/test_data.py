"""Input pipelines: digits split, deterministic resumable batches, eval padding, TFDS through mock data, any
TFDS dataset by name (its info, image sizes, split slices, a measured mean and std)."""
import io
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from ml_collections import ConfigDict

import tiny_tfds
from gconv import data
from tolerance import U32

TINY_TFDS = tiny_tfds.GconvTinyShapes.name  # "gconv_tiny_shapes": a TFDS builder of the tests


def _cfg(**kw):
    return ConfigDict(dict(dict(name="digits", data_dir="", image_size=32, num_classes=10), **kw))


def test_digits_fixed_split():
    train, info = data.get_source(_cfg(), "train")
    test, _ = data.get_source(_cfg(), "eval")
    assert (len(train), len(test), info.image_shape, info.num_classes) == (1437, 360, (8, 8, 1), 10)
    again, _ = data.get_source(_cfg(), "eval")
    np.testing.assert_array_equal(test.labels, again.labels)
    assert set(np.unique(test.labels)) == set(range(10))  # stratified


def test_train_batches_are_a_function_of_seed_and_step():
    source, info = data.get_source(_cfg(), "train")
    stream = data.train_batches(source, info, 64, seed=3)
    first = [next(stream) for _ in range(30)]  # crosses an epoch boundary (22 batches per epoch)
    resumed = data.train_batches(source, info, 64, seed=3, start_step=25)
    for i in range(25, 30):
        b = next(resumed)
        np.testing.assert_array_equal(b["image"], first[i]["image"])
        np.testing.assert_array_equal(b["label"], first[i]["label"])
    assert first[0]["image"].shape == (64, 8, 8, 1) and first[0]["label"].dtype == np.int32
    # epochs are reshuffled, and another seed gives another order
    assert not np.array_equal(first[0]["label"], first[22]["label"])
    other = next(data.train_batches(source, info, 64, seed=4))
    assert not np.array_equal(other["label"], first[0]["label"])


@pytest.mark.parametrize("processes", [2, 4])
def test_each_process_reads_its_rows_of_the_one_process_batch(processes, rng):
    source, info = data.get_source(_cfg(), "train")
    seed, start = int(rng.integers(100)), 20  # batches 20-24 cross an epoch boundary
    whole = data.train_batches(source, info, 64, seed=seed, start_step=start)
    parts = [data.train_batches(source, info, 64, seed=seed, start_step=start, shard_index=p,
                                shard_count=processes, num_workers=1) for p in range(processes)]
    for _ in range(5):
        want, got = next(whole), [next(part) for part in parts]
        assert got[0]["image"].shape == (64 // processes, 8, 8, 1)
        for key in ("image", "label"):  # the same examples, the same augmentation, in the same order
            np.testing.assert_array_equal(np.concatenate([g[key] for g in got]), want[key])
    with pytest.raises(ValueError, match="batch_size=64 is not divisible by the 3 input shards"):
        data.train_batches(source, info, 64, seed=0, shard_count=3)
    with pytest.raises(ValueError, match="data.num_workers=0 must be >= 1, or -1"):
        data.train_batches(source, info, 64, seed=0, num_workers=0)


def test_eval_batches_cover_every_example_once_with_padding_masked():
    source, info = data.get_source(_cfg(), "eval")
    batches = list(data.eval_batches(source, info, 100))
    assert [b["image"].shape[0] for b in batches] == [100] * 4
    masks = np.concatenate([b["mask"] for b in batches])
    assert masks.sum() == 360 and not masks[360:].any()
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches])[:360], source.labels)


def test_tfds_path_with_mock_data():
    with tfds.testing.mock_data(num_examples=24):
        source, info = data.get_source(_cfg(name="cifar10"), "train")
        assert info.image_shape == (32, 32, 3) and info.num_classes == 10
        batch = next(data.train_batches(source, info, 8, seed=0, augment=True))
        assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.uint8  # pixels travel
        placed = jax.jit(data.standardize(info))(batch)["image"]  # and are standardised on the device, as the host did
        host = (batch["image"].astype(np.float32) / 255.0 - np.float32(info.mean)) / np.float32(info.std)
        # the same three float32 operations; should XLA divide by 255 as a product with 1/255, that and the
        # subtraction each move the value by u (both below 1 in size), divided by std, and the last division by u of
        # the result: |error| <= 2 u / min(std) + 2 u |result|
        np.testing.assert_allclose(placed, host, rtol=2 * U32, atol=2 * U32 / min(info.std))
        eval_source, _ = data.get_source(_cfg(name="cifar10"), "eval")
        assert sum(b["mask"].sum() for b in data.eval_batches(eval_source, info, 10)) == len(eval_source)


def test_the_step_on_uint8_pixels_is_the_step_on_host_standardised_images(rng):
    """`standardized(train_step)` fed uint8 pixels against `train_step` fed the host's float32 standardisation of the
    same pixels: the inputs differ by at most d = 2u / min(std) + 2u max|x| per element (see above), so the loss by
    at most sum |dloss/dx| d to first order (the gradient taken on the host's images); twice that, plus 4u of the
    loss for the summation order XLA may change when fusing the standardisation, is the bound."""
    import flax.linen as nn
    import optax

    from gconv.config import base_config
    from gconv.optim import create_optimizer
    from gconv.train import create_train_state, train_step

    class Tiny(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            x = nn.relu(nn.Conv(8, (3, 3))(x))
            return nn.Dense(5)(x.mean((1, 2)))

    info = data.DatasetInfo("photos", (12, 12, 3), 5, 8, 0, (0.4, 0.5, 0.6), (0.2, 0.25, 0.3), pixels="uint8")
    pixels = rng.integers(0, 256, (8, 12, 12, 3), dtype=np.uint8)
    labels = rng.integers(0, 5, 8).astype(np.int32)
    host = data._standardize(pixels, info)
    model, (tx, _) = Tiny(), create_optimizer(base_config().optim, 1, 1)
    state = create_train_state(model, tx, info.image_shape, int(rng.integers(1000)))
    step = lambda s, b: train_step(s, b, model=model, tx=tx)  # noqa: E731
    _, on_device = jax.jit(data.standardized(step, info))(state, {"image": pixels, "label": labels})
    _, on_host = jax.jit(step)(state, {"image": host, "label": labels})

    def loss(images):
        logits = model.apply({"params": state.params}, images)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))

    d = 2 * U32 / min(info.std) + 2 * U32 * np.abs(host).max()
    bound = 2 * float(jnp.sum(jnp.abs(jax.grad(loss)(host)))) * d + 4 * U32 * float(on_host["loss"])
    assert abs(float(on_device["loss"]) - float(on_host["loss"])) <= bound


def test_imagenet_style_crops_with_mock_data():
    with tfds.testing.mock_data(num_examples=4):
        source, info = data.get_source(_cfg(name="imagenette"), "train")
        batch = next(data.train_batches(source, info, 2, seed=0))
        assert batch["image"].shape == (2, 224, 224, 3)
        eval_batch = next(data.eval_batches(source, info, 2))
        assert eval_batch["image"].shape == (2, 224, 224, 3)


def test_missing_dataset_says_how_to_prepare(tmp_path):
    with pytest.raises(FileNotFoundError, match="(?s)not prepared.*download_and_prepare.*--config.data.data_dir=DIR"):
        data.get_source(_cfg(name="cifar10", data_dir=str(tmp_path)), "train")


def test_unknown_dataset_and_oversized_batch():
    with pytest.raises(ValueError, match="data.name='no_such_dataset' is not known: neither one of"):
        data.get_source(_cfg(name="no_such_dataset"), "train")
    source, info = data.get_source(_cfg(), "eval")
    with pytest.raises(ValueError, match="batch_size=1000 is larger than the 360"):
        data.train_batches(source, info, 1000, seed=0)


def test_worker_processes_make_the_same_batches_as_threads(rng):
    """`data.worker_processes`: grain's worker processes (batch i made by process i mod 2) give the batches the
    threads give, in order, from any step on."""
    from PIL import Image

    records = []
    for i in range(24):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(buffer, format="JPEG")
        records.append({"image": buffer.getvalue(), "label": i % 3})
    info = data.DatasetInfo("photos", (32, 32, 3), 3, 24, 0, (0.5,) * 3, (0.25,) * 3, "random_resized", pixels="uint8")
    seed, start = int(rng.integers(1000)), int(rng.integers(5))
    threads = data.train_batches(records, info, 8, seed=seed, start_step=start, num_workers=1)
    processes = data.train_batches(records, info, 8, seed=seed, start_step=start, num_workers=1, worker_processes=2)
    try:
        for _ in range(6):
            a, b = next(threads), next(processes)
            assert all(np.array_equal(a[k], b[k]) for k in a)
    finally:
        processes.close()
    with pytest.raises(ValueError, match="data.worker_processes=-1 must be >= 0"):
        data.train_batches(records, info, 8, seed=0, worker_processes=-1)


# --- the random-resized crop ------------------------------------------------------------------------------------

def test_crop_boxes_follow_the_inception_definition(rng):
    """`crop_box` on a square image against the definition's exact laws. A draw (area fraction s ~ U(0.08, 1), log
    aspect t ~ U(log 3/4, log 4/3)) fits iff s e^|t| <= 1, and the first that fits is kept, so the kept draws are
    uniform on the fitting region: s has density prop. to P(fit | s) = min(1, -log(s) / log(4/3)) (|t| <= -log s),
    t has density prop. to P(fit | t) = (e^-|t| - 0.08) / 0.92. One-sample Kolmogorov-Smirnov tests on 20,000 boxes
    with alpha = 1e-6 each (critical distance 0.019). The sides are rounded to pixels: 1/2 px of at least 245
    (the smallest crop, 8 % of 1000^2 at aspect 3/4) moves a log aspect by <= 0.5/245 + 0.5/327 < 0.004 and an
    area fraction by < 0.004 x 0.08, far below the distance the tests resolve."""
    from scipy import stats

    side, n = 1000, 20_000
    boxes = np.array([data.crop_box(side, side, rng) for _ in range(n)])
    area, aspect = boxes[:, 2] * boxes[:, 3] / side ** 2, np.log(boxes[:, 3] / boxes[:, 2])
    lo, hi = np.log(3 / 4), np.log(4 / 3)
    grid_s = np.linspace(0.08, 1.0, 20_001)
    density_s = np.minimum(1.0, -np.log(grid_s) / hi)
    grid_t = np.linspace(lo, hi, 20_001)
    density_t = (np.exp(-np.abs(grid_t)) - 0.08) / 0.92
    for sample, grid, density in ((area, grid_s, density_s), (aspect, grid_t, density_t)):
        cdf = np.concatenate([[0.0], np.cumsum((density[1:] + density[:-1]) / 2 * np.diff(grid))])
        cdf /= cdf[-1]
        assert stats.kstest(sample, lambda x: np.interp(x, grid, cdf)).pvalue > 1e-6
    assert 0.08 - 4e-4 <= area.min() < 0.09 and area.max() <= 1.0  # the bounds, less rounding
    assert lo - 4e-3 <= aspect.min() < lo + 0.01 and hi - 0.01 < aspect.max() <= hi + 4e-3
    top_room, left_room = side - boxes[:, 0] - boxes[:, 2], side - boxes[:, 1] - boxes[:, 3]
    assert (boxes[:, :2] >= 0).all() and (top_room >= 0).all() and (left_room >= 0).all()


def test_a_file_is_cropped_where_its_box_says_and_flipped_half_the_time(rng):
    """The file path (a JPEG decoded at 1/2, 1/4 or 1/8 of its size where the crop allows it, the box resampled in
    place) against `crop_box`: a 480x640 JPEG whose red rises with x and green with y shows where each 32x32 output
    came from. An output corner pixel is a non-negative weighting of the pixels around its centre, half an output
    pixel (c / 32 / 2 source pixels, c the box's side) inside the box; on a linear ramp that reads the centre, off by
    the JPEG's error e (measured on this image's full decode), the output's rounding (1/2) and, where the filter's
    window of radius c / 32 is cut by the image's edge, at most half that radius. Red and green move 255/639 and
    255/479 per source pixel, so a side is named within (e + 1/2) x 639/255 (or 479/255) + c / 64 + 1 source pixels
    (+1: the filter's half-pixel conventions). 200 draws: the flips, Binomial(200, 1/2), within 5 sigma (+-35)."""
    import io

    from PIL import Image

    h, w, size = 480, 640, 32
    y, x = np.mgrid[0:h, 0:w]
    pixels = np.stack([x * 255 / (w - 1), y * 255 / (h - 1), np.full((h, w), 128.0)], -1).round().astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"), float)
    e = np.abs(decoded - pixels).max(axis=(0, 1))[:2]  # the JPEG's error on red and green, in levels
    info = data.DatasetInfo("photos", (size, size, 3), 2, 1, 1, (0.5,) * 3, (0.25,) * 3, "random_resized",
                            pixels="uint8")
    augment, flips, reduced = data._augmenter(info, train=True, augment=True), 0, 0
    for _ in range(200):
        seed = int(rng.integers(2 ** 31))
        image = augment({"image": buffer.getvalue(), "label": 0}, np.random.default_rng(seed))["image"].astype(float)
        top, left, ch, cw = data.crop_box(h, w, np.random.default_rng(seed))
        reduced += min(ch, cw) >= 2 * size
        flipped = image[size // 2, 0, 0] > image[size // 2, -1, 0]
        flips += flipped
        red = image[size // 2, :, 0][::-1] if flipped else image[size // 2, :, 0]
        seen_x = (red[0] * (w - 1) / 255 - (cw / size - 1) / 2, red[-1] * (w - 1) / 255 + (cw / size - 1) / 2 + 1)
        seen_y = (image[0, size // 2, 1] * (h - 1) / 255 - (ch / size - 1) / 2,
                  image[-1, size // 2, 1] * (h - 1) / 255 + (ch / size - 1) / 2 + 1)
        bound_x = (e[0] + 0.5) * (w - 1) / 255 + cw / size / 2 + 1
        bound_y = (e[1] + 0.5) * (h - 1) / 255 + ch / size / 2 + 1
        np.testing.assert_allclose(seen_x, (left, left + cw), atol=bound_x, err_msg=f"box {top, left, ch, cw}")
        np.testing.assert_allclose(seen_y, (top, top + ch), atol=bound_y, err_msg=f"box {top, left, ch, cw}")
    assert abs(flips - 100) <= 35, flips
    assert reduced > 100, reduced  # most crops were decoded at a reduced size


def _jpeg(pixels: np.ndarray, **options) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90, **options)
    return buffer.getvalue()


def test_a_jpeg_decoded_knowing_the_crop_is_the_crop_of_its_whole_decode(rng):
    """Decoding down to just below the crop (a baseline JPEG declaring fewer rows), at 1/2-1/8 of its size where the
    crop allows it, changes no pixel the crop reads: against PIL's whole decode (and its `draft` at the scale),
    crops and flips of every chroma subsampling and grey; files the row limit cannot apply to (progressive, restart
    intervals) are decoded whole; CMYK goes through PIL; a broken file names itself."""
    import simplejpeg
    from PIL import Image

    h, w = int(rng.integers(200, 420)), int(rng.integers(200, 420))
    photo = np.kron(rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8), np.ones((8, 8, 1), np.uint8))
    photo = np.clip(photo[:h, :w] + rng.integers(-30, 31, (h, w, 3)), 0, 255).astype(np.uint8)
    files = {f"subsampling {s}": _jpeg(photo, subsampling=s) for s in (0, 1, 2)}
    files["grey"] = _jpeg(photo[..., 0])
    whole = {"progressive": _jpeg(photo, progressive=True), "restart intervals": _jpeg(photo, restart_marker_rows=1)}
    for name, jpeg in {**files, **whole}.items():
        assert (data._rows_only(jpeg, 40) is jpeg) == (name in whole), name
        full = simplejpeg.decode_jpeg(jpeg)
        for rows in [*range(8, h, 8), *rng.integers(1, h, 20)]:  # MCU edges (8, 16 rows) and any row
            top = simplejpeg.decode_jpeg(data._rows_only(jpeg, int(rows)), strict=False)
            np.testing.assert_array_equal(top[:rows], full[:rows], err_msg=f"{name}: the first {rows} rows")
        opened = data._opened({"image": jpeg}, None)
        decoded = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
        for size in (24, 48, 96):
            seed = int(rng.integers(2 ** 31))
            top, left, ch, cw = data.crop_box(h, w, np.random.default_rng(seed))
            bottom = top + ch + ch // size + 2
            pixels, sy, sx = data._decoded(opened, (h * size / ch, w * size / cw), bottom)
            draft = Image.open(io.BytesIO(jpeg))
            draft.draft("RGB", (math.ceil(w * size / cw), math.ceil(h * size / ch)))
            reference = np.asarray(draft.convert("RGB"))
            assert (sy, sx) == (reference.shape[0] / h, reference.shape[1] / w), (name, size)
            rows = min(len(reference), math.ceil(bottom * sy))
            assert len(pixels) >= rows, (name, size)
            np.testing.assert_array_equal(pixels[:rows], reference[:rows], err_msg=f"{name}, size {size}, seed {seed}")
            if sy == 1.0:  # decoded whole: the output is the decoded array's, pixel for pixel
                np.testing.assert_array_equal(
                    data._random_resized_crop(opened, np.random.default_rng(seed), size),
                    data._random_resized_crop(decoded, np.random.default_rng(seed), size), err_msg=f"{name}, {seed}")
    cmyk = io.BytesIO()
    Image.fromarray(np.concatenate([photo, photo[..., :1]], -1), "CMYK").save(cmyk, format="JPEG")
    assert isinstance(data._opened({"image": cmyk.getvalue()}, None), Image.Image)
    with pytest.raises(ValueError, match="bad.jpg: a broken JPEG"):
        data._opened({"image": b"\xff\xd8 truncated", "file": "bad.jpg"}, None)


# --- any TFDS dataset by name ------------------------------------------------------------------------------------

def test_a_tfds_dataset_outside_the_table_takes_its_info_from_the_builder(tmp_path):
    """SVHN (32x32, 10 classes, a test split): classes from the builder, the crop by size (pad_flip below 128),
    the mean and std measured on the training split, written beside the data and read back by the next run."""
    with tfds.testing.mock_data(num_examples=40):
        config = _cfg(name="svhn_cropped", data_dir=str(tmp_path))
        source, info = data.get_source(config, "train")
        assert (info.num_classes, info.image_shape, info.crop) == (10, (32, 32, 3), "pad_flip")
        assert (info.num_train, len(source)) == (40, 40)
        pixels = np.stack([np.asarray(source[i]["image"]) for i in range(40)]).reshape(-1, 3) / 255.0
        # the same sums in float64 in another order: far below the 1e-6 the cache rounds to
        np.testing.assert_allclose(info.mean, pixels.mean(0), atol=2e-6)
        np.testing.assert_allclose(info.std, pixels.std(0), atol=2e-6)
        [cached] = (tmp_path / "gconv_stats").iterdir()
        cached.write_text(json.dumps({"mean": [0.25, 0.5, 0.75], "std": [0.1, 0.2, 0.3]}))
        _, again = data.get_source(config, "eval")  # a later run reads what was measured
        assert again.mean == (0.25, 0.5, 0.75) and again.std == (0.1, 0.2, 0.3)
        _, given = data.get_source(_cfg(name="svhn_cropped", data_dir=str(tmp_path), mean=(0.4, 0.4, 0.4),
                                        std=(0.2, 0.2, 0.2)), "train")
        assert given.mean == (0.4,) * 3 and given.std == (0.2,) * 3
        batch = next(data.train_batches(source, info, 8, seed=0))
        assert batch["image"].shape == (8, 32, 32, 3) and batch["label"].max() < 10


@pytest.mark.parametrize("size, crop", [(48, "pad_flip"), (160, "random_resized")])
def test_images_of_any_size_are_cropped_to_the_configured_one(tmp_path, size, crop):
    """Oxford Flowers 102 (images of varying sizes): `data.image_size` with the crop its size implies."""
    with tfds.testing.mock_data(num_examples=12):
        config = _cfg(name="oxford_flowers102", data_dir=str(tmp_path), image_size=size)
        source, info = data.get_source(config, "train")
        shapes = {np.asarray(source[i]["image"]).shape for i in range(len(source))}
        assert len(shapes) > 1, shapes  # the mock images vary in size, as the real ones do
        assert (info.num_classes, info.image_shape, info.crop) == (102, (size, size, 3), crop)
        eval_source, _ = data.get_source(config, "eval")
        for batch in (next(data.train_batches(source, info, 4, seed=0)), next(data.eval_batches(eval_source, info,
                                                                                               4))):
            assert batch["image"].shape == (4, size, size, 3) and np.isfinite(batch["image"]).all()


# --- image folders -----------------------------------------------------------------------------------------------

def make_image_folder(root, rng, counts=None, classes=("cat", "dog", "eel")):
    """ImageFolder layout with uneven class counts, PNG and JPEG files of several sizes: `root/{train,val}/CLASS/`."""
    from PIL import Image

    counts = counts or {"train": (5, 3, 4), "val": (2, 1, 2)}
    for split, per_class in counts.items():
        for name, count in zip(classes, per_class):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                h, w = rng.integers(12, 40, size=2)
                pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.{'png' if i % 2 else 'jpg'}")
    return root


def test_an_image_folder_reads_its_classes_images_and_statistics(tmp_path, rng):
    from PIL import Image

    folder = make_image_folder(tmp_path / "pets", rng)
    (folder / "train" / "dog" / "notes.txt").write_text("not an image")
    config = _cfg(name="folder", path=str(folder), image_size=16)
    source, info = data.get_source(config, "train")
    assert info.classes == ("cat", "dog", "eel") and info.num_classes == 3
    assert (info.num_train, info.num_eval, info.crop) == (12, 5, "pad_flip")
    assert [int(source[i]["label"]) for i in range(12)] == [0] * 5 + [1] * 3 + [2] * 4
    assert source[0]["image"] == (folder / "train" / "cat" / "0.jpg").read_bytes()  # decoded by the augmentation
    png = np.asarray(Image.open(folder / "train" / "cat" / "1.png").convert("RGB"))  # (a PNG: no reduced decode)
    np.testing.assert_array_equal(data._augmenter(info, train=False, augment=False)(source[1], None)["image"],
                                  data._center_crop(png, 16, 1.0))  # evaluation's view of PIL's decoding
    assert (folder / "gconv_stats").is_dir()  # the measured mean and std, beside the images
    for batch in (next(data.train_batches(source, info, 4, seed=0)),
                  next(data.eval_batches(data.get_source(config, "eval")[0], info, 4))):
        assert batch["image"].shape == (4, 16, 16, 3) and np.isfinite(batch["image"]).all()
    (folder / "val" / "fox").mkdir()
    with pytest.raises(ValueError, match=r"holding classes not in train/: \['fox'\]"):
        data.get_source(config, "train")
    with pytest.raises(FileNotFoundError, match="has no train/ folder"):
        data.get_source(_cfg(name="folder", path=str(tmp_path / "nowhere")), "train")


# --- launch.py prepare -------------------------------------------------------------------------------------------

def test_prepare_makes_a_tfds_dataset_readable_once(cli, tmp_path, capsys):
    args = ["prepare", "--config", "experiments/default.py:local", f"--config.data.name={TINY_TFDS}",
            f"--config.data.data_dir={tmp_path}"]
    with pytest.raises(FileNotFoundError, match="not prepared in array_record format.*launch.py prepare"):
        data.get_source(_cfg(name=TINY_TFDS, data_dir=str(tmp_path)), "train")
    assert cli(*args) == 0
    assert "gconv_tiny_shapes: prepared in" in capsys.readouterr().out
    source, info = data.get_source(_cfg(name=TINY_TFDS, data_dir=str(tmp_path), image_size=8), "train")
    assert (len(source), info.num_eval, info.num_classes) == (24, 8, 2)
    assert sorted(int(source[i]["label"]) for i in range(24)) == [0] * 12 + [1] * 12
    assert cli(*args) == 0  # a second time: nothing to do
    assert "prepared already" in capsys.readouterr().out


@pytest.mark.slow
def test_an_image_folder_trains_stops_and_resumes_exactly_through_launch(tmp_path, seed):
    """A generated folder of PNG and JPEG images (uneven classes) trained by launch.py; a SIGTERM after the first
    metrics, then the relaunch: the metrics of the uninterrupted run."""
    import signal

    from conftest import TINY, has_content, launch, start, strip_timing, wait_until
    from gconv.metrics_log import read_metrics

    folder = make_image_folder(tmp_path / "pets", np.random.default_rng(seed),
                               counts={"train": (40, 24, 32), "val": (6, 4, 5)})
    args = [*TINY, "--config.data.name=folder", f"--config.data.path={folder}", "--config.data.image_size=16",
            "--config.num_steps=40", "--config.checkpoint_every_steps=5", "--config.log_every_steps=3",
            "--config.eval_every_steps=20"]
    launch(*args, "--workdir", str(tmp_path / "straight"))
    proc = start(*args, "--workdir", str(tmp_path / "stopped"))
    wait_until(lambda: has_content(tmp_path / "stopped" / "c2" / "metrics.jsonl"), proc, "the first metrics")
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out
    launch(*args, "--workdir", str(tmp_path / "stopped"))
    records = lambda d: strip_timing(read_metrics(d / "c2" / "metrics.jsonl"))  # noqa: E731
    assert records(tmp_path / "stopped") == records(tmp_path / "straight")
    assert any("eval_top1_error" in r for r in records(tmp_path / "straight"))
    out = launch("eval", str(tmp_path / "straight" / "c2")).stdout
    assert "on the eval split (15 images)" in out and "top-1 error by class: cat " in out, out
    assert all(f"{name} " in out.split("by class")[1] for name in ("dog", "eel")), out
    assert json.loads((tmp_path / "straight" / "c2" / "classes.json").read_text()) == ["cat", "dog", "eel"]
    summary = json.loads((tmp_path / "straight" / "c2" / "summary.json").read_text())
    assert list(summary["final_top1_error_by_class"]) == ["cat", "dog", "eel"]
    assert sum("eval_top1_error_by_class" in r for r in read_metrics(tmp_path / "straight" / "c2" / "metrics.jsonl")
               ) == 1  # of the two evaluations, the final one's record only
    assert "| cat |" in (tmp_path / "straight" / "report.md").read_text()  # the report names them
    for split in ("train", "val"):  # a class added to the folder: the run's classes no longer hold
        (folder / split / "ant").mkdir()
        (folder / split / "cat" / "0.jpg").rename(folder / split / "ant" / "0.jpg")
    out = launch(*args, "--workdir", str(tmp_path / "straight"), check=False)
    assert out.returncode != 0 and "the data's classes changed since this run began" in out.stdout + out.stderr, out


def test_a_prepared_tfds_dataset_of_encoded_photos_is_decoded_knowing_the_crop(tmp_path):
    """TFDS stores images as their files' bytes: gconv reads them undecoded (array_record, prepared here without
    TensorFlow) and decodes each in the augmentation, at the size the crop needs: PNGs exactly as PIL decodes
    them, every batch of the configured size."""
    from PIL import Image

    assert "prepared in" in data.prepare(_cfg(name=tiny_tfds.GconvTinyPhotos.name, data_dir=str(tmp_path)))
    for size, crop in ((24, "pad_flip"), (32, "random_resized")):
        config = _cfg(name=tiny_tfds.GconvTinyPhotos.name, data_dir=str(tmp_path), image_size=size, crop=crop)
        source, info = data.get_source(config, "train")
        assert (info.num_train, info.num_eval, info.classes, info.pixels) == (16, 6, ("dark", "light"), "uint8")
        records = [source[i] for i in range(len(source))]
        assert all(isinstance(r["image"], bytes) for r in records)
        record = next(r for r in records if r["image"].startswith(b"\x89PNG"))  # (every third is a JPEG)
        decoded = np.asarray(Image.open(io.BytesIO(record["image"])).convert("RGB"))
        view = data._augmenter(info, train=False, augment=False)(record, None)["image"]
        np.testing.assert_array_equal(view, data._evaluation_view(info)(decoded))
        for batch in (next(data.train_batches(source, info, 8, seed=0)),
                      next(data.eval_batches(data.get_source(config, "eval")[0], info, 4))):
            assert batch["image"].shape[1:] == (size, size, 3) and batch["image"].dtype == np.uint8
        assert {int(label) for label in next(data.train_batches(source, info, 16, seed=1))["label"]} == {0, 1}


def test_splits_take_tfds_slices(tmp_path):
    """A validation split carved from train, as pycls's and ResNeXt's CIFAR protocols do when tuning."""
    data.prepare(_cfg(name=TINY_TFDS, data_dir=str(tmp_path)))
    config = _cfg(name=TINY_TFDS, data_dir=str(tmp_path), image_size=8, train_split="train[:75%]",
                  eval_split="train[75%:]")
    train, info = data.get_source(config, "train")
    held_out, _ = data.get_source(config, "eval")
    assert (len(train), len(held_out), info.num_train, info.num_eval) == (18, 6, 18, 6)
    whole, default = data.get_source(_cfg(name=TINY_TFDS, data_dir=str(tmp_path), image_size=8), "eval")
    assert default.num_eval == len(whole) == 8 and default.classes == ("dark", "light")  # test, the default split
    whole, _ = data.get_source(_cfg(name=TINY_TFDS, data_dir=str(tmp_path), image_size=8), "train")
    for i in range(6):  # the slices are the split's rows in order
        np.testing.assert_array_equal(held_out[i]["image"], whole[18 + i]["image"])
    with pytest.raises(ValueError, match="data.crop='center'"):
        data.get_source(_cfg(name=TINY_TFDS, data_dir=str(tmp_path), crop="center"), "train")


@pytest.mark.slow
def test_an_image_folder_in_a_bucket_trains(tmp_path, rng):
    """The same layout at `gs://` (the GCS emulator): listed, decoded and measured there, trained by launch.py."""
    import urllib.parse
    import urllib.request

    from conftest import TINY, launch
    from gcs_emulator import BUCKET, Emulator, list_objects

    folder = make_image_folder(tmp_path / "pets", rng, counts={"train": (30, 20, 24), "val": (3, 2, 3)})
    emulator = Emulator(tmp_path)
    try:
        for file in sorted(p for p in folder.rglob("*") if p.is_file()):
            name = urllib.parse.quote(f"pets/{file.relative_to(folder)}", safe="")
            request = urllib.request.Request(f"{emulator.url}/upload/storage/v1/b/{BUCKET}/o?uploadType=media&"
                                             f"name={name}", data=file.read_bytes(), method="POST")
            urllib.request.urlopen(request).close()
        out = launch(*TINY, "--config.data.name=folder", f"--config.data.path=gs://{BUCKET}/pets",
                     "--config.data.image_size=16", "--config.num_steps=4", "--workdir", str(tmp_path / "run"),
                     env=emulator.env).stdout
        assert "c2" in out and (tmp_path / "run" / "c2" / "summary.json").exists(), out
        assert [n for n in list_objects(emulator.env, "pets/gconv_stats/") if n.endswith(".json")], "no statistics"
    finally:
        emulator.close()


@pytest.mark.slow
def test_prepare_in_two_processes_prepares_once(tmp_path):
    """Process 0 prepares into the shared data_dir, process 1 waits for it; then both can read the dataset."""
    from conftest import two_processes

    first, second = two_processes(tmp_path / "w", "prepare", "--config", "tests/tiny_tfds/experiment.py",
                                  f"--config.data.data_dir={tmp_path / 'tfds'}")
    outs = [proc.communicate(timeout=240)[0] for proc in (first, second)]
    assert first.returncode == second.returncode == 0, outs
    assert "gconv_tiny_shapes: prepared in" in outs[0] and "process 1: process 0 prepared the data" in outs[1], outs
    assert "prepared in" not in outs[1]  # only process 0 wrote
    source, info = data.get_source(_cfg(name=TINY_TFDS, data_dir=str(tmp_path / "tfds"), image_size=8), "train")
    assert (len(source), info.num_classes) == (24, 2)
