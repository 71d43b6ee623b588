"""An experiment reading the tests' TFDS dataset (`gconv_tiny_shapes`), for `launch.py prepare` in a subprocess:
importing the builder's package registers it there."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tiny_tfds  # noqa: E402

from gconv.config import base_config, make_local  # noqa: E402

VARIANTS = ()


def get_config(arg=None):
    config = make_local(base_config(), image_size=8)
    config.data.name = tiny_tfds.GconvTinyShapes.name
    return config
