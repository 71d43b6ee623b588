"""End-to-end training through launch.py: one-step CLI run, kill-and-resume equality, NaN stop, reports.
(SIGTERM/SIGINT and damaged run directories: test_faults.py.)"""
import json
import shutil
import signal

import jax
import jax.numpy as jnp
import matplotlib.image
import numpy as np
import orbax.checkpoint as ocp
import pytest

from gconv import checkpoints, storage, train
from gconv.config import base_config, check_config
from gconv.models import create_model
from gconv.metrics_log import read_metrics
from conftest import (RESUME, ROOT, TINY, TRAINED_TINY, checkpoint_steps, launch, start, strip_timing, tiered,
                      wait_until)


@pytest.mark.parametrize("name", tiered(["resnext11_2x10d", "shufflenet_g3_wd4"], fast=["shufflenet_g3_wd4"]))
def test_train_state_starts_from_the_values_of_a_plain_init(name, rng):
    """`create_train_state` compiles `model.init` with its own options (LLVM -O1); the values are those of
    `jit(model.init)` at full optimisation, as a plain `jit` compiles it outside the tests (whose XLA_FLAGS lower it
    to -O0, see conftest.py)."""
    shallow = dict(stage_sizes=(1, 1, 1)) if name.startswith("shufflenet") else {}  # one unit a stage: compiles fast
    model = create_model(name, num_classes=10, **shallow)
    tx, _ = train.create_optimizer(base_config().optim, 10, 100)
    seed = int(rng.integers(2**16))
    state = train.create_train_state(model, tx, (16, 16, 3), seed)
    init_rng, _ = jax.random.split(jax.random.PRNGKey(seed))
    x = jnp.zeros((1, 16, 16, 3))
    plain = jax.jit(model.init).lower(init_rng, x).compile({"xla_backend_optimization_level": 3})(init_rng, x)
    for got, want in zip(jax.tree.leaves((state.params, state.batch_stats)), jax.tree.leaves((plain["params"], plain["batch_stats"]))):
        np.testing.assert_array_equal(got, want)


def _scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    """The scalars of the TensorBoard event files in `log_dir`: `{tag: [(step, value), ...]}` (TFRecord framing:
    length, its CRC, the event, its CRC)."""
    import struct

    from tensorboardX.proto import event_pb2

    found: dict[str, list] = {}
    for path in sorted(log_dir.glob("events.out.tfevents.*")):
        data, at = path.read_bytes(), 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            event = event_pb2.Event.FromString(data[at + 12:at + 12 + length])
            at += 16 + length
            for value in event.summary.value:
                found.setdefault(value.tag, []).append((event.step, value.simple_value))
    return found


@pytest.mark.slow
def test_train_and_evaluate_in_process_on_mock_cifar10(tmp_path):
    """The loop itself, called as a library (flax's train_test): TFDS mock data, the CIFAR experiment's local variant,
    one sweep point. Checks its logs, TensorBoard events, profile trace, best checkpoint and `eval`; then a resume
    from an earlier checkpoint rebuilds the same events, and a finished run returns its summary untouched."""
    import tensorflow_datasets as tfds

    from gconv import evaluation
    from gconv.config import expand_sweep, load_experiment

    config, sweep = load_experiment(str(ROOT / "experiments" / "cifar10_resnext29.py:local"))
    [(point, config)] = expand_sweep(config, sweep, {"data.name": "cifar10", "mesh.data": 1, "profile_steps": "2,3"},
                                   ["c4"])
    run = tmp_path / point
    with tfds.testing.mock_data(num_examples=48):
        summary = train.train_and_evaluate(config, run)
        records = read_metrics(run / "metrics.jsonl")
        assert [r["step"] for r in records if "train_loss" in r] == [2, 4]
        evals = {r["step"]: r for r in records if "eval_top1_error" in r}
        assert sorted(evals) == [2, 4] and all(0 <= r["eval_top5_error"] <= r["eval_top1_error"] for r in evals.values())
        assert all(np.isfinite(r.get("train_loss", 0.0)) for r in records)
        assert summary["model"] == "resnext11_4x6d" and summary["fields"] == {"cardinality": 4, "width d": 6}
        assert summary["final_top1_error"] == evals[4]["eval_top1_error"]
        best = min(evals, key=lambda s: (evals[s]["eval_top1_error"], -s))
        assert summary["best_step"] == best and checkpoint_steps(run) == [2, 4]
        events = _scalars(run / "tensorboard")
        assert [s for s, _ in events["train/loss"]] == [2, 4] and [s for s, _ in events["eval/top1_error"]] == [2, 4]
        np.testing.assert_allclose([v for _, v in events["train/loss"]],
                                   [r["train_loss"] for r in records if "train_loss" in r],
                                   rtol=2.0 ** -24)  # TensorBoard stores float32: one rounding of the JSON value
        assert list((run / "profile").rglob("*.xplane.pb")), "no profiler trace of steps 2-3"
        scored = evaluation.evaluate_run(run, "best")
        assert scored["step"] == best and scored["eval_top1_error"] == pytest.approx(evals[best]["eval_top1_error"])
        assert scored["eval_top5_error"] == pytest.approx(evals[best]["eval_top5_error"])
        (run / "summary.json").unlink()  # resume from step 2: the events are made anew, each step once
        shutil.rmtree(run / "checkpoints" / "4")
        train.train_and_evaluate(config, run)
        again = _scalars(run / "tensorboard")
        assert [s for s, _ in again["train/loss"]] == [2, 4] and [s for s, _ in again["eval/top1_error"]] == [2, 4]
        summary = json.loads((run / "summary.json").read_text())
        assert train.train_and_evaluate(config, run) == summary  # finished: kept as it is


