"""Faults a real cluster produces, each reproduced: bad values and failed starts, busy and damaged run directories,
preemption, torn files."""
import json
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from gconv.metrics_log import read_metrics
from conftest import RESUME, TINY, TRAINED_TINY, has_content, launch, start, strip_timing, wait_until


@pytest.mark.parametrize("override,key", [
    ("--config.data.eval_batch_size=0", "data.eval_batch_size"),
    ("--config.data.batch_size=0", "data.batch_size"),
    ("--config.data.batch_size=4096", "data.batch_size"),
    ("--config.log_every_steps=0", "log_every_steps"),
    ("--config.checkpoint_every_steps=0", "checkpoint_every_steps"),
    ("--config.model.cardinality=0", "model.cardinality"),
    ("--config.model.dtype=float77", "model.dtype"),
    ("--config.optim.name=adam2", "optim.name"),
    ("--config.optim.learning_rate=nan", "optim.learning_rate"),
    ("--config.optim.learning_rate=ten", "optim.learning_rate"),
    ("--config.data.name=no_such_dataset", "data.name"),
    ("--config.data.name=cifar10", "data_dir"),  # not prepared: says how to prepare it
    ("--config.storage_timeout_s=0", "storage_timeout_s"),
    ("--config.data.worker_processes=-1", "data.worker_processes"),
])
def test_bad_values_stop_in_one_line_before_the_run_directory_is_touched(cli, tmp_path, capsys, override, key):
    code = cli(*TINY, "--workdir", str(tmp_path / "w"), override, f"--config.data.data_dir={tmp_path / 'tfds'}")
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and key in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "w").exists()


