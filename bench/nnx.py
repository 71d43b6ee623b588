"""NNX against linen: train steps per second of the same model, batch, optimizer and lowering, side by side.

    python bench/nnx.py                                          # the default experiment's c2 model on 8x8x1, batch 64
    python bench/nnx.py --model resnext29_8x64d --image 32,32,3 --batch 16 --steps 5
Three steps over the same weights and random batch: linen (`gconv.train.train_step` under `jax.jit`, what
`launch.py` compiles on one device), NNX with `nnx.jit` (docs/nnx.md's loop), and NNX's functional form (`nnx.split`
once, `jax.jit` of a step that merges inside). Rounds alternate the three; the table gives each one's median
steps/s and its ratio to linen's. Prints one markdown table.
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import optax
from flax import nnx

import gconv.nnx as gnnx
from gconv import train
from gconv.config import base_config
from gconv.models import create_model
from gconv.optim import create_optimizer


def _timed(step, steps: int) -> float:
    """Steps per second of `steps` calls of `step()` (each returns arrays to wait for)."""
    start = time.perf_counter()
    for _ in range(steps):
        out = step()
    jax.block_until_ready(out)
    return steps / (time.perf_counter() - start)


def bench(name: str, image: tuple[int, ...], batch: int, steps: int, rounds: int) -> list[dict]:
    config = base_config()
    definition = create_model(name, num_classes=10)
    tx, _ = create_optimizer(config.optim, steps_per_epoch=100, total_steps=10_000)
    state = train.create_train_state(definition, tx, image, 0)
    key = jax.random.key(0)
    data = {"image": jax.random.normal(key, (batch, *image)), "label": jax.random.randint(key, (batch,), 0, 10)}

    linen_step = jax.jit(lambda s, b: train.train_step(s, b, model=definition, tx=tx))
    linen = {"state": state}

    def run_linen():
        linen["state"], metrics = linen_step(linen["state"], data)
        return metrics["loss"]

    model = gnnx.from_linen(definition, {"params": state.params, "batch_stats": state.batch_stats})
    model.train()
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    def loss_fn(model, image, label):
        logits = model(image)
        return optax.softmax_cross_entropy(logits, jax.nn.one_hot(label, logits.shape[-1])).mean()

    @nnx.jit
    def nnx_step(model, optimizer, image, label):
        loss, grads = nnx.value_and_grad(loss_fn)(model, image, label)
        optimizer.update(model, grads)
        return loss

    graphdef, pure = nnx.split((model, optimizer))

    @jax.jit
    def functional_step(pure, image, label):
        model, optimizer = nnx.merge(graphdef, pure)
        loss, grads = nnx.value_and_grad(loss_fn)(model, image, label)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer)), loss

    functional = {"state": pure}

    def run_functional():
        functional["state"], loss = functional_step(functional["state"], data["image"], data["label"])
        return loss

    candidates = {"linen (jax.jit)": run_linen,
                  "nnx.jit": lambda: nnx_step(model, optimizer, data["image"], data["label"]),
                  "nnx split/merge + jax.jit": run_functional}
    for step in candidates.values():  # compile, and a warm step
        _timed(step, 2)
    rates: dict[str, list[float]] = {k: [] for k in candidates}
    for _ in range(rounds):
        for label, step in candidates.items():
            rates[label].append(_timed(step, steps))
    base = statistics.median(rates["linen (jax.jit)"])
    return [{"step": label, "steps/s": statistics.median(r), "ratio": statistics.median(r) / base}
            for label, r in rates.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnext11_2x10d")
    parser.add_argument("--image", default="8,8,1")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    image = tuple(int(v) for v in args.image.split(","))
    rows = bench(args.model, image, args.batch, args.steps, args.rounds)
    print(f"{args.model}, input {args.batch}x{'x'.join(map(str, image))}, {jax.devices()[0].device_kind}, "
          f"jax {jax.__version__}; median of {args.rounds} rounds of {args.steps} steps")
    print("| step | steps/s | / linen |\n|---|---|---|")
    for row in rows:
        print(f"| {row['step']} | {row['steps/s']:.1f} | {row['ratio']:.3f} |")


if __name__ == "__main__":
    main()
