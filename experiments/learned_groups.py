"""Learned groups against fixed ones in one body (CondenseNet, Huang et al. 2018): CondenseNet-86 on CIFAR-10.

  dense     no groups: dense 1x1 and 3x3 convs and classifier at half the growth rate (4-8-16), the MACs of the
            others (CondenseNet-86: 62.2M against 62.4M at 32x32)
  learned   G = C = 4 learned 1x1 group convs, condensed over the first half of training (the paper's network)
  fixed     the condensed network's shape from the first step: 4-group 1x1 convs on inputs in their own order, then
            the shuffle; the same parameters and MACs as `learned` after condensing
  flgc      that shape with every group conv an FLGC layer (balanced: input channels and filters learn which of the
            4 groups they join), the same MACs once deployed (a permutation and a group conv)

Recipe (CondenseNet's script.sh and main.py): SGD momentum 0.9 (Nesterov), lr 0.1 with a cosine schedule, batch
64, weight decay 1e-4, 300 epochs. The paper: 5.06 % CIFAR-10 error for the learned network.
    python launch.py --config experiments/learned_groups.py --config.data.data_dir=DIR   # cifar10
    python launch.py --config experiments/learned_groups.py:digits   # offline: a shallower body on digits
    python launch.py --config experiments/learned_groups.py:local    # seconds: a tiny body, synthetic data
"""
import ml_collections

from gconv.config import base_config, make_local

PAPER_ERROR = {"learned": 5.06}
VARIANTS = ("digits", "local")  # the :arg names this file takes
GROWTH = (8, 16, 32)


def get_config(arg=None):
    config = base_config()
    config.model = ml_collections.ConfigDict(dict(  # CondenseNet-86 (condensenet86_cifar), every field a point sets
        name="condensenet", stage_sizes=(14, 14, 14), growth_rates=GROWTH, stem_strides=1, groups=4, condense_factor=4,
        head_keep=0.5, condensed=False, group_conv="fixed", dtype="float32"))
    config.data.name = "cifar10"
    config.data.batch_size = 64
    config.optim.learning_rate = 0.1
    config.optim.weight_decay = 1e-4
    config.optim.schedule = "cosine"
    config.num_epochs = 300.0
    config.log_every_steps = 100
    config.eval_every_steps = 782 * 10  # every 10 epochs of 782 steps
    config.checkpoint_every_steps = 782 * 5
    if arg in ("digits", "local"):  # a shallower body of the same design: stages of 2 (local: 1) units
        units = 1 if arg == "local" else 2
        config.model.stage_sizes = (units,) * 3
    if arg == "digits":
        config.data.name = "digits"
        config.num_epochs = 30.0
        config.log_every_steps, config.eval_every_steps, config.checkpoint_every_steps = 20, 200, 200
    if arg == "local":
        make_local(config, image_size=32)
    return config


def get_sweep(arg=None):
    paper = arg is None
    points = [{"name": name, "model.condensed": name != "learned",
               "model.group_conv": "flgc_balanced" if name == "flgc" else "fixed",
               "paper_top1_error": PAPER_ERROR.get(name, -1.0) if paper else -1.0}
              for name in ("learned", "fixed", "flgc")]
    dense = {"name": "dense", "model.condensed": True, "model.groups": 1, "model.condense_factor": 1,
             "model.head_keep": 1.0, "model.growth_rates": tuple(g // 2 for g in GROWTH), "paper_top1_error": -1.0}
    return [dense] + points