@pytest.mark.parametrize("devices", tiered(["1", "-1"], fast=["-1"]))  # -1: data parallel over the 8 devices
def test_one_step_cli_run_writes_logs_config_and_report(cli, capsys, tmp_path, devices):
    assert cli(*TINY, "--workdir", str(tmp_path), "--config.num_steps=1", "--config.log_every_steps=1",
               f"--config.mesh.data={devices}") == 0
    out = capsys.readouterr().out
    run = tmp_path / "c2"
    assert json.loads((run / "config.json").read_text())["model"]["cardinality"] == 2
    records = read_metrics(run / "metrics.jsonl")
    assert records[0]["step"] == 1 and np.isfinite(records[0]["train_loss"])
    assert any("eval_top1_error" in r for r in records)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["model"] == "resnext11_2x10d" and summary["steps"] == 1 and summary["family"] == "resnext"
    assert "| c2 | resnext11_2x10d | 2 | 10 |" in out  # the report table is printed
    assert (tmp_path / "report.md").exists()
    # the final evaluation's error by class: its image-weighted mean is the top-1 error (each rounded to 1e-4)
    from gconv import data

    by_class = summary["final_top1_error_by_class"]
    labels = data.get_source(base_config().data, "eval")[0].labels
    counts = np.bincount(labels, minlength=10)
    assert list(by_class) == [str(c) for c in range(10)]  # digits name no classes: by index
    weighted = sum(counts[int(c)] * e for c, e in by_class.items()) / counts.sum()
    assert abs(weighted - summary["final_top1_error"]) < 1e-3
    assert "## Top-1 error by class" in (tmp_path / "report.md").read_text()
    assert sum("eval_top1_error_by_class" in r for r in records) == 1  # in the final evaluation's record only


@pytest.mark.slow
def test_sigkill_and_relaunch_ends_with_the_metrics_of_an_uninterrupted_run(tmp_path, straight_run):
    args = [*TINY, *RESUME, "--workdir", str(tmp_path / "killed")]
    run = tmp_path / "killed" / "c2"
    proc = start(*args)
    wait_until(lambda: any(s >= 10 for s in checkpoint_steps(run)), proc, "a checkpoint at step >= 10")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "summary.json").exists(), "the run finished before it was killed"
    killed_at = max(checkpoint_steps(run))
    assert killed_at < 120
    launch(*args)
    straight = read_metrics(straight_run / "c2" / "metrics.jsonl")
    resumed = read_metrics(run / "metrics.jsonl")
    assert strip_timing(resumed) == strip_timing(straight)  # every logged loss, accuracy and eval metric, exactly
    s1 = json.loads((straight_run / "c2" / "summary.json").read_text())
    s2 = json.loads((run / "summary.json").read_text())
    assert s1["final_top1_error"] == s2["final_top1_error"] and s1["best_top1_error"] == s2["best_top1_error"]


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(cli, capsys, tmp_path):
    assert cli(*TINY, "--workdir", str(tmp_path), "--config.num_steps=50", "--config.optim.learning_rate=1e30",
               "--config.checkpoint_every_steps=1", "--config.log_every_steps=1") == 2
    err = capsys.readouterr().err
    assert "non-finite training metrics" in err and "at step" in err, err
    bad_step = int(err.split("at step ")[1].split(".")[0])
    run = tmp_path / "c2"
    steps = checkpoint_steps(run)
    assert all(s < bad_step for s in steps)
    if steps:
        restored = ocp.StandardCheckpointer().restore((run / "checkpoints" / str(max(steps)) / "default").absolute())
        assert all(np.all(np.isfinite(np.asarray(x))) for x in __import__("jax").tree.leaves(restored))


def test_relaunch_with_another_config_refuses_before_touching_the_run(cli, capsys, tmp_path, trained_tiny):
    shutil.copytree(trained_tiny, tmp_path, dirs_exist_ok=True)
    before = (tmp_path / "c2" / "metrics.jsonl").read_text()
    assert cli(*TINY, *TRAINED_TINY, "--workdir", str(tmp_path), "--config.optim.learning_rate=0.3") == 2
    err = capsys.readouterr().err
    assert "different config" in err and "optim.learning_rate" in err, err
    assert (tmp_path / "c2" / "metrics.jsonl").read_text() == before


