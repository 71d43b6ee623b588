"""Members: img/s of K runs trained as one program (gconv.members) against the same K runs one after another.

    python bench/members.py                                            # the default experiment's c4 model, 8x8x1
    python bench/members.py --model resnext29_8x64d --image 32,32,3 --batch 8 --steps 3 --members 1,2,4
    python bench/members.py --conv_rule batched                        # JAX's batching rule for the members' convs
Each K trains the same train step `launch.py` compiles for a group (`members.member_train_step` over
`train.train_step`), on random batches, one member per seed. "Sequential" is K times the K = 1 step: what K
runs on their own spend per step. Compile time is measured once per K (empty in-memory cache; the persistent
compilation cache is off). Prints one markdown table.
"""
from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from gconv import members, train
from gconv.config import base_config
from gconv.models import create_model
from gconv.ops import choice


def bench(name: str, image: tuple[int, ...], batch: int, counts: list[int], steps: int, warmup: int) -> list[dict]:
    config = base_config()
    model = create_model(name, num_classes=10)
    tx, _ = train.create_optimizer(config.optim, 100, 10_000)
    rng = np.random.default_rng(0)
    rows = []
    for k in counts:
        state = train.create_train_state(model, tx, image, list(range(k)))
        batches = {"image": jnp.asarray(rng.standard_normal((k, batch) + image), jnp.float32),
                   "label": jnp.asarray(rng.integers(0, 10, (k, batch)), jnp.int32)}
        step = jax.jit(functools.partial(
            members.member_train_step, step=functools.partial(train.train_step, model=model, tx=tx),
            label_smoothing=np.zeros(k, np.float32)), donate_argnums=0)
        start = time.perf_counter()
        compiled = step.lower(state, batches).compile()
        compile_s = time.perf_counter() - start
        for _ in range(warmup):
            state, metrics = compiled(state, batches)
        jax.block_until_ready(state)
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            state, metrics = compiled(state, batches)
            jax.block_until_ready(state)
            times.append(time.perf_counter() - start)
        rows.append({"members": k, "compile_s": compile_s, "step_ms": 1e3 * statistics.median(times),
                     "loss": float(np.mean(metrics["loss"]))})
    single = next((r["step_ms"] for r in rows if r["members"] == 1), None)
    for r in rows:
        r["img_s_member"] = batch / (r["step_ms"] / 1e3)
        r["img_s_total"] = r["members"] * r["img_s_member"]
        r["vs_sequential"] = r["members"] * single / r["step_ms"] if single else None
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnext11_4x6d")
    parser.add_argument("--image", default="8,8,1", help="H,W,C")
    parser.add_argument("--batch", type=int, default=64, help="per member")
    parser.add_argument("--members", default="1,2,4,8")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--conv_rule", default="auto", choices=["auto", "batched", "per_member"],
                        help="the members' convs: JAX's batching rule (one conv of K x the groups), each member's "
                             "own (gconv's rule on the CPU), or the backend's default")
    args = parser.parse_args()
    jax.config.update("jax_enable_compilation_cache", False)
    if args.conv_rule != "auto":
        choice.member_loop = lambda: args.conv_rule == "per_member"
    image = tuple(int(v) for v in args.image.split(","))
    rows = bench(args.model, image, args.batch, [int(k) for k in args.members.split(",")], args.steps, args.warmup)
    device = jax.devices()[0]
    print(f"{args.model}, {args.image} images, batch {args.batch} per member, {device.platform} "
          f"({device.device_kind}), jax {jax.__version__}, convs: {args.conv_rule} "
          f"({'per member' if choice.member_loop() else 'batched'})\n")
    print("| members K | compile s | ms/step | img/s per member | img/s total | vs K runs one after another |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ratio = f"{r['vs_sequential']:.2f}x" if r["vs_sequential"] else "-"
        print(f"| {r['members']} | {r['compile_s']:.1f} | {r['step_ms']:.1f} | {r['img_s_member']:,.0f} | "
              f"{r['img_s_total']:,.0f} | {ratio} |")


if __name__ == "__main__":
    main()
