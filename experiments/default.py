"""Default experiment: ResNeXt cardinality ablation at preserved complexity on scikit-learn's digits (offline).

A tiny ResNeXt (3 stages of 1 bottleneck, planes 16/32/64) on 8x8 digits; each point trades cardinality C for
bottleneck width d at constant block complexity, as in the ResNeXt paper's Table 2:
    python launch.py                                # the whole sweep (3 seeds a point), then the report
    python launch.py --point c4                     # one point
    python launch.py --config experiments/default.py:local   # seconds, for debugging
"""
import ml_collections

from gconv.config import base_config, cardinality_sweep

CARDINALITIES = (1, 2, 4, 8, 16)
BLOCK_CHANNELS = 64  # the first stage's block: 64 -> C*d -> 64, the analogue of the paper's 256-d block
BASE_WIDTH = 16  # d at C = 1 (planes of the first stage)


VARIANTS = ("local",)  # the :arg names this file takes


def get_config(arg=None):
    config = base_config()
    config.model = ml_collections.ConfigDict(dict(name="resnext11", cardinality=1, base_width=BASE_WIDTH,
                                                  dtype="float32"))
    config.data.name = "digits"
    config.data.augment = False  # 8x8 digits: crops and flips would change the class (6 vs 9)
    config.data.batch_size = 64
    config.optim.learning_rate = 0.1 * config.data.batch_size / 256  # linear scaling rule
    config.optim.warmup_epochs = 1.0
    config.num_epochs = 30.0
    config.eval_every_steps = 220  # every 10 epochs of 22 steps
    config.checkpoint_every_steps = 220
    config.seeds = 3  # a few test images separate the points: the report tells that from noise
    if arg == "local":
        config.num_epochs = 2.0
        config.log_every_steps = 10
        config.seeds = 1
    return config


def get_sweep(arg=None):
    return cardinality_sweep(CARDINALITIES, channels=BLOCK_CHANNELS, base_width=BASE_WIDTH)