def test_resume_may_change_where_and_how_fast_but_not_what(tmp_path):
    config = base_config()
    (tmp_path / "checkpoints" / "10").mkdir(parents=True)  # a run that trained
    as_json = lambda c: json.loads(c.to_json_best_effort())  # noqa: E731
    (tmp_path / "config.json").write_text(json.dumps(as_json(config)))
    config.data.num_workers, config.mesh.data, config.parallel = 1, 8, "pmap"
    check_config(storage.as_path(tmp_path), as_json(config))  # input threads and placement: accepted
    config.data.batch_size = 32
    with pytest.raises(ValueError, match=r"keys differing: \['data.batch_size'\]"):
        check_config(storage.as_path(tmp_path), as_json(config))
    config.data.batch_size = base_config().data.batch_size
    old = as_json(base_config())
    del old["data"]["crop_size"], old["paper_top5_error"]  # a run written before gconv had these keys
    (tmp_path / "config.json").write_text(json.dumps(old))
    check_config(storage.as_path(tmp_path), as_json(config))  # new keys at their defaults: accepted
    config.data.crop_size = 227
    with pytest.raises(ValueError, match=r"keys differing: \['data.crop_size'\]"):
        check_config(storage.as_path(tmp_path), as_json(config))


def test_unknown_override_on_the_command_line(cli, capsys, tmp_path):
    assert cli(*TINY, "--workdir", str(tmp_path), "--config.model.cardinalty=4") == 2
    err = capsys.readouterr().err
    assert "unknown config key 'model.cardinalty'" in err and "model.cardinality" in err
    assert not (tmp_path / "c2").exists()


@pytest.mark.slow
def test_report_rebuilds_table_and_plots(tmp_path):
    launch("--config", "experiments/default.py:local", "--point", "c1", "--point", "c4", "--workdir", str(tmp_path),
           "--config.num_steps=3")
    for name in ("report.md", "error_vs_cardinality.png", "error_vs_mmacs.png"):
        (tmp_path / name).unlink()
    proc = launch("report", str(tmp_path))
    table = (tmp_path / "report.md").read_text()
    assert "| c1 | resnext11_1x16d | 1 | 16 |" in table and "| c4 | resnext11_4x6d | 4 | 6 |" in table
    assert "c4" in proc.stdout
    assert "block-diag. score" in table and "## What the groups learn" in table
    pngs = ["error_vs_cardinality.png", "error_vs_mmacs.png", "compute_breakdown.png", "c4/analysis/corr_stage1.png",
            "c4/analysis/kernels_by_group.png", "c4/analysis/first_layer.png"]
    for name in pngs:
        image = matplotlib.image.imread(tmp_path / name)
        assert image.shape[0] > 100 and float(image[..., :3].std()) > 0.01  # opens, and is not blank
    analyzed = launch("analyze", str(tmp_path / "c4"))
    assert "stage1/block0/conv_reduce -> stage1/block0/conv_group: block-diagonality" in analyzed.stdout
    assert "(chance 0.250)" in analyzed.stdout
    missing = launch("report", str(tmp_path / "nothing"), check=False)
    assert missing.returncode != 0 and "does not exist" in missing.stderr


def test_progress_prints_a_line_per_interval_when_not_on_a_terminal():
    import io

    from gconv.progress import Progress

    stream = io.StringIO()  # a batch job's log: no TTY
    progress = Progress("c4", 0, 10, interval=0.0, stream=stream)
    for step in range(1, 4):
        progress.update(step, batch_size=64)
    progress.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and lines[-1].startswith("c4 step 3/10: ") and "img/s" in lines[-1]
    assert "ETA" in lines[-1] and "?" not in lines[-1]
    quiet = io.StringIO()
    Progress("c4", 0, 10, enabled=False, interval=0.0, stream=quiet).update(1, 64)  # not process 0: silent
    assert quiet.getvalue() == ""


def test_checkpoints_keep_the_newest_and_the_best(tmp_path):
    """Orbax's preservation policy as gconv sets it: with keep_checkpoints=1, the newest and the lowest-error one
    survive; `choose_checkpoint` finds them by name."""
    import orbax.checkpoint as ocp

    errors = {2: 5.0, 4: 1.0, 6: 3.0, 8: 4.0}
    manager = ocp.CheckpointManager(tmp_path / "checkpoints", options=checkpoints.checkpoint_options(1))
    for step in (1, 2, 3, 4, 5, 6, 7, 8):  # odd steps: saved without an evaluation
        manager.save(step, args=ocp.args.StandardSave({"w": np.full(2, step)}),
                     metrics={"eval_top1_error": errors[step]} if step in errors else None)
    manager.wait_until_finished()
    assert checkpoint_steps(tmp_path) == [4, 8]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "eval_top1_error": e}) + "\n"
                                                    for s, e in errors.items()))
    run = storage.as_path(tmp_path)
    assert checkpoints.choose_checkpoint(run, "best") == 4 and checkpoints.choose_checkpoint(run, "latest") == 8
    assert checkpoints.choose_checkpoint(run, "8") == 8
    with pytest.raises(ValueError, match=r"checkpoint '6' is not in .*: use latest, best or one of the steps \[4, 8\]"):
        checkpoints.choose_checkpoint(run, "6")
