"""Two trees' compiled train steps, timed in one process, turn about: the step's program alone, without the loop.

    python bench/compiled_ab.py [--before REV] [--after REV] [--blocks 40] [--steps 10] [--profile N]
                                [launch.py overrides...]

Each tree (`--before`, default the last commit with models that split themselves; `--after`, default the working
tree) runs `launch.py` (bench/parallel.py's run: the default experiment's local point c2, batch 64, 8 simulated
CPU devices; data=4 x model=2 unless overrides give another mesh of more than one device) until its 20th training
step, then exports that step (`jax.export`, with its arguments' shardings) and its arguments to a file and stops.
This process then loads both programs, compiles them and calls them in blocks of `--steps` steps, in turn (which
one starts alternates), each on its own state.
Prints the median ms/step of each, after/before (the median of the blocks' ratios, with their range) and each
one's user and system CPU time per step. Two programs of one tree give 1.00 (bench/RESULTS.md).
`--profile N` then traces N more steps of each (`jax.profiler`, with XLA's CPU runtime timing each HLO op) and prints
where their time differs: each op's time summed over the devices, per step, grouped by the model path or function
that emitted it (before, after, after - before; collectives and loops left out, as they hold waiting).
Needs `flatbuffers` (`pip install flatbuffers`: `jax.export`'s serialization).
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import pickle
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from parallel import BEFORE, checked_out, launch_args, tree_env  # bench/parallel.py: the same runs and trees

CAPTURE_AT = 20
DEFAULT = ["--config.mesh.data=4", "--config.mesh.model=2"]


def capture(out: str, launch_args: list[str]) -> None:
    """In a tree's `launch.py` process: exports the compiled train step at step `CAPTURE_AT` to `out`, then exits."""
    import jax
    import numpy as np

    from gconv import parallel

    compile_steps = parallel.compile_steps

    def patched(*args, **kwargs):
        train_fn, *rest = compile_steps(*args, **kwargs)
        calls = [0]

        def step(*step_args):
            calls[0] += 1
            if calls[0] < CAPTURE_AT:
                return train_fn(*step_args)
            leaves, treedef = jax.tree.flatten(step_args)
            inner = getattr(train_fn, "jitted", train_fn)  # a MeshStep's jit, or the jit itself
            outs = tuple(jax.tree.leaves(train_fn.lower(*step_args).compile().output_shardings))
            flat = jax.jit(lambda *xs: tuple(jax.tree.leaves(inner(*jax.tree.unflatten(treedef, xs)))),
                           in_shardings=tuple(x.sharding for x in leaves), out_shardings=outs)
            mesh = leaves[0].sharding.mesh
            with jax.set_mesh(mesh):
                exported = jax.export.export(flat)(*leaves)
            with open(out, "wb") as f:
                pickle.dump({"exported": exported.serialize(), "args": [np.asarray(x) for x in leaves],
                             "state": len(jax.tree.leaves(step_args[0])), "axes": mesh.axis_names,
                             "shape": mesh.devices.shape,
                             "devices": [d.id for d in mesh.devices.flat]}, f)
            os._exit(0)

        return (step, *rest)

    parallel.compile_steps = patched
    sys.argv = ["launch.py", *launch_args]
    import runpy
    runpy.run_path("launch.py", run_name="__main__")


class Program:
    """A captured step, compiled in this process, with its own state (donated and carried from call to call)."""

    def __init__(self, path: Path):
        import jax
        import numpy as np
        from jax.sharding import Mesh, NamedSharding

        saved = pickle.loads(path.read_bytes())
        exported = jax.export.deserialize(saved["exported"])
        by_id = {d.id: d for d in jax.devices()}
        mesh = Mesh(np.array([by_id[i] for i in saved["devices"]]).reshape(saved["shape"]), saved["axes"])
        shardings = [s if s is None else NamedSharding(mesh, s.spec) for s in exported.in_shardings_jax(mesh)]
        self.args = [jax.device_put(a, s) for a, s in zip(saved["args"], shardings)]
        self.n_state = saved["state"]  # the arguments and the outputs begin with the state's leaves
        self.compiled = jax.jit(exported.call, donate_argnums=tuple(range(self.n_state))).lower(*self.args).compile()
        self.cpu: list[tuple[float, float]] = []

    def run(self, steps: int) -> float:
        """Seconds per step over `steps` calls (the last one's results waited for)."""
        import jax

        state, batch = self.args[:self.n_state], self.args[self.n_state:]
        start, cpu = time.perf_counter(), os.times()
        for _ in range(steps):
            out = self.compiled(*state, *batch)
            state = list(out[:self.n_state])
        jax.block_until_ready(out)
        end = os.times()
        self.args = state + batch
        self.cpu.append(((end.user - cpu.user) / steps, (end.system - cpu.system) / steps))
        return (time.perf_counter() - start) / steps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default=BEFORE)
    parser.add_argument("--after", help="a revision instead of the working tree")
    parser.add_argument("--blocks", type=int, default=40)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="trace N steps of each: where time differs")
    parser.add_argument("--capture", help=argparse.SUPPRESS)  # internal: the capturing side
    args, overrides = parser.parse_known_args()
    if args.capture:
        capture(args.capture, overrides)
        return 0
    traceme = " --xla_cpu_enable_xprof_traceme=true" if args.profile else ""  # per-op trace events
    os.environ.update(XLA_FLAGS="--xla_force_host_platform_device_count=8" + traceme, JAX_PLATFORMS="cpu")  # before jax
    try:
        import flatbuffers  # noqa: F401  (only checked for)
    except ImportError:
        sys.exit("bench/compiled_ab.py needs flatbuffers (jax.export's serialization): pip install flatbuffers")
    with tempfile.TemporaryDirectory(prefix="gconv-bench-ab-") as tmp, \
            checked_out(Path(tmp), args.before, args.after) as trees:
        for side, tree in trees.items():
            _capture_side(tree, Path(tmp), side, overrides or DEFAULT)
        programs = {side: Program(Path(tmp) / f"{side}.pkl") for side in trees}
        _compare(programs, args.blocks, args.steps)
        if args.profile:
            _profile(programs, args.profile, Path(tmp))
    return 0


