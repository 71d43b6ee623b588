"""gconv's launcher: config in, `train_and_evaluate(config, workdir)` per sweep point, report out.

    python launch.py                                   # default experiment (digits cardinality ablation)
    python launch.py --config experiments/cifar10_resnext29.py:local --workdir runs/c10
    python launch.py --point c4 --config.optim.learning_rate=0.05
    python launch.py report WORKDIR                    # rebuild a sweep's report
    python launch.py analyze RUN_DIR                   # filter correlations, kernel views, compute of one run
On a multi-process platform (TPU pod, multi-host GPU) add --multiprocess: `jax.distributed.initialize()` runs
first and only process 0 writes logs and reports.
"""
from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, dict[str, str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", default="train", choices=["train", "report", "analyze"])
    parser.add_argument("target", nargs="?", help="WORKDIR for `report`, RUN_DIR (WORKDIR/POINT) for `analyze`")
    parser.add_argument("--config", default="experiments/default.py", help="PATH[:arg] of an experiment file")
    parser.add_argument("--workdir", default=None, help="default: runs/<experiment name>")
    parser.add_argument("--point", action="append", help="sweep point name or index (repeatable); default: all")
    parser.add_argument("--multiprocess", action="store_true", help="call jax.distributed.initialize() first")
    args, rest = parser.parse_known_args(argv)
    overrides = {}
    for item in rest:
        key, eq, value = item.partition("=")
        if not key.startswith("--config.") or not eq:
            parser.error(f"unrecognised argument {item!r}: overrides look like --config.optim.learning_rate=0.05")
        overrides[key[len("--config."):]] = value
    return args, overrides


def main(argv: list[str]) -> int:
    args, overrides = parse_args(argv)
    from gconv import report

    if args.command in ("report", "analyze") and not args.target:
        raise SystemExit(f"usage: python launch.py {args.command} {'WORKDIR' if args.command == 'report' else 'RUN_DIR'}")
    if args.command == "analyze":
        result = report.analyze_run(args.target)
        for pair in result["pairs"]:
            print(f"{pair['layer_a']} -> {pair['layer_b']}: block-diagonality {pair['score']:.3f} "
                  f"(chance {1 / pair['groups']:.3f})")
        print(f"wrote {os.path.join(args.target, 'analysis')}")
        return 0
    if args.command == "report":
        path = report.write_report(args.target)
        print(report.report_table(report.load_summaries(args.target)))
        print(f"wrote {path}")
        return 0

    import jax

    from gconv import rundir
    from gconv.config import expand_sweep, load_experiment
    from gconv.train import Stopped, preflight, train_and_evaluate

    if args.multiprocess:
        jax.distributed.initialize()
    config, sweep = load_experiment(args.config)
    runs = expand_sweep(config, sweep, overrides, args.point)
    for point, point_config in runs:  # every point's errors before any point trains
        try:
            preflight(point_config)
        except ValueError as e:
            raise ValueError(f"sweep point {point!r}: {e}") from e
    name = os.path.splitext(os.path.basename(args.config.partition(":")[0]))[0]
    suffix = args.config.partition(":")[2]
    workdir = rundir.as_path(args.workdir or os.path.join("runs", name + (f"_{suffix}" if suffix else "")))
    for point, point_config in runs:
        print(f"== {point} -> {workdir / point}", flush=True)
        try:
            train_and_evaluate(point_config, workdir / point)
        except Stopped as e:  # preempted (SIGTERM: 143) or interrupted (SIGINT: 130) after saving
            print(e, flush=True)
            return 128 + e.signum
    if jax.process_index() == 0:
        path = report.write_report(workdir)
        print(report.report_table(report.load_summaries(workdir)))
        print(f"wrote {path}")
    return 0


def run(argv: list[str]) -> int:
    """`main`, with every anticipated failure (bad config or value, missing data, a busy or damaged run directory,
    a NaN loss) as one `error: ...` line on stderr and exit code 2 instead of a traceback."""
    from gconv.rundir import RunDirError

    try:
        return main(argv)
    except (KeyError, ValueError, FileNotFoundError, FloatingPointError, ImportError, RunDirError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {message}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
