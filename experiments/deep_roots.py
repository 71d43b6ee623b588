"""Deep Roots (Ioannou et al., CVPR 2017; Ioannou's thesis): Network-in-Network on CIFAR-10 with root, tree and
column filter groups on its spatial convs, at falling parameter and MAC counts.

Recipe of the thesis: BatchNorm, He init, no dropout, 4-px zero-padded random crops, mirroring, mean subtraction
(here: per-channel standardisation with CIFAR's mean and std). The solver settings are gconv's (SGD, momentum 0.9,
batch 128, lr 0.1 cosine, weight decay 1e-4, 100 epochs), where the thesis gives none. The report puts the
thesis' accuracy beside each point and draws the conv2c -> conv3a filter correlation of every point side by side.
    python launch.py --config experiments/deep_roots.py --config.data.data_dir=DIR   # CIFAR-10 through TFDS
    python launch.py --config experiments/deep_roots.py:digits   # offline stand-in: digits at 32x32, 4 points
    python launch.py --config experiments/deep_roots.py:local    # seconds: a narrow NiN on synthetic data
"""
import ml_collections

from gconv.config import base_config, make_local

# The thesis' CIFAR-10 test accuracy (%) of each network (rootdata/nincifar*.csv).
THESIS_ACCURACY = {
    "nin": 92.1125,
    "root2": 92.09, "root4": 92.02, "root8": 92.15, "root16": 91.67,
    "tree2": 91.85, "tree4": 91.47, "tree8": 91.71, "tree16": 91.68,
    "col2": 91.97, "col4": 92.00, "col8": 91.92, "col16": 91.20,
}
SCHEMES = {"root": "root", "tree": "tree", "col": "column"}

VARIANTS = ("local", "digits")  # the :arg names this file takes


def get_config(arg=None):
    config = base_config()
    config.model = ml_collections.ConfigDict(dict(name="nin_cifar", scheme="root", groups=1, width_multiplier=1.0,
                                                  dtype="float32"))
    config.data.name = "cifar10"
    config.data.batch_size = 128
    config.optim.learning_rate = 0.1
    config.optim.nesterov = False
    config.optim.weight_decay = 1e-4
    config.num_epochs = 100.0
    config.log_every_steps = 100
    config.eval_every_steps = 390 * 10  # every 10 epochs of 390 steps
    config.checkpoint_every_steps = 390 * 5
    if arg == "digits":  # offline: digits upsampled to 32x32 RGB; crops and mirrors would change the digit
        config.data.name, config.data.augment = "digits32", False
        config.data.batch_size = 64
        config.optim.learning_rate = 0.05
        config.num_epochs = 8.0
        config.log_every_steps = 11
        config.eval_every_steps = config.checkpoint_every_steps = 44  # every 2 epochs of 22 steps
    if arg == "local":  # wiring check: the same recipe on a narrow NiN and synthetic CIFAR-shaped data
        config.model.width_multiplier = 0.25
        make_local(config, image_size=32)
    return config


def _point(name):
    scheme, groups = ("root", 1) if name == "nin" else (SCHEMES[name.rstrip("0123456789")],
                                                        int(name.lstrip("roteecl")))
    return {"name": name, "model.scheme": scheme, "model.groups": groups}


def get_sweep(arg=None):
    if arg == "local":
        return [_point("nin"), _point("root4")]
    if arg == "digits":
        return [_point(name) for name in ("nin", "root2", "root4", "root8")]
    return [{**_point(name), "paper_top1_error": round(100.0 - accuracy, 4)}
            for name, accuracy in THESIS_ACCURACY.items()]
