"""ResNeXt-50 on ImageNet-1K (ResNeXt paper Table 3): cardinality at preserved complexity, 1x64d ... 32x4d.

Recipe from the paper: SGD momentum 0.9, lr 0.1 per 256 images, weight decay 1e-4, 90 epochs, lr / 10 at epochs
30, 60, 80; random-resized crops and flips, 224 center crop for eval. Needs imagenet2012 prepared through TFDS.
    python launch.py --config experiments/imagenet_resnext50.py --config.data.data_dir=DIR
    python launch.py --config experiments/imagenet_resnext50.py:imagenette   # the 10-class subset
    python launch.py --config experiments/imagenet_resnext50.py:local        # seconds: tiny model, synthetic
"""
import ml_collections

from gconv.complexity import preserving_width
from gconv.config import base_config, cardinality_sweep, make_local

PAPER_ERRORS = {1: 23.9, 2: 23.0, 4: 22.6, 8: 22.3, 32: 22.2}  # Table 3, top-1 error (%), 224 single crop


VARIANTS = ("local", "imagenette")  # the :arg names this file takes


def get_config(arg=None):
    config = base_config()
    config.model = ml_collections.ConfigDict(dict(name="resnext50", cardinality=32, base_width=4, dtype="bfloat16"))
    config.data.name = "imagenette" if arg == "imagenette" else "imagenet2012"
    config.data.batch_size = 256
    config.data.image_size = 224
    config.optim.learning_rate = 0.1 * config.data.batch_size / 256  # lr 0.1 per 256 images
    config.optim.nesterov = False
    config.optim.weight_decay = 1e-4
    config.optim.schedule = "step"
    config.optim.decay_epochs = (30, 60, 80)
    config.num_epochs = 90.0
    config.log_every_steps = 100
    config.eval_every_steps = 5000
    config.checkpoint_every_steps = 1000
    if arg == "local":  # wiring check: tiny model, synthetic 32x32 data
        config.model.name, config.model.cardinality = "resnext11", 8
        make_local(config, image_size=32)
    return config


def get_sweep(arg=None):
    if arg == "local":
        return cardinality_sweep((1, 4), channels=64, base_width=16)
    return [{"name": f"{c}x{preserving_width(c)}d", "model.cardinality": c, "model.base_width": preserving_width(c),
             "paper_top1_error": (e if arg != "imagenette" else -1.0)} for c, e in PAPER_ERRORS.items()]
