"""Whole-model training and inference throughput: gconv (JAX) vs PyTorch eager and torch.compile, same machine.

    python bench/models.py                                   # GPU sizes: bs 256/512, 224x224, bf16
    python bench/models.py --res 112 --batch 16 --steps 5 --warmup 2 --dtype float32 --no-compile   # CPU
Prints one markdown table with img/s (median step time), peak memory and gconv/PyTorch ratios. gconv's warm-up
steps include compilation and `impl="auto"`'s measurements. PyTorch (torch, torchvision) is
optional: without it only gconv is measured. ShuffleNet v1's PyTorch reference is built here from the same spec
(paper Table 1, imgclsmob structure).
"""
from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import optax

from gconv.models import create_model

BATCH = {"resnext50_32x4d": 256, "shufflenet_v2_x1_0": 512, "shufflenet_g3_w1": 512}


def _median_seconds(run, steps: int, warmup: int) -> float:
    """Median wall time of `run()` over `steps` calls after `warmup` calls (compilation, autotuning)."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_gconv(name: str, batch: int, res: int, dtype: str, steps: int, warmup: int) -> dict[str, float]:
    model = create_model(name, dtype=jnp.dtype(dtype))
    x = jnp.ones((batch, res, res, 3), jnp.dtype(dtype))
    y = jnp.zeros((batch,), jnp.int32)
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), x[:1].astype(jnp.float32))
    tx = optax.sgd(0.1, momentum=0.9)
    opt_state = tx.init(variables["params"])

    @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
    def train(params, batch_stats, opt_state, x, y):
        def loss_fn(p):
            logits, upd = model.apply({"params": p, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd["batch_stats"]
        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), stats, opt_state, loss

    infer = jax.jit(lambda v, x: model.apply(v, x, train=False))
    state = [variables["params"], variables["batch_stats"], opt_state]

    def train_once():
        state[0], state[1], state[2], loss = train(*state, x, y)
        jax.block_until_ready(loss)

    train_ips = batch / _median_seconds(train_once, steps, warmup)
    v = {"params": state[0], "batch_stats": state[1]}
    infer_ips = batch / _median_seconds(lambda: jax.block_until_ready(infer(v, x)), steps, warmup)
    mem = jax.devices()[0].memory_stats() or {}
    return {"train": train_ips, "infer": infer_ips, "peak_gb": mem.get("peak_bytes_in_use", float("nan")) / 2**30}


def torch_shufflenet_v1(groups: int = 3, width: float = 1.0, num_classes: int = 1000):
    """ShuffleNet v1 in PyTorch, as gconv.models.shufflenet builds it (imgclsmob's structure)."""
    import torch
    from torch import nn

    from gconv.models.shufflenet import V1_STAGE_SIZES, shufflenet_v1_channels

    class Shuffle(nn.Module):
        def forward(self, x):
            n, c, h, w = x.shape
            return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)

    class Unit(nn.Module):
        def __init__(self, cin, cout, stride, group_first):
            super().__init__()
            mid, self.stride = cout // 4, stride
            branch = cout - cin if stride == 2 else cout
            self.body = nn.Sequential(
                nn.Conv2d(cin, mid, 1, groups=groups if group_first else 1, bias=False), nn.BatchNorm2d(mid),
                nn.ReLU(inplace=True), Shuffle(), nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False),
                nn.BatchNorm2d(mid), nn.Conv2d(mid, branch, 1, groups=groups, bias=False), nn.BatchNorm2d(branch))
            self.pool = nn.AvgPool2d(3, 2, 1) if stride == 2 else None

        def forward(self, x):
            y = self.body(x)
            y = torch.cat([y, self.pool(x)], 1) if self.pool is not None else y + x
            return torch.relu(y)

    stem, stages = shufflenet_v1_channels(groups, width)
    layers = [nn.Conv2d(3, stem, 3, 2, 1, bias=False), nn.BatchNorm2d(stem), nn.ReLU(inplace=True),
              nn.MaxPool2d(3, 2, 1)]
    cin = stem
    for i, (n, cout) in enumerate(zip(V1_STAGE_SIZES, stages)):
        for j in range(n):
            layers.append(Unit(cin, cout, 2 if j == 0 else 1, group_first=not (i == 0 and j == 0)))
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    return nn.Sequential(*layers)


def bench_torch(name: str, batch: int, res: int, dtype: str, steps: int, warmup: int, compile_: bool):
    import torch
    import torchvision

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cudnn.benchmark = True
    model = torch_shufflenet_v1() if name == "shufflenet_g3_w1" else getattr(torchvision.models, name)()
    model = model.to(device, memory_format=torch.channels_last)
    step_model = torch.compile(model) if compile_ else model
    x = torch.ones(batch, 3, res, res, device=device).to(memory_format=torch.channels_last)
    y = torch.zeros(batch, dtype=torch.long, device=device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    amp = dict(device_type=device, dtype=torch.bfloat16, enabled=dtype == "bfloat16")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def run(train: bool) -> float:
        model.train(train)

        def once():
            with torch.autocast(**amp), torch.set_grad_enabled(train):
                out = step_model(x)
                if train:
                    loss = torch.nn.functional.cross_entropy(out, y)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
            sync()

        return batch / _median_seconds(once, steps, warmup)

    result = {"train": run(True), "infer": run(False)}
    result["peak_gb"] = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default=",".join(BATCH))
    parser.add_argument("--batch", type=int, default=0, help="0: 256 for ResNeXt, 512 for ShuffleNets")
    parser.add_argument("--res", type=int, default=224)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true", help="PyTorch eager only (no torch.compile)")
    args = parser.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; {args.res}x{args.res}, {args.dtype}")
    print("| model | batch | framework | train img/s | infer img/s | peak GiB | gconv/this train | gconv/this infer |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for name in args.models.split(","):
        batch = args.batch or BATCH[name]
        ours = bench_gconv(name, batch, args.res, args.dtype, args.steps, args.warmup)
        rows = [("gconv (JAX)", ours)]
        try:
            rows.append(("PyTorch eager", bench_torch(name, batch, args.res, args.dtype, args.steps, args.warmup, False)))
            if not args.no_compile:
                rows.append(("torch.compile",
                             bench_torch(name, batch, args.res, args.dtype, args.steps, args.warmup, True)))
        except ImportError:
            pass
        for label, r in rows:
            print(f"| {name} | {batch} | {label} | {r['train']:,.0f} | {r['infer']:,.0f} | {r['peak_gb']:.2f} | "
                  f"{ours['train'] / r['train']:.2f}x | {ours['infer'] / r['infer']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
