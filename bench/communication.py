"""Per-step communication of data parallel vs group parallel, computed from the models' shapes (nothing runs).

    python bench/communication.py            # prints the markdown tables of docs/scaling.md

Per device and per training step, in fp32, with ring collectives over n devices:
- data parallel (mesh data=n): one all-reduce of the gradients, 2 (n-1)/n * 4 bytes * params, plus BatchNorm's
  two statistics per channel forward and backward; independent of the batch size.
- group parallel (mesh model=n, the whole batch B on every device):
  ResNeXt: per block, the row-parallel expand's all-reduce forward and the column-parallel input's all-reduce
  backward, each 2 (n-1)/n * 4 bytes * B * H * W * C_out;
  ShuffleNet v1: per unit, the shuffle's all_to_all forward and backward, each (n-1)/n * 4 bytes * B * H * W * mid / n;
  stride-2 units all-gather (forward) and reduce-scatter (backward) their output, (n-1)/n * 4 bytes * B*H*W*C;
  the row-parallel head all-reduces B * classes logits.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from gconv.complexity import count_params
from gconv.layers import record_calls
from gconv.models import create_model

BYTES = 4


def _outputs(model, res: int) -> dict[str, tuple[int, ...]]:
    """Output shape (batch 1) of every submodule, by path."""
    shapes: dict[str, tuple[int, ...]] = {}

    def record(module, args, out):
        if hasattr(out, "shape"):
            shapes["/".join(module.scope.path)] = tuple(out.shape)

    def init():
        with record_calls(record):
            return model.init(jax.random.PRNGKey(0), jnp.zeros((1, res, res, 3)))

    variables = jax.eval_shape(init)
    shapes["__params__"] = (count_params(variables["params"]),)
    shapes["__bn_channels__"] = (sum(v.shape[0] for path, v in jax.tree_util.tree_leaves_with_path(
        variables["batch_stats"]) if jax.tree_util.keystr(path).endswith("'mean']")),)
    return shapes


def data_parallel_bytes(shapes: dict, n: int) -> float:
    grads = 2 * (n - 1) / n * BYTES * shapes["__params__"][0]
    bn = 2 * 2 * 2 * (n - 1) / n * BYTES * shapes["__bn_channels__"][0]  # (mean, mean of squares) x fwd/bwd
    return grads + bn


def group_parallel_bytes_per_image(name: str, shapes: dict, n: int) -> float:
    """Bytes per device per step for one image of batch (activations scale linearly with the batch)."""
    total = 0.0
    for path, shape in shapes.items():
        size = math.prod(shape)
        if path.endswith("conv_expand") and "block" in path:  # ResNeXt block: psum fwd + psum bwd
            total += 2 * 2 * (n - 1) / n * BYTES * size
        elif path.endswith("compress_bn") and "unit" in path:  # ShuffleNet shuffle: all_to_all fwd + bwd
            total += 2 * (n - 1) / n * BYTES * size / n
        elif "unit" in path and path.endswith("unit0") and name.startswith("shufflenet"):  # stride-2 gather
            total += 2 * (n - 1) / n * BYTES * size
        elif path == "head" and name.startswith("shufflenet"):
            total += 2 * (n - 1) / n * BYTES * size
    return total


def main() -> None:
    n = 8
    print(f"Per device, per training step, fp32, {n} devices, 224x224 input. DP = data parallel (mesh data={n}); "
          f"GP = group parallel (mesh model={n}).\n")
    print("| model | params | DP MB/step | GP MB/step per image | GP MB at B=32 | B=128 | B=256 | break-even B |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name in ("resnext50_32x4d", "shufflenet_g8_w1"):
        shapes = _outputs(create_model(name), 224)
        dp = data_parallel_bytes(shapes, n)
        gp = group_parallel_bytes_per_image(name, shapes, n)
        row = [f"`{name}`", f"{shapes['__params__'][0]:,}", f"{dp / 1e6:,.1f}", f"{gp / 1e6:,.2f}"]
        row += [f"{gp * b / 1e6:,.0f}" for b in (32, 128, 256)] + [f"{dp / gp:,.1f}"]
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
