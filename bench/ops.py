"""Grouped-conv lowerings, forward and forward+backward, on whatever backend JAX runs (CPU here; GPU/TPU too).

    python bench/ops.py                 # small CPU shapes
    python bench/ops.py --full          # the ResNeXt-50/ShuffleNet stage shapes at batch 128 (for accelerators)

The backward includes the forward: the loss is sum(sin(conv)), not linear in the conv output, so XLA cannot
delete the forward. Prints the median over repeats, and each lowering's ratio to impl="xla", for XLA's own
lowering and every candidate `impl="auto"` would time on this backend (`gconv.ops.candidate_impls`).
"""
import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from gconv import ops

SMALL = [(64, 8, 32, 16, 3), (64, 8, 24, 8, 3), (32, 28, 240, 240, 3), (32, 28, 240, 3, 1), (32, 14, 384, 8, 1),
         (32, 56, 128, 32, 3), (16, 28, 256, 1, 1), (16, 28, 256, 1, 3), (32, 56, 128, 128, 3)]
FULL = [(128, 56, 128, 32, 3), (128, 28, 256, 32, 3), (128, 14, 512, 32, 3), (128, 7, 1024, 32, 3),
        (128, 14, 1024, 64, 3), (128, 28, 240, 240, 3), (128, 14, 480, 480, 3), (128, 28, 240, 3, 1)]


def _time(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    dtype = jnp.dtype(args.dtype)
    print(f"backend {jax.default_backend()}, {jax.devices()[0].device_kind}, jax {jax.__version__}, {args.dtype}")
    print("| N, HxW, C, groups, k | impl | fwd ms | fwd+bwd ms | fwd vs xla | fwd+bwd vs xla |")
    print("|---|---|---:|---:|---:|---:|")
    for n, hw, c, g, k in FULL if args.full else SMALL:
        x = jax.random.normal(jax.random.PRNGKey(0), (n, hw, hw, c), dtype)
        w = jax.random.normal(jax.random.PRNGKey(1), (k, k, c // g, c), dtype)
        results = {}
        impls = ["xla"] + [i for i in ops.candidate_impls(w.shape, c, g, jax.default_backend()) if i != "xla"]
        for impl in impls:
            fwd = jax.jit(lambda x, w, impl=impl: ops.grouped_conv(x, w, g, impl=impl))
            loss = lambda x, w, impl=impl: jnp.sum(jnp.sin(ops.grouped_conv(x, w, g, impl=impl)).astype(jnp.float32))
            bwd = jax.jit(jax.grad(loss, argnums=(0, 1)))
            results[impl] = (_time(fwd, x, w, repeats=args.repeats), _time(bwd, x, w, repeats=args.repeats))
        base = results["xla"]
        fastest = (min(results, key=lambda i: results[i][0]), min(results, key=lambda i: results[i][1]))
        for impl, (f, b) in results.items():
            mark = "".join(s for s, best in ((" (fastest fwd)", fastest[0]), (" (fastest fwd+bwd)", fastest[1]))
                           if best == impl)
            print(f"| {n}, {hw}x{hw}, {c}, {g}, {k} | {impl}{mark} | {f:.2f} | {b:.2f} | {base[0] / f:.2f}x | "
                  f"{base[1] / b:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
