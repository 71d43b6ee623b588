"""Input pipelines: digits split, deterministic resumable batches, eval padding, TFDS through mock data."""
import numpy as np
import pytest
import tensorflow_datasets as tfds
from ml_collections import ConfigDict

from gconv import data


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
        assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.float32
        assert abs(float(batch["image"].mean())) < 3.0  # normalized
        eval_source, _ = data.get_source(_cfg(name="cifar10"), "eval")
        assert sum(b["mask"].sum() for b in data.eval_batches(eval_source, info, 10)) == len(eval_source)


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
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        data.get_source(_cfg(name="mnist"), "train")
    source, info = data.get_source(_cfg(), "eval")
    with pytest.raises(ValueError, match="batch_size=1000 is larger than the 360"):
        data.train_batches(source, info, 1000, seed=0)
