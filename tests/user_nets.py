"""A user's own Flax model, as a researcher would write it: gconv's `GroupedConv` beside plain `nn.Dense` and
`nn.BatchNorm`, no parallel code. `launch.py` trains it by import path (`model.name="user_nets:TinyResNeXt"`)."""
import flax.linen as nn
import jax
import jax.numpy as jnp

from gconv.layers import GroupedConv


class TinyResNeXt(nn.Module):
    """A 3x3 stem, then `blocks` ResNeXt bottlenecks (1x1 reduce, grouped 3x3, 1x1 expand, identity shortcut),
    global pooling and a dense head. `x: (N, H, W, C) -> (N, num_classes)`."""
    num_classes: int = 10
    width: int = 32
    cardinality: int = 4
    blocks: int = 2

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        norm = lambda name: nn.BatchNorm(use_running_average=not train, momentum=0.9, name=name)  # noqa: E731
        x = nn.relu(norm("stem_bn")(GroupedConv(self.width, (3, 3), use_bias=False, name="stem_conv")(x)))
        for i in range(self.blocks):
            y = nn.relu(norm(f"block{i}_bn1")(GroupedConv(self.width, (1, 1), use_bias=False,
                                                          name=f"block{i}_reduce")(x)))
            y = GroupedConv(self.width, (3, 3), groups=self.cardinality, use_bias=False, name=f"block{i}_group")(y)
            y = nn.relu(norm(f"block{i}_bn2")(y))
            y = norm(f"block{i}_bn3")(GroupedConv(self.width, (1, 1), use_bias=False, name=f"block{i}_expand")(y))
            x = nn.relu(x + y)
        return nn.Dense(self.num_classes, name="head")(jnp.mean(x, axis=(1, 2))).astype(jnp.float32)
