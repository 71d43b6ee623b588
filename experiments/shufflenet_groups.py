"""ShuffleNet v1 groups ablation (ShuffleNet paper Tables 2 and 3): g = 1/2/3/4/8 at 1x, 0.5x and 0.25x, and
channel shuffle off for g = 3 and 8.

Recipe from the paper: SGD momentum 0.9, batch 1024, lr 0.5 decayed linearly to 0 over 300k iterations, weight
decay 4e-5; here as epochs of ImageNet (1.28M images: 300k x 1024 / 1.28M = 240 epochs). Needs imagenet2012
prepared through TFDS; `:imagenette` runs on the 10-class subset, `:local` in seconds on synthetic data.
"""
import ml_collections

from gconv.config import base_config, make_local

GROUPS = (1, 2, 3, 4, 8)
WIDTHS = {"w1": 1.0, "wd2": 0.5, "wd4": 0.25}
# Table 2 (with shuffle) and Table 3 (without), top-1 error (%).
PAPER = {"w1": {1: 33.6, 2: 32.7, 3: 32.6, 4: 32.8, 8: 32.4}, "wd2": {1: 45.1, 2: 44.4, 3: 43.2, 4: 41.6, 8: 42.3},
         "wd4": {1: 57.1, 2: 56.8, 3: 55.0, 4: 54.2, 8: 52.7}}
PAPER_NO_SHUFFLE = {"w1": {3: 34.5, 8: 37.6}, "wd2": {3: 45.7, 8: 48.1}, "wd4": {3: 56.3, 8: 56.5}}


VARIANTS = ("local", "imagenette")  # the :arg names this file takes


def get_config(arg=None):
    config = base_config()
    config.model = ml_collections.ConfigDict(dict(name="shufflenet_v1", groups=3, width_multiplier=1.0, shuffle=True,
                                                  dtype="bfloat16"))
    config.data.name = "imagenette" if arg == "imagenette" else "imagenet2012"
    config.data.batch_size = 1024
    config.data.image_size = 224
    config.optim.learning_rate = 0.5 * config.data.batch_size / 1024  # the paper's 0.5 at batch 1024
    config.optim.nesterov = False
    config.optim.weight_decay = 4e-5
    config.optim.schedule = "cosine"  # the paper decays linearly; cosine is the common stand-in
    config.num_epochs = 240.0
    config.log_every_steps = 100
    config.eval_every_steps = 5000
    config.checkpoint_every_steps = 1000
    if arg == "local":  # wiring check: synthetic 64x64 data, 4 steps
        make_local(config, image_size=64)
    return config


def get_sweep(arg=None):
    paper = arg != "imagenette"
    if arg == "local":
        return [{"name": "g3_wd4", "model.width_multiplier": 0.25},
                {"name": "g3_wd4_noshuffle", "model.width_multiplier": 0.25, "model.shuffle": False}]
    points = [{"name": f"g{g}_{w}", "model.groups": g, "model.width_multiplier": WIDTHS[w],
               "paper_top1_error": PAPER[w][g] if paper else -1.0} for w in WIDTHS for g in GROUPS]
    points += [{"name": f"g{g}_{w}_noshuffle", "model.groups": g, "model.width_multiplier": WIDTHS[w],
                "model.shuffle": False, "paper_top1_error": e if paper else -1.0}
               for w in WIDTHS for g, e in PAPER_NO_SHUFFLE[w].items()]
    return points
