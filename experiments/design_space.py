"""Design spaces (Radosavovic et al. 2020): does a free group width give better CIFAR-10 models than no groups?

Two RegNet design spaces that differ only in the group width: `free` draws it from {1, 2, 4, ..., 32}, `no_groups`
fixes it to the full bottleneck width (one group). From each, N models are sampled inside the same complexity regime
(0.12-0.13 GMACs, pycls's convention, at 32x32) and trained for a short schedule. The report compares the spaces by
the EDFs of their models' errors, with a bootstrap interval of the difference of their mean errors
(docs/design_spaces.md):
    python launch.py --config experiments/design_space.py --config.data.data_dir=DIR   # CIFAR-10 through TFDS
    python launch.py --config experiments/design_space.py:local   # minutes: digits, tiny models, few samples
The samples are drawn once from `SAMPLE_SEED`, so the sweep's points are the same at every launch.
"""
import ml_collections

from gconv import designspace
from gconv.config import base_config

SAMPLE_SEED = 0
SPACES = {
    "full": dict(models=32, regime=designspace.Regime(macs=(0.12e9, 0.13e9)), input_shape=(32, 32, 3),
                 free=(1, 2, 4, 8, 16, 32),
                 space=dict(depth=(6, 20), w0=(16, 128), wa=(16, 128), wm=(1.5, 3.0), stem_width=16)),
    "local": dict(models=4, regime=designspace.Regime(macs=(80e3, 200e3)), input_shape=(8, 8, 1), free=(1, 2, 4, 8),
                  space=dict(depth=(2, 6), w0=(8, 24), wa=(4, 16), wm=(1.5, 3.0), stem_width=8)),
}

VARIANTS = ("local",)


def get_config(arg=None):
    config = base_config()
    config.model = ml_collections.ConfigDict(dict(
        name="anynet", depths=(1,), widths=(8,), strides=(2,), bottleneck=(1.0,), group_widths=(8,), stem="cifar",
        stem_width=16, dtype="float32"))
    config.data.name = "cifar10"
    config.data.batch_size = 128
    config.optim.learning_rate = 0.1 * config.data.batch_size / 128
    config.optim.weight_decay = 5e-4
    config.optim.warmup_epochs = 1.0
    config.num_epochs = 10.0  # a short schedule per model, as pycls's design-space sweeps
    config.eval_every_steps = config.checkpoint_every_steps = 1000
    config.log_every_steps = 100
    if arg == "local":
        config.data.name = "digits"
        config.data.augment = False
        config.data.batch_size = 64
        config.optim.learning_rate = 0.05
        config.optim.warmup_epochs = 0.0
        config.num_epochs = 3.0
        config.eval_every_steps = config.checkpoint_every_steps = 66  # the end of the 3 epochs of 22 steps
        config.log_every_steps = 11
    return config


def get_sweep(arg=None):
    setting = SPACES["local" if arg == "local" else "full"]
    points = []
    spaces = {"free": setting["free"], "no_groups": (0,)}  # 0: the full bottleneck width, one group
    for i, (space_name, group_widths) in enumerate(spaces.items()):
        space = designspace.DesignSpace(space_name, group_widths=group_widths, **setting["space"])
        samples, _ = designspace.sample(space, setting["models"], setting["regime"], seed=SAMPLE_SEED + i,
                                        input_shape=setting["input_shape"])
        for j, s in enumerate(samples):
            points.append({"name": f"{space_name}_{j:02d}", "design_space": space_name,
                           **{f"model.{key}": value for key, value in s.fields.items()}})
    return points
