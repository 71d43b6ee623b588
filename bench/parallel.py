"""Training speed of gconv's parallel setups, before and after a change, side by side in one run.

    python bench/parallel.py [--before REV] [--after REV] [--steps 60] [--repeats 6] [--json OUT]

`--before` (default: the commit before the one that made parallelism declared) is checked out beside the working
tree (`git worktree`, removed at the end); so is `--after` when given (default: the working tree itself). For each
setup, `launch.py` trains the default experiment's local point c2 on 8 simulated CPU devices with each tree in
turn, `--repeats` pairs of runs; a run's speed is its summary's `img_per_sec` (the median over its log intervals
after the first, which includes compilation). The pairs alternate their order (before-after, after-before, ...), so
that a machine whose speed drifts during the benchmark (a shared VM) favours neither side, and each pair's ratio
compares two runs made one after the other. Prints the median steps/s of each side, the ratio of the medians and
the median of the pairs' ratios (with their range).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BEFORE = "8f35f15"  # the last commit with models that split themselves (shard_map steps)
BATCH = 64
SETUPS = {  # name: launch.py overrides
    "one device": ["--config.mesh.data=1"],
    "data=8": ["--config.mesh.data=8"],
    "data=4 x model=2": ["--config.mesh.data=4", "--config.mesh.model=2"],
    "members K=4 (member=4 x data=2)": ["--config.members=on", "--config.seeds=4", "--config.mesh.member=4",
                                        "--config.mesh.data=2"],
}


def _speed(tree: Path, overrides: list[str], steps: int, workdir: Path) -> float:
    """Steps per second of one `launch.py` run in `tree` (members: the group's steps, K runs each)."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
           "GCONV_AUTOTUNE": "0", "PYTHONPATH": str(tree)}
    args = [sys.executable, "launch.py", "--config", "experiments/default.py:local", "--point", "c2",
            "--skip_analysis", "--workdir", str(workdir), f"--config.num_steps={steps}",
            f"--config.data.batch_size={BATCH}", "--config.log_every_steps=10", f"--config.eval_every_steps={steps}",
            f"--config.checkpoint_every_steps={steps}", *overrides]
    with open(workdir.parent / f"{workdir.name}.log", "w") as log:
        subprocess.run(args, cwd=tree, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    summaries = sorted(workdir.glob("*/summary.json"))
    return statistics.mean(json.loads(s.read_text())["img_per_sec"] for s in summaries) / BATCH


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default=BEFORE)
    parser.add_argument("--after", help="a revision instead of the working tree")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gconv-bench-parallel-") as tmp:
        before, after = Path(tmp) / "before", Path(tmp) / "after" if args.after else ROOT
        for tree, rev in ((before, args.before), (after, args.after)):
            if tree != ROOT:
                subprocess.run(["git", "worktree", "add", "--detach", str(tree), rev], cwd=ROOT, check=True,
                               capture_output=True)
        try:
            rows = {}
            for name, overrides in SETUPS.items():
                speeds = {"before": [], "after": []}
                for r in range(args.repeats):
                    sides = (("before", before), ("after", after))
                    for side, tree in sides[::-1] if r % 2 else sides:
                        workdir = Path(tmp) / f"{side}-{len(rows)}-{r}"
                        speeds[side].append(_speed(tree, overrides, args.steps, workdir))
                b, a = statistics.median(speeds["before"]), statistics.median(speeds["after"])
                pairs = sorted(x / y for x, y in zip(speeds["after"], speeds["before"]))
                rows[name] = {"before": b, "after": a, "ratio": a / b, "pair_ratio": statistics.median(pairs),
                              "runs": speeds}
                print(f"{name:34s} before {b:7.2f} steps/s   after {a:7.2f} steps/s   after/before {a / b:.3f}   "
                      f"pairs {statistics.median(pairs):.3f} ({pairs[0]:.3f}-{pairs[-1]:.3f})", flush=True)
        finally:
            for tree in {before, after} - {ROOT}:
                subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=False)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
