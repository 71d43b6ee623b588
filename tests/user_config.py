"""An experiment on a user's own module (`user_nets.TinyResNeXt`, by import path): `:group` adds the rules that
split its grouped 3x3s (and the 1x1s around them, Megatron-style) over the mesh's `model` axis."""
import ml_collections

from gconv.config import base_config, make_local

VARIANTS = ("group",)
GROUP_RULES = (  # the user's parameter paths; the rest replicated
    (r"block\d+_(reduce|group)/kernel", (None, None, None, "model")),  # output channels: this device's groups
    (r"block\d+_bn[12]/", ("model",)),
    (r"block\d+_expand/kernel", (None, None, "model", None)),  # input rows of the row-parallel 1x1
)


def get_config(arg=None):
    config = make_local(base_config())
    config.model = ml_collections.ConfigDict(dict(name="user_nets:TinyResNeXt", width=32, cardinality=4, blocks=2))
    config.num_steps = 3
    config.log_every_steps = 1
    config.eval_every_steps = config.checkpoint_every_steps = 3
    if arg == "group":
        config.sharding.rules = GROUP_RULES
    return config
