"""gconv's launcher: config in, `train_and_evaluate(config, workdir)` per sweep point, report out.

    python launch.py                                   # default experiment (digits cardinality ablation)
    python launch.py --config experiments/cifar10_resnext29.py:local --workdir runs/c10
    python launch.py --point c4 --config.optim.learning_rate=0.05
    python launch.py report WORKDIR                    # rebuild a sweep's report (--skip_analysis: tables, plots)
    python launch.py analyze RUN_DIR                   # filter correlations, kernel views, compute of one run
    python launch.py eval RUN_DIR --checkpoint best    # top-1/top-5 error and loss of a run's checkpoint
    python launch.py eval WEIGHTS.pth --model resnext50_32x4d --config EXP.py   # a PyTorch file on EXP's data
    python launch.py prepare --config EXP.py --config.data.data_dir=DIR   # download and prepare EXP's TFDS data
On a multi-process platform (TPU pod, multi-host GPU) add --multiprocess: `jax.distributed.initialize()` runs
first (from --coordinator_address/--num_processes/--process_id, the JAX_* variables, or the platform), only process
0 writes logs and reports, and every process waits for the report before it exits.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback

DEBUG_ENV = "GCONV_DEBUG"


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, dict[str, str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", default="train",
                        choices=["train", "report", "analyze", "eval", "prepare"])
    parser.add_argument("target", nargs="?", help="WORKDIR for `report`, RUN_DIR (WORKDIR/POINT) for `analyze`; "
                                                  "RUN_DIR or a .pth/.safetensors file for `eval`")
    parser.add_argument("--checkpoint", default="latest", help="eval/analyze: latest, best, or a step")
    parser.add_argument("--split", default="eval", choices=["eval", "train"], help="eval: the dataset split")
    parser.add_argument("--model", help="eval of a weights file: the registry name of its model")
    parser.add_argument("--config", default="experiments/default.py", help="PATH[:arg] of an experiment file")
    parser.add_argument("--workdir", default=None, help="default: runs/<experiment name>")
    parser.add_argument("--point", action="append", help="sweep point name or index (repeatable); default: all")
    parser.add_argument("--multiprocess", action="store_true",
                        help="join a multi-process run first (jax.distributed.initialize); see docs/scaling.md")
    parser.add_argument("--coordinator_address", help="HOST:PORT of process 0 (default: $JAX_COORDINATOR_ADDRESS)")
    parser.add_argument("--num_processes", help="number of processes (default: $JAX_NUM_PROCESSES)")
    parser.add_argument("--process_id", help="this process's index, 0..num_processes-1 (default: $JAX_PROCESS_ID)")
    parser.add_argument("--takeover", action="store_true",
                        help="take the run directory's lock from a holder whose host is gone (its heartbeat has not "
                             "yet aged 10 min); prints who held it")
    parser.add_argument("--skip_analysis", action="store_true",
                        help="train/report: write the report without analysing each run's filters (faster)")
    parser.add_argument("--debug", action="store_true",
                        help=f"show the full traceback of any error instead of one line (also: {DEBUG_ENV}=1)")
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

    if args.command in ("report", "analyze", "eval") and not args.target:
        raise SystemExit(f"usage: python launch.py {args.command} {'WORKDIR' if args.command == 'report' else 'RUN_DIR'}")
    from gconv import storage

    for path in (args.target, args.workdir):
        if path and storage.is_remote(path):  # one line now, not a failure in the middle of the work
            storage.check_credentials(path.split("://")[0])
    if args.command == "eval":
        return evaluate(args, overrides)
    if args.command == "prepare":
        return prepare(args, overrides)
    if args.command == "analyze":
        result = report.analyze_run(args.target, checkpoint=args.checkpoint)
        for pair in result["pairs"]:
            print(f"{pair['layer_a']} -> {pair['layer_b']}: block-diagonality {pair['score']:.3f} "
                  f"(chance {pair['chance']:.3f}) at {pair['blocks']} blocks; mean |corr| inside {pair['inside']:.3f}, "
                  f"outside {pair['outside']:.3f}")
        if result["first_layer"]["colour_scores"]:
            print(f"{result['first_layer']['layer']} colour score by group: " + ", ".join(
                f"{m:.2f} ± {sd:.2f}" for m, sd in result["first_layer"]["colour_scores"]))
        print(f"wrote {os.path.join(args.target, 'analysis')}")
        return 0
    if args.command == "report":
        path = report.write_report(args.target, analyze=not args.skip_analysis)
        print(report.results(report.load_summaries(args.target)))
        print(f"wrote {path}")
        return 0

    import jax

    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):  # a sweep's seeds (and relaunches) reuse compiled steps
        jax.config.update("jax_compilation_cache_dir", storage.cache_dir("xla"))
    from gconv.config import expand_sweep, load_experiment
    from gconv.preflight import preflight
    from gconv.members import group_runs
    from gconv.train import Stopped, train_members

    join(args)
    config, sweep = load_experiment(args.config)
    runs = expand_sweep(config, sweep, overrides, args.point)
    for point, point_config in runs:  # every point's errors before any point trains
        try:
            preflight(point_config)
        except ValueError as e:
            raise ValueError(f"sweep point {point!r}: {e}") from e
    name = os.path.splitext(os.path.basename(args.config.partition(":")[0]))[0]
    suffix = args.config.partition(":")[2]
    workdir = storage.as_path(args.workdir or os.path.join("runs", name + (f"_{suffix}" if suffix else "")))
    for group in group_runs(runs):  # runs that build the same shapes train as one program (gconv.members)
        names = [point for point, _ in group]
        print(f"== {names[0]} -> {workdir / names[0]}" if len(names) == 1 else
              f"== {', '.join(names)} -> {workdir}/ (one program, {len(names)} members)", flush=True)
        try:
            train_members([point_config for _, point_config in group], [workdir / point for point in names],
                          takeover=args.takeover)
        except Stopped as e:  # preempted (SIGTERM: 143) or interrupted (SIGINT: 130) after saving
            print(e, flush=True)
            return 128 + e.signum
    if jax.process_index() == 0:
        path = report.write_report(workdir, analyze=not args.skip_analysis)
        print(report.results(report.load_summaries(workdir)))
        print(f"wrote {path}")
    if jax.process_count() > 1:  # the others wait for the report, then all leave together
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("gconv: report written")
    return 0


def evaluate(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    """`launch.py eval`: a run directory's checkpoint with its own config, or a weights file on `--config`'s data."""
    from gconv import evaluation

    if args.model and not os.path.isfile(args.target):
        raise FileNotFoundError(f"no weights file at {args.target!r} (--model is for a .pth/.safetensors file; leave "
                                f"it out to evaluate a run directory).")
    if os.path.isfile(args.target):
        if not args.model:
            raise ValueError(f"eval of the weights file {args.target}: name its model, e.g. --model resnext50_32x4d.")
        from gconv.config import apply_overrides, load_experiment

        config, _ = load_experiment(args.config)
        config = apply_overrides(config.copy_and_resolve_references(), overrides)
        result = evaluation.evaluate_weights(args.target, args.model, config.data, args.split)
        what = f"{args.target} as {result['model']}"
    else:
        result = evaluation.evaluate_run(args.target, args.checkpoint, args.split)
        what = f"{args.target} ({result['model']}, checkpoint {result['step']})"
    print(f"{what} on the {result['split']} split ({result['images']} images): top-1 error "
          f"{result['eval_top1_error']:.2f}%, top-5 error {result['eval_top5_error']:.2f}%, loss {result['eval_loss']:.4f}")
    classes = result["classes"]
    shown = sorted(classes, key=lambda c: -c[1])[:10] if len(classes) > 50 else classes
    print(f"top-1 error by class{f' (the 10 worst of {len(classes)})' if len(classes) > 50 else ''}: "
          + ", ".join(f"{name} {error:.1f}% ({images})" for name, error, images in shown))
    return 0


def join(args: argparse.Namespace) -> bool:
    """Joins a multi-process run when the flags or the environment ask for one (`jax.distributed.initialize`);
    whether this is one."""
    if not (args.multiprocess or args.coordinator_address or args.num_processes or args.process_id):
        return False
    import jax

    given = distributed_args(args, os.environ)
    try:
        jax.distributed.initialize(**given)
    except (ValueError, RuntimeError) as e:
        if given:
            raise
        raise ValueError(f"--multiprocess: JAX found no cluster to join ({str(e).strip()[:200]}): pass "
                         f"--coordinator_address=HOST:PORT --num_processes=N --process_id=I.") from e
    return jax.process_count() > 1


def prepare(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    """`launch.py prepare`: downloads and prepares the data of every point of `--config` (once per dataset). In a
    multi-process run process 0 prepares (into the shared `data_dir`, a bucket on a pod) and the others wait."""
    from gconv import data
    from gconv.config import expand_sweep, load_experiment

    config, sweep = load_experiment(args.config)
    datas = {}
    for _, point_config in expand_sweep(config, sweep, overrides, args.point):
        d = point_config.data
        datas.setdefault((d.name, d.get("data_dir"), d.get("path")), d)
    def prepare_all():
        for d in datas.values():
            print(data.prepare(d), flush=True)

    if not join(args):
        prepare_all()
        return 0
    import jax

    from gconv import coordination

    client, key, day_ms = coordination.client(), "gconv/prepare", 24 * 3600 * 1000
    if jax.process_index() == 0:
        try:
            prepare_all()
        except Exception as e:
            client.key_value_set(key, f"{type(e).__name__}: {e}")
            client.wait_at_barrier("gconv_prepared", day_ms)  # the others read it before the coordinator leaves
            raise
        client.key_value_set(key, "ok")
        client.wait_at_barrier("gconv_prepared", day_ms)
    else:
        said = client.blocking_key_value_get(key, day_ms)
        client.wait_at_barrier("gconv_prepared", day_ms)
        if said != "ok":
            raise FileNotFoundError(f"process 0 could not prepare the data: {said}")
        print(f"process {jax.process_index()}: process 0 prepared the data", flush=True)
    return 0


def distributed_args(args: argparse.Namespace, environ) -> dict:
    """Arguments of `jax.distributed.initialize` from the flags, else `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`
    and `JAX_PROCESS_ID`; none of them given: `{}`, leaving detection to JAX (TPU pods, SLURM, Open MPI)."""
    values = {"coordinator_address": args.coordinator_address or environ.get("JAX_COORDINATOR_ADDRESS"),
              "num_processes": args.num_processes or environ.get("JAX_NUM_PROCESSES"),
              "process_id": args.process_id or environ.get("JAX_PROCESS_ID")}
    given = {k: v for k, v in values.items() if v not in (None, "")}
    if not given:
        return {}
    missing = [k for k in values if k not in given]
    if missing:
        raise ValueError(f"multi-process launch: {', '.join(missing)} not given (with {', '.join(given)} set): pass "
                         f"--coordinator_address=HOST:PORT --num_processes=N --process_id=I, or set "
                         f"JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID, or none of them on a "
                         f"platform JAX detects (TPU pod, SLURM, Open MPI).")
    host, _, port = given["coordinator_address"].rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"coordinator_address={given['coordinator_address']!r} is not HOST:PORT "
                         f"(e.g. --coordinator_address=10.0.0.2:1234).")
    try:
        count, index = int(given["num_processes"]), int(given["process_id"])
    except ValueError:
        raise ValueError(f"num_processes={given['num_processes']!r} and process_id={given['process_id']!r} must be "
                         f"integers (e.g. --num_processes=2 --process_id=0).") from None
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"process_id={index} with num_processes={count}: need num_processes >= 1 and "
                         f"0 <= process_id < num_processes.")
    return {"coordinator_address": given["coordinator_address"], "num_processes": count, "process_id": index}


def run(argv: list[str]) -> int:
    """`main`, with every anticipated failure (bad config or value, missing data, a busy or damaged run directory,
    a NaN loss) as one `error: ...` line on stderr and exit code 2 instead of a traceback. `--debug` (or
    `GCONV_DEBUG=1`) re-raises instead, with the whole traceback: for a bug in a model or experiment under
    development. In a multi-process run, any failure of one process ends every process at once, each naming the
    process that failed first."""
    from gconv.storage import RunDirError

    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        return main(argv)
    except (KeyError, ValueError, FileNotFoundError, FloatingPointError, ImportError, RunDirError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        if _multiprocess():
            if debug:
                traceback.print_exc()
            _leave_together(f"{message}", 2)
        if debug:
            raise
        print(f"error: {message} (--debug or {DEBUG_ENV}=1 shows the traceback)", file=sys.stderr, flush=True)
        return 2
    except Exception as e:
        if not _multiprocess():
            raise
        traceback.print_exc()
        _leave_together(f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}", 1)


def _multiprocess() -> bool:
    jax = sys.modules.get("jax")
    return jax is not None and jax.distributed.is_initialized() and jax.process_count() > 1


def _leave_together(message: str, code: int) -> None:
    """Ends this process of a multi-process run at once, with one line naming the process that failed first.

    The failure is announced through the coordination service's key-value store; a process whose collective broke
    because another one left reads who it was. Exiting at once (without JAX's shutdown barrier) breaks the others'
    collectives in turn, instead of leaving them to a heartbeat timeout.
    """
    import jax

    from gconv import coordination

    me, client = jax.process_index(), coordination.client()
    failed, coordinator_gone = {}, False
    try:
        failed = {int(k.rsplit("/", 1)[1]): v for k, v in client.key_value_dir_get("gconv/failed/")}
        if not failed:
            client.key_value_set(f"gconv/failed/{me}", message)
    except Exception:  # the coordination service left with process 0
        coordinator_gone = True
    first = min(failed) if failed else me
    if coordinator_gone and me != 0:
        line = f"error: process {me} of {jax.process_count()} stops because process 0 (the coordinator) is gone: " \
               f"see its log. Here: {message}"
    elif first == me:
        line = f"error: process {me} of {jax.process_count()} failed first (no other process reported an error): " \
               f"{message}"
    else:
        line = f"error: process {me} of {jax.process_count()} stops because process {first} failed: {failed[first]}"
    print(line, file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
