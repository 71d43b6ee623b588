"""Mutation score of the test suite on hand-made mutants: each mutant changes one promise of gconv (a shuffle order,
the ops' own partitioning, the weight-decay mask, the resumed input position, a shard index, torn-file handling, the
kept best checkpoint, the run lock's conditional create, each member's own hyperparameters, a sharding rule) and is
killed when a test of its area fails.

    python bench/mutation.py [--repo PATH] [--only NAME] [--json OUT]

Each mutant is applied to a copy of the repository's tracked and untracked files (the working tree is never
touched) and the area's test files run there (`-x`, both tiers). Prints one line per mutant and the score.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# (name, code before, code after, test files of its area); the code is found in whichever gconv file holds it.
MUTANTS = [
    ("shuffle order", "x = jnp.swapaxes(x, axis, axis + 1)", "x = x",
     ["tests/test_ops.py", "tests/test_layers.py", "tests/test_parallel.py"]),
    ("op partition", "b = DATA if data > 1 and batch % data == 0 else None", "b = None",
     ["tests/test_parallel.py"]),
    ("decay mask", "lambda p: p.ndim > 1, params)", "lambda p: p.ndim >= 1, params)",
     ["tests/test_optim.py", "tests/test_train.py"]),
    ("resume step", "ds = ds[start_step * shard_count + shard_index::shard_count]",
     "ds = ds[shard_index::shard_count]", ["tests/test_data.py", "tests/test_train.py", "tests/test_faults.py"]),
    ("shard index", '"shard_index": mine[0] // len(mine)', '"shard_index": 0',
     ["tests/test_parallel.py", "tests/test_data.py", "tests/test_multiprocess.py"]),
    ("jsonl mid-file damage", "if i == len(lines) - 1:", "if True:",
     ["tests/test_train.py", "tests/test_faults.py"]),
    ("best checkpoint", "key=lambda step: (errors[step], -step)", "key=lambda step: (-errors[step], -step)",
     ["tests/test_train.py", "tests/test_faults.py"]),
    ("lock create", "self.store.write(self.name, data, if_equal=generation)", "self.store.write(self.name, data)",
     ["tests/test_runlock.py"]),
    ("member hyperparameters", "hyper = jax.tree.map(lambda *v: np.stack(v), *[hyperparams(run.config.optim,",
     "hyper = jax.tree.map(lambda *v: np.stack(v), *[hyperparams(runs[0].config.optim,", ["tests/test_members.py"]),
    ("sharding rule", '(r"conv_expand/kernel", (None, None, MODEL, None)),  # input rows',
     '(r"conv_expand/kernel", (None, None, None, None)),  # input rows', ["tests/test_parallel.py"]),
]


def _files(repo: Path) -> list[str]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=repo, check=True,
                         capture_output=True, text=True).stdout
    return [f for f in out.splitlines() if (repo / f).is_file()]


def _apply(copy: Path, before: str, after: str) -> str:
    hits = [p for p in sorted((copy / "gconv").rglob("*.py")) if before in p.read_text()]
    if len(hits) != 1 or hits[0].read_text().count(before) != 1:
        raise SystemExit(f"mutant code {before!r} found {len(hits)} times under gconv/: it must occur once.")
    hits[0].write_text(hits[0].read_text().replace(before, after))
    return str(hits[0].relative_to(copy))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", default=str(Path(__file__).resolve().parent.parent))
    parser.add_argument("--only", action="append", help="run only the mutants of these names")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    repo = Path(args.repo).resolve()
    results = []
    for name, before, after, tests in MUTANTS:
        if args.only and name not in args.only:
            continue
        with tempfile.TemporaryDirectory(prefix="gconv-mutant-") as tmp:
            copy = Path(tmp)
            for f in _files(repo):
                (copy / f).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(repo / f, copy / f)
            where = _apply(copy, before, after)
            tests = [t for t in tests if (copy / t).exists()]
            start = time.time()
            log = copy / "pytest.log"
            with open(log, "w") as out:  # a file, not a pipe: nothing can stall on an unread pipe
                code = subprocess.call([sys.executable, "-m", "pytest", "-q", "-x", "-n", "2", "-p", "no:cacheprovider",
                                        *tests], cwd=copy, stdout=out, stderr=subprocess.STDOUT,
                                       env={**os.environ, "PYTHONPATH": str(copy)})
            failed = [line.split(" ")[1] for line in log.read_text().splitlines() if line.startswith("FAILED ")]
            killed = bool(failed)  # with -x under xdist, pytest exits 2 (interrupted) after the first failure
            if not failed and code != 0:
                raise SystemExit(f"mutant {name!r}: pytest exited {code} without a failed test:\n"
                                 f"{log.read_text()[-3000:]}")
            results.append({"mutant": name, "file": where, "killed": killed, "by": failed[:1],
                            "seconds": round(time.time() - start)})
            print(f"{name:24s} {where:28s} {'killed by ' + failed[0] if failed else 'SURVIVED'} "
                  f"({time.time() - start:.0f} s)", flush=True)
    killed = sum(r["killed"] for r in results)
    print(f"mutation score: {killed}/{len(results)} killed")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
