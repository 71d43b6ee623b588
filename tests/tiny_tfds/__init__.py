"""A TFDS dataset defined by the tests (`gconv_tiny_shapes`), prepared without a network by `launch.py prepare`.
TFDS wants a builder in a package (it looks for checksums beside it): importing this one registers it."""
import numpy as np
import tensorflow_datasets as tfds


class GconvTinyShapes(tfds.core.GeneratorBasedBuilder):
    """A TFDS builder made here (no download): 8x8 images of two classes, a train and a test split."""
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(8, 8, 3), dtype=np.uint8),  # Image() would need TensorFlow to encode
            "label": tfds.features.ClassLabel(names=["dark", "light"])}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(24, 0), "test": self._generate_examples(8, 1)}

    def _generate_examples(self, count, seed):
        rng = np.random.default_rng(seed)  # the dataset's content, fixed as a downloaded one is
        for i in range(count):
            label = i % 2
            yield i, {"image": rng.integers(128 * label, 128 * label + 128, (8, 8, 3), dtype=np.uint8), "label": label}


class GconvTinyPhotos(tfds.core.GeneratorBasedBuilder):
    """Encoded photos of varying sizes (JPEG and PNG, 20-60 px a side, two classes), stored as TFDS stores images:
    the file bytes, which gconv reads undecoded and decodes knowing the crop. The builder hands TFDS encoded files,
    so preparing it needs no TensorFlow."""
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "label": tfds.features.ClassLabel(names=["dark", "light"])}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(16, 0), "test": self._generate_examples(6, 1)}

    def _generate_examples(self, count, seed):
        import io

        from PIL import Image

        rng = np.random.default_rng(seed)
        for i in range(count):
            label = i % 2
            h, w = rng.integers(20, 61, size=2)
            pixels = rng.integers(128 * label, 128 * label + 128, (h, w, 3), dtype=np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="PNG" if i % 3 else "JPEG")
            buffer.seek(0)
            yield i, {"image": buffer, "label": label}