def test_debug_shows_the_traceback_of_an_error_in_a_users_own_experiment(cli, tmp_path, capsys, monkeypatch):
    """An error raised in code under development (here an experiment file's `get_config`): one line naming the flag
    by default; with `--debug` or `GCONV_DEBUG=1`, the exception itself with the frame that raised it."""
    experiment = tmp_path / "mine.py"
    experiment.write_text("def get_config(arg=None):\n    return {}['optim']  # a bug in the user's own code\n")
    args = ["--config", str(experiment), "--workdir", str(tmp_path / "w")]
    assert cli(*args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: optim") and "--debug" in err and "GCONV_DEBUG=1" in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    for debug in (["--debug"], []):
        if not debug:
            monkeypatch.setenv("GCONV_DEBUG", "1")
        with pytest.raises(KeyError, match="optim") as raised:
            cli(*args, *debug)
        assert raised.traceback[-1].path == experiment and raised.traceback[-1].name == "get_config"
    monkeypatch.setenv("GCONV_DEBUG", "0")  # off again: one line
    assert cli(*args) == 2 and capsys.readouterr().err.startswith("error: optim")
    assert not (tmp_path / "w").exists()


def test_unknown_variant_and_unreadable_init_from(cli, tmp_path, capsys, rng):
    assert cli("--config", "experiments/default.py:loacl", "--workdir", str(tmp_path / "w")) == 2
    assert "no variant 'loacl'" in capsys.readouterr().err and not (tmp_path / "w").exists()
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(rng.bytes(4096))
    assert cli(*TINY, "--workdir", str(tmp_path / "w"), f"--config.init_from={junk}") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "init_from=" in err and "cannot be read" in err and not (tmp_path / "w").exists()


def test_failed_start_does_not_block_the_corrected_relaunch(cli, tmp_path, capsys):
    workdir = tmp_path / "w"
    (workdir / "c2").mkdir(parents=True)  # what an older, failed start left: a config.json and nothing trained
    (workdir / "c2" / "config.json").write_text(json.dumps({"data": {"name": "cifar10"}}))
    assert cli(*TINY, "--workdir", str(workdir), "--config.num_steps=2") == 0
    assert json.loads((workdir / "c2" / "config.json").read_text())["data"]["name"] == "digits"


def test_finished_run_relaunch_keeps_its_summary_as_strict_json(cli, tmp_path, trained_tiny):
    shutil.copytree(trained_tiny, tmp_path, dirs_exist_ok=True)
    args = [*TINY, *TRAINED_TINY, "--workdir", str(tmp_path)]
    before = (tmp_path / "c2" / "summary.json").read_text()
    assert cli(*args) == 0
    after = (tmp_path / "c2" / "summary.json").read_text()
    assert before == after
    summary = json.loads(after, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert summary["img_per_sec"] is not None and summary["img_per_sec"] > 0


def _corrupt_newest(run: Path) -> int:
    step = max(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    files = [p for p in (run / "checkpoints" / str(step)).rglob("*") if p.is_file() and p.parent.name == "d"]
    assert files, "no data files found in the checkpoint"
    for p in files:  # a copy cut short by preemption
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    return step


# orbax's threads, finding their event loop closed after the failed restore, must not print a traceback either
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_corrupt_newest_checkpoint_falls_back_and_resumes_exactly(cli, tmp_path, capsys, trained_tiny):
    args = [*TINY, *TRAINED_TINY]
    shutil.copytree(trained_tiny, tmp_path / "damaged")  # the straight run stays as it is: trained_tiny
    run = tmp_path / "damaged" / "c2"
    bad = _corrupt_newest(run)
    (run / "summary.json").unlink()
    capsys.readouterr()
    assert cli(*args, "--workdir", str(tmp_path / "damaged")) == 0
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if line.startswith("warning: checkpoint")]
    assert len(warnings) == 1 and f"step {bad}" in warnings[0] and "unreadable" in warnings[0], out
    assert (run.parent / "c2" / "checkpoints_unreadable" / str(bad)).exists()  # set aside, not deleted
    assert strip_timing(read_metrics(run / "metrics.jsonl")) == strip_timing(read_metrics(trained_tiny / "c2/metrics.jsonl"))
    _corrupt_newest(run)  # report and analyze fall back too, in one line each
    assert cli("analyze", str(run)) == 0
    out = capsys.readouterr().out
    assert sum(line.startswith("warning: checkpoint") for line in out.splitlines()) == 1
    assert "block-diagonality" in out and "Traceback" not in out


@pytest.mark.slow
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_the_fallback_stays_quiet_under_load(cli, tmp_path, capsys, trained_tiny):
    """The relaunch onto a damaged newest checkpoint, 10 times with both cores busy (two spinning processes beside
    it, so orbax's and tensorstore's threads are scheduled late): each exits 0 with one warning line, no
    traceback, and the uninterrupted run's metrics."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        for i in range(10):
            shutil.copytree(trained_tiny, tmp_path / str(i))
            run = tmp_path / str(i) / "c2"
            bad = _corrupt_newest(run)
            (run / "summary.json").unlink()
            assert cli(*TINY, *TRAINED_TINY, "--workdir", str(tmp_path / str(i))) == 0
            out, err = capsys.readouterr()
            warnings = [line for line in out.splitlines() if line.startswith("warning: checkpoint")]
            assert len(warnings) == 1 and f"step {bad}" in warnings[0], (i, out)
            assert "Traceback" not in out + err and "exception was never retrieved" not in out + err, (i, out, err)
            assert strip_timing(read_metrics(run / "metrics.jsonl")) == \
                strip_timing(read_metrics(trained_tiny / "c2/metrics.jsonl"))
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


@pytest.mark.slow
def test_second_launch_is_refused_and_a_dead_holder_is_taken_over(cli, tmp_path, capsys):
    args = [*TINY, "--workdir", str(tmp_path), "--config.num_steps=40", "--config.checkpoint_every_steps=10",
            "--config.log_every_steps=5"]
    first = start(*args)
    wait_until(lambda: has_content(tmp_path / "c2" / "metrics.jsonl"), first, "the first metrics")
    assert cli(*args) == 2
    err = capsys.readouterr().err
    assert f"is in use by pid {first.pid} on {socket.gethostname()}" in err and len(err.strip().splitlines()) == 1
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert cli(*args) == 0
    assert "taking over the lock" in capsys.readouterr().out
    steps = [r["step"] for r in read_metrics(tmp_path / "c2" / "metrics.jsonl") if "train_loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 40  # no record twice, none out of order
    assert not (tmp_path / "c2" / "lock.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_then_resume_equals_an_uninterrupted_run(tmp_path, straight_run, sig, code):
    args = [*TINY, *RESUME]
    run = tmp_path / "stopped" / "c2"
    proc = start(*args, "--workdir", str(tmp_path / "stopped"))
    wait_until(lambda: has_content(run / "metrics.jsonl"), proc, "the first metrics")
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == code, out
    assert f"{signal.Signals(sig).name}: saved checkpoint at step" in out
    with (run / "metrics.jsonl").open("a") as f:  # and a torn line, as a write cut short leaves it
        f.write('{"step": 999, "train_lo')
    resumed = launch(*args, "--workdir", str(tmp_path / "stopped"))
    assert "torn last line" in resumed.stderr
    straight = read_metrics(straight_run / "c2" / "metrics.jsonl")
    assert strip_timing(read_metrics(run / "metrics.jsonl")) == strip_timing(straight)


def test_metrics_with_a_damaged_middle_line_refuse_to_load(tmp_path):
    """Only a torn *last* line is what a cut-short write leaves: it is dropped with a warning. Damage anywhere else
    means the file was changed by something else; dropping what follows would silently lose records, so it raises
    `RunDirError` naming the file and line."""
    from gconv.storage import RunDirError, as_path, read_jsonl

    path = tmp_path / "metrics.jsonl"
    records = [{"step": s, "train_loss": 1.0 / s} for s in (1, 2, 3)]
    good = "".join(json.dumps(r) + "\n" for r in records)
    path.write_text(good + '{"step": 4, "train_lo')
    with pytest.warns(UserWarning, match="torn last line"):
        assert read_jsonl(as_path(path)) == records
    lines = good.splitlines()
    path.write_text("\n".join([lines[0], lines[1][:9], lines[2]]) + "\n")
    with pytest.raises(RunDirError, match=r"metrics.jsonl line 2 is not valid JSON"):
        read_jsonl(as_path(path))
