"""Training speed of gconv's parallel setups, before and after a change, side by side in one run.

    python bench/parallel.py [--before REV] [--after REV] [--steps 400] [--rounds 6] [--slice 2] [--json OUT]

`--before` (default: the commit before the one that made parallelism declared) is checked out beside the working
tree (`git worktree`, removed at the end); so is `--after` when given (default: the working tree itself). For each
setup and round, `launch.py` trains the default experiment's local point c2 on 8 simulated CPU devices in both
trees at once, as two processes that take turns: each is stopped (SIGSTOP) once it has compiled and written its
first log record; then one runs while the other is stopped, swapping every `--slice` seconds, until one of them
has logged its last step. A machine whose speed drifts (a shared VM: 5-20 % within minutes) so slows both sides
alike. A side's speed is the steps between two of its log records over the time it ran between them (a record is
seen within 10 ms: the bench polls the running side's `metrics.jsonl`). Prints each side's steps/s (the median
over rounds) and after/before (the median of the rounds' ratios, with their range).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BEFORE = "8f35f15"  # the last commit with models that split themselves (shard_map steps)
BATCH, LOG_EVERY, POLL = 64, 10, 0.01
SETUPS = {  # name: launch.py overrides
    "one device": ["--config.mesh.data=1"],
    "data=8": ["--config.mesh.data=8"],
    "data=4 x model=2": ["--config.mesh.data=4", "--config.mesh.model=2"],
    "members K=4 (member=4 x data=2)": ["--config.members=on", "--config.seeds=4", "--config.mesh.member=4",
                                        "--config.mesh.data=2"],
}


def tree_env(tree: Path) -> dict:
    """The environment of a tree's `launch.py`: 8 simulated CPU devices, the static lowering rule, `tree`'s gconv."""
    return {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
            "GCONV_AUTOTUNE": "0", "PYTHONPATH": str(tree)}


def launch_args(workdir: Path, steps: int) -> list[str]:
    """`launch.py`'s arguments for `steps` steps of the default experiment's local point c2 in `workdir`."""
    return ["--config", "experiments/default.py:local", "--point", "c2", "--skip_analysis", "--workdir", str(workdir),
            f"--config.num_steps={steps}", f"--config.data.batch_size={BATCH}", f"--config.log_every_steps={LOG_EVERY}",
            f"--config.eval_every_steps={steps}", f"--config.checkpoint_every_steps={steps}"]


@contextlib.contextmanager
def checked_out(tmp: Path, before: str, after: str | None):
    """`{"before": tree, "after": tree}`: `before` checked out in `tmp` (`git worktree`), `after` too when given
    (else the working tree); the worktrees are removed on exit."""
    trees = {"before": tmp / "before", "after": tmp / "after" if after else ROOT}
    try:
        for side, rev in (("before", before), ("after", after)):
            if trees[side] != ROOT:
                subprocess.run(["git", "worktree", "add", "--detach", str(trees[side]), rev], cwd=ROOT, check=True,
                               capture_output=True)
        yield trees
    finally:
        for tree in set(trees.values()) - {ROOT}:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=False)


class Side:
    """One `launch.py` run of a tree, stopped and continued as a process group; `marks`: (log records, seconds run)
    each time a new record was seen."""

    def __init__(self, tree: Path, overrides: list[str], steps: int, workdir: Path):
        args = [sys.executable, "launch.py", *launch_args(workdir, steps), *overrides]
        self.workdir, self.last = workdir, steps // LOG_EVERY
        self.log = workdir.parent / f"{workdir.name}.log"
        with open(self.log, "w") as log:  # members log the same steps: the first member's records are counted
            self.proc = subprocess.Popen(args, cwd=tree, env=tree_env(tree), stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        self.ran, self.marks, self.base, self.stopped, self.metrics = 0.0, [], 0, False, None

    def records(self) -> int:
        if self.proc.poll() not in (None, 0):
            raise RuntimeError(f"launch.py failed (exit {self.proc.returncode}); its output: {self.log}")
        self.metrics = self.metrics or next(iter(sorted(self.workdir.glob("*/metrics.jsonl"))), None)
        return self.metrics.read_text().count('"img_per_sec"') if self.metrics else 0

    def signal(self, stop: bool) -> None:
        os.killpg(self.proc.pid, signal.SIGSTOP if stop else signal.SIGCONT)
        self.stopped = stop

    def run_for(self, seconds: float) -> None:
        """Continues the run for `seconds` (or until its last record), marking each new record, then stops it."""
        self.signal(stop=False)
        start = time.monotonic()
        while (elapsed := time.monotonic() - start) < seconds and self.mark(self.ran + elapsed) < self.last:
            time.sleep(POLL)
        self.signal(stop=True)
        self.ran += time.monotonic() - start
        time.sleep(POLL)
        self.mark(self.ran)  # a record written as it was being stopped

    def mark(self, ran: float) -> int:
        """Reads the record count once, marking it at `ran` seconds if it is new; returns it."""
        n = self.records()
        if n > (self.marks[-1][0] if self.marks else self.base):
            self.marks.append((n, ran))
        return n

    def speed(self) -> float:
        """Steps per second between the first and the last new record seen while the sides took turns."""
        if len(self.marks) < 3:
            raise RuntimeError(f"{len(self.marks)} log records seen while taking turns: raise --steps")
        (n0, t0), (n1, t1) = self.marks[0], self.marks[-1]
        return (n1 - n0) * LOG_EVERY / (t1 - t0)


def _round(trees: list[Path], overrides: list[str], steps: int, slice_s: float, tmp: Path) -> list[float]:
    """Steps/s of each tree's run, the two runs taking turns (see the module's docstring)."""
    sides = [Side(tree, overrides, steps, tmp / f"side{i}") for i, tree in enumerate(trees)]
    try:
        while not all(s.stopped for s in sides):  # both compile at once; each stops at its first record
            for s in sides:
                if not s.stopped and s.records() >= 1:
                    s.signal(stop=True)
            time.sleep(POLL)
        for s in sides:
            s.base = s.records()
        turn = 0
        while all(s.records() < s.last for s in sides):
            sides[turn].run_for(slice_s)
            turn = 1 - turn
        return [s.speed() for s in sides]
    finally:
        for s in sides:
            if s.proc.poll() is None:
                s.signal(stop=False)
        for s in sides:
            s.proc.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default=BEFORE)
    parser.add_argument("--after", help="a revision instead of the working tree")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--slice", type=float, default=2.0, help="seconds each side runs at a turn")
    parser.add_argument("--only", default="", help="the setups whose name holds this text")
    parser.add_argument("--json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gconv-bench-parallel-") as tmp, \
            checked_out(Path(tmp), args.before, args.after) as trees:
        rows = {}
        for name, overrides in ((n, o) for n, o in SETUPS.items() if args.only in n):
            speeds = {"before": [], "after": []}
            for r in range(args.rounds):  # which side starts (and runs first) alternates
                order = ["before", "after"] if r % 2 == 0 else ["after", "before"]
                run_dir = Path(tmp) / f"{len(rows)}-{r}"
                run_dir.mkdir()
                for side, speed in zip(order, _round([trees[s] for s in order], overrides, args.steps, args.slice,
                                                     run_dir)):
                    speeds[side].append(speed)
            b, a = statistics.median(speeds["before"]), statistics.median(speeds["after"])
            ratios = sorted(x / y for x, y in zip(speeds["after"], speeds["before"]))
            rows[name] = {"before": b, "after": a, "ratio": statistics.median(ratios), "ratios": ratios,
                          "runs": speeds}
            print(f"{name:34s} before {b:7.2f} steps/s   after {a:7.2f} steps/s   after/before "
                  f"{statistics.median(ratios):.3f} ({ratios[0]:.3f}-{ratios[-1]:.3f})", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
