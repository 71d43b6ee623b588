"""ResNeXt-29 on CIFAR-10 (ResNeXt paper section 5.3): cardinality at preserved complexity, plus 8x64d and 16x64d.

Recipe from the paper: SGD momentum 0.9, weight decay 5e-4, batch 128, lr 0.1, 300 epochs, lr / 10 at epochs 150
and 225; pad-4 random crops and flips. Needs CIFAR-10 prepared through TFDS (see `gconv.data`).
    python launch.py --config experiments/cifar10_resnext29.py --config.data.data_dir=DIR
    python launch.py --config experiments/cifar10_resnext29.py:cifar100   # CIFAR-100
    python launch.py --config experiments/cifar10_resnext29.py:local      # seconds: tiny model, synthetic data
"""
import ml_collections

from gconv.config import base_config, cardinality_sweep, make_local

CARDINALITIES = (1, 2, 4, 8, 16)
PAPER_ERRORS = {"cifar10": {"8x64d": 3.65, "16x64d": 3.58}, "cifar100": {"8x64d": 17.77, "16x64d": 17.31}}


VARIANTS = ("local", "cifar100")  # the :arg names this file takes


def get_config(arg=None):
    config = base_config()
    config.model = ml_collections.ConfigDict(dict(name="resnext29", cardinality=8, base_width=64, dtype="float32"))
    config.data.name = "cifar100" if arg == "cifar100" else "cifar10"
    config.data.batch_size = 128
    config.optim.learning_rate = 0.1
    config.optim.nesterov = False
    config.optim.weight_decay = 5e-4
    config.optim.schedule = "step"
    config.optim.decay_epochs = (150, 225)
    config.num_epochs = 300.0
    config.log_every_steps = 100
    config.eval_every_steps = 390 * 10  # every 10 epochs of 390 steps
    config.checkpoint_every_steps = 390 * 5
    if arg == "local":  # wiring check: the same recipe on a tiny model and synthetic CIFAR-shaped data
        config.model.name, config.model.base_width = "resnext11", 4
        make_local(config, image_size=32)
    return config


def get_sweep(arg=None):
    if arg == "local":
        return cardinality_sweep((1, 4), channels=64, base_width=16)
    dataset = "cifar100" if arg == "cifar100" else "cifar10"
    # Preserved complexity: the first stage's 256-d block at the C=1, d=64 block's weight count (paper Table 2).
    points = cardinality_sweep(CARDINALITIES)
    points += [{"name": k, "model.cardinality": int(k.split("x")[0]), "model.base_width": 64, "paper_top1_error": e}
               for k, e in PAPER_ERRORS[dataset].items()]
    return points
