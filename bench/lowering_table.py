"""A lowering table for the device at hand: every grouped conv of the given models, forward and backward, measured
once (`impl="auto"`'s candidates), written where `gconv.ops.lowering_table` finds it.

    python bench/lowering_table.py                                   # ResNeXt-50 32x4d, batch 256, 224x224, bf16
    python bench/lowering_table.py --models resnext50_32x4d,shufflenet_v2_x1_0 --batch 256 --dtype bfloat16
    python bench/lowering_table.py --models resnext11_4x6d --image 8,8,1 --batch 64 --dtype float32 --out /tmp/t
Prints the seconds measuring took and how many shapes it chose for; the table goes to `--out` (a directory;
default: `GCONV_LOWERING_TABLES`, else gconv/ops/lowering_tables/). Every conv of a model is measured at its
shape, including those below `GCONV_AUTOTUNE_MIN_MACS` (set to 0 here).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import time

import jax
import jax.numpy as jnp
import optax


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnext50_32x4d")
    parser.add_argument("--image", default="224,224,3", help="H,W,C")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", default=None, help="directory of the table")
    args = parser.parse_args()
    os.environ["GCONV_AUTOTUNE"], os.environ["GCONV_AUTOTUNE_MIN_MACS"] = "1", "0"
    os.environ.pop("GCONV_AUTOTUNE_CACHE", None)  # measure, not read an earlier cache
    from gconv import autotune
    from gconv.models import create_model
    from gconv.ops import lowering_table

    image = tuple(int(v) for v in args.image.split(","))
    dtype = jnp.dtype(args.dtype)
    start = time.perf_counter()
    for name in args.models.split(","):
        model = create_model(name, dtype=dtype)
        x = jax.ShapeDtypeStruct((args.batch,) + image, dtype)
        variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1,) + image, jnp.float32))

        def loss(params, batch_stats, x, model=model):
            logits, _ = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                                    mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.zeros(x.shape[0], jnp.int32)).mean()

        # Traces every conv's forward and backward: "auto" measures each shape as it meets it.
        jax.eval_shape(jax.grad(loss), variables["params"], variables.get("batch_stats", {}), x)
    seconds = time.perf_counter() - start
    choices = {lowering_table.portable(k): v for k, v in sorted(autotune.choices().items())}
    device = jax.devices()[0]
    path = lowering_table.table_path(device.device_kind, args.out)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"device_kind": device.device_kind, "measured": (
            f"{datetime.date.today()}, jax {jax.__version__}, {args.models} at batch {args.batch}, {args.image}, "
            f"{args.dtype}, {seconds:.0f} s"), "choices": choices}, f, indent=1)
    print(f"measured {len(autotune.measurements())} keys ({len(choices)} choices) in {seconds:.1f} s on "
          f"{device.device_kind}; wrote {path}")


if __name__ == "__main__":
    main()
