"""End-to-end training through launch.py: one-step CLI run, kill-and-resume equality, NaN stop, reports.
(SIGTERM/SIGINT and damaged run directories: test_faults.py.)"""
import json
import signal

import jax
import jax.numpy as jnp
import matplotlib.image
import numpy as np
import orbax.checkpoint as ocp
import pytest

from gconv import train
from gconv.config import base_config
from gconv.models import create_model
from gconv.train import read_metrics
from launcher import TINY, checkpoint_steps, launch, start, strip_timing, wait_until


@pytest.mark.parametrize("name", ["resnext11_2x10d", "shufflenet_g3_wd4"])
def test_train_state_starts_from_the_values_of_a_plain_init(name):
    """`create_train_state` compiles `model.init` with its own options; the values are those of `jit(model.init)`."""
    model = create_model(name, num_classes=10)
    tx, _ = train.create_optimizer(base_config().optim, 10, 100)
    seed = int(np.random.default_rng().integers(2**16))
    state = train.create_train_state(model, tx, (16, 16, 3), seed)
    init_rng, _ = jax.random.split(jax.random.PRNGKey(seed))
    plain = jax.jit(model.init)(init_rng, jnp.zeros((1, 16, 16, 3)))
    for got, want in zip(jax.tree.leaves((state.params, state.batch_stats)), jax.tree.leaves((plain["params"], plain["batch_stats"]))):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("devices", ["1", "-1"])  # -1: data parallel over the 8 simulated devices
def test_one_step_cli_run_writes_logs_config_and_report(tmp_path, devices):
    proc = launch(*TINY, "--workdir", str(tmp_path), "--config.num_steps=1", "--config.log_every_steps=1",
                  f"--config.mesh.data={devices}")
    run = tmp_path / "c2"
    assert json.loads((run / "config.json").read_text())["model"]["cardinality"] == 2
    records = read_metrics(run / "metrics.jsonl")
    assert records[0]["step"] == 1 and np.isfinite(records[0]["train_loss"])
    assert any("eval_top1_error" in r for r in records)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["model"] == "resnext11_2x10d" and summary["steps"] == 1
    assert "| c2 | resnext11_2x10d | 2 | 10 |" in proc.stdout  # the report table is printed
    assert (tmp_path / "report.md").exists()


RESUME = TINY + ["--config.num_steps=120", "--config.checkpoint_every_steps=10", "--config.log_every_steps=10",
                 "--config.eval_every_steps=50"]


def test_sigkill_and_relaunch_ends_with_the_metrics_of_an_uninterrupted_run(tmp_path):
    launch(*RESUME, "--workdir", str(tmp_path / "straight"))
    run = tmp_path / "killed" / "c2"
    proc = start(*RESUME, "--workdir", str(tmp_path / "killed"))
    wait_until(lambda: any(s >= 10 for s in checkpoint_steps(run)), proc, "a checkpoint at step >= 10")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "summary.json").exists(), "the run finished before it was killed"
    killed_at = max(checkpoint_steps(run))
    assert killed_at < 120
    launch(*RESUME, "--workdir", str(tmp_path / "killed"))
    straight = read_metrics(tmp_path / "straight" / "c2" / "metrics.jsonl")
    resumed = read_metrics(run / "metrics.jsonl")
    assert strip_timing(resumed) == strip_timing(straight)  # every logged loss, accuracy and eval metric, exactly
    s1 = json.loads((tmp_path / "straight" / "c2" / "summary.json").read_text())
    s2 = json.loads((run / "summary.json").read_text())
    assert s1["final_top1_error"] == s2["final_top1_error"] and s1["best_top1_error"] == s2["best_top1_error"]


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    proc = launch(*TINY, "--workdir", str(tmp_path), "--config.num_steps=50", "--config.optim.learning_rate=1e30",
                  "--config.checkpoint_every_steps=1", "--config.log_every_steps=1", check=False)
    assert proc.returncode != 0
    assert "non-finite training metrics" in proc.stderr and "at step" in proc.stderr, proc.stderr
    bad_step = int(proc.stderr.split("at step ")[1].split(".")[0])
    run = tmp_path / "c2"
    steps = checkpoint_steps(run)
    assert all(s < bad_step for s in steps)
    if steps:
        restored = ocp.StandardCheckpointer().restore((run / "checkpoints" / str(max(steps)) / "default").absolute())
        assert all(np.all(np.isfinite(np.asarray(x))) for x in __import__("jax").tree.leaves(restored))


def test_relaunch_with_another_config_refuses_before_touching_the_run(tmp_path):
    launch(*TINY, "--workdir", str(tmp_path), "--config.num_steps=2")
    before = (tmp_path / "c2" / "metrics.jsonl").read_text()
    proc = launch(*TINY, "--workdir", str(tmp_path), "--config.num_steps=2", "--config.optim.learning_rate=0.3",
                  check=False)
    assert proc.returncode != 0 and "different config" in proc.stderr and "optim" in proc.stderr
    assert (tmp_path / "c2" / "metrics.jsonl").read_text() == before


def test_resume_may_change_where_and_how_fast_but_not_what(tmp_path):
    config = base_config()
    (tmp_path / "checkpoints" / "10").mkdir(parents=True)  # a run that trained
    (tmp_path / "config.json").write_text(json.dumps(train._check_config(tmp_path, config)))
    config.data.num_workers, config.mesh.data, config.parallel = 1, 8, "pmap"
    train._check_config(tmp_path, config)  # input threads and placement: accepted
    config.data.batch_size = 32
    with pytest.raises(ValueError, match=r"top-level keys differing: \['data'\]"):
        train._check_config(tmp_path, config)


def test_unknown_override_on_the_command_line(tmp_path):
    proc = launch(*TINY, "--workdir", str(tmp_path), "--config.model.cardinalty=4", check=False)
    assert proc.returncode != 0
    assert "unknown config key 'model.cardinalty'" in proc.stderr and "model.cardinality" in proc.stderr
    assert not (tmp_path / "c2").exists()


def test_report_rebuilds_table_and_plots(tmp_path):
    launch("--config", "experiments/default.py:local", "--point", "c1", "--point", "c4", "--workdir", str(tmp_path),
           "--config.num_steps=3")
    for name in ("report.md", "error_vs_cardinality.png", "error_vs_mflops.png"):
        (tmp_path / name).unlink()
    proc = launch("report", str(tmp_path))
    table = (tmp_path / "report.md").read_text()
    assert "| c1 | resnext11_1x16d | 1 | 16 |" in table and "| c4 | resnext11_4x6d | 4 | 6 |" in table
    assert "c4" in proc.stdout
    assert "block-diag. score" in table and "## What the groups learn" in table
    pngs = ["error_vs_cardinality.png", "error_vs_mflops.png", "compute_breakdown.png", "c4/analysis/corr_stage1.png",
            "c4/analysis/kernels_by_group.png", "c4/analysis/first_layer.png"]
    for name in pngs:
        image = matplotlib.image.imread(tmp_path / name)
        assert image.shape[0] > 100 and float(image[..., :3].std()) > 0.01  # opens, and is not blank
    analyzed = launch("analyze", str(tmp_path / "c4"))
    assert "stage1/block0/conv_reduce -> stage1/block0/conv_group: block-diagonality" in analyzed.stdout
    assert "(chance 0.250)" in analyzed.stdout
    missing = launch("report", str(tmp_path / "nothing"), check=False)
    assert missing.returncode != 0 and "does not exist" in missing.stderr