def _capture_side(tree: Path, tmp: Path, side: str, overrides: list[str]) -> None:
    log, steps = tmp / f"{side}.log", 4 * CAPTURE_AT
    with open(log, "w") as out:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--capture", str(tmp / f"{side}.pkl"),
                               *launch_args(tmp / f"run-{side}", steps), *overrides],
                              cwd=tree, env=tree_env(tree), stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode or not (tmp / f"{side}.pkl").exists():
        sys.exit(f"capturing {side}'s step failed (exit {proc.returncode}): {log.read_text()[-2000:]}")


def _compare(programs: dict, blocks: int, steps: int) -> None:
    for p in programs.values():  # warm up
        p.run(5)
    times = {side: [] for side in programs}
    for i in range(blocks):
        for side in (("before", "after") if i % 2 == 0 else ("after", "before")):
            times[side].append(programs[side].run(steps))
    ratios = sorted(b / a for b, a in zip(times["before"], times["after"]))  # after's speed / before's
    for side, p in programs.items():
        user, system = (statistics.median(c[i] for c in p.cpu) * 1e3 for i in (0, 1))
        print(f"{side:6s} {statistics.median(times[side]) * 1e3:7.2f} ms/step   CPU: user {user:6.2f}, system "
              f"{system:6.2f} ms/step")
    print(f"after/before {statistics.median(ratios):.3f} ({ratios[0]:.3f}-{ratios[-1]:.3f}), {blocks} blocks of "
          f"{steps} steps")


def _profile(programs: dict, steps: int, tmp: Path, rows: int = 20) -> None:
    """Traces `steps` steps of each program and prints the `rows` groups of ops whose time differs most."""
    import jax

    times = {}
    for side, p in programs.items():
        with jax.profiler.trace(str(tmp / f"trace-{side}"), create_perfetto_trace=True):
            p.run(steps)
        times[side] = _op_times(p, next(iter(glob.glob(f"{tmp}/trace-{side}/**/*.trace.json.gz", recursive=True))),
                                steps)
    groups = sorted(set(times["before"]) | set(times["after"]),
                    key=lambda g: -abs(times["after"].get(g, 0) - times["before"].get(g, 0)))
    print(f"\nop time per step, summed over devices (us): {'before':>9s} {'after':>9s} {'after - before':>15s}")
    for g in groups[:rows]:
        b, a = times["before"].get(g, 0.0), times["after"].get(g, 0.0)
        print(f"  {g[:60]:60s} {b:9.0f} {a:9.0f} {a - b:+15.0f}")
    print(f"  {'all':60s} {sum(times['before'].values()):9.0f} {sum(times['after'].values()):9.0f}")


def _op_times(program, trace: str, steps: int) -> dict[str, float]:
    """`{model path or function: us per step}` of the compiled ops in a trace, summed over the devices."""
    emitted = dict(re.findall(r"^\s+(?:ROOT )?%([\w.\-]+) = .*?op_name=\"([^\"]*)\"", program.compiled.as_text(), re.M))
    times = collections.defaultdict(float)
    with gzip.open(trace) as f:
        events = json.load(f)["traceEvents"]
    for e in events:
        op = e.get("args", {}).get("hlo_op") if e.get("ph") == "X" else None
        if op and not e["name"].startswith("end:") and not re.match(r"(all-reduce|psum|all-gather|while)", op):
            times[_group(emitted[op]) if op in emitted else "ops without an op_name"] += e["dur"] / steps
    return dict(times)


def _group(op_name: str) -> str:
    """`jit(call)/.../transpose(jvp(ResNeXt))/stage1/block0/conv_reduce/dot_general` -> `backward stage1/block0/
    conv_reduce`: the pass and the module path, or the function for ops outside the model (`forward add`)."""
    parts = [p for p in op_name.split("/") if not re.search(r"[()]", p) and p not in ("call_exported", "shard_map")]
    return ("backward " if "transpose(" in op_name else "forward ") + "/".join(parts[:-1] or parts)


if __name__ == "__main__":
    sys.exit(main())
