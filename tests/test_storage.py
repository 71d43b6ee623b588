"""A run directory on object storage: `--workdir gs://...` against a local GCS emulator (fake-gcs-server), trained,
stopped by SIGTERM, resumed from the checkpoint in the bucket, reported and relaunched once finished; a store that
stops answering (paused, then resumed or killed) ends the run in one line within `storage_timeout_s`."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, TINY, launch, start, wait_until
from gcs_emulator import BUCKET, Emulator, list_objects, read_object

pytestmark = pytest.mark.slow  # starts a storage emulator and trains through it


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """An emulator shared by the module's tests (each uses its own folder of the bucket): its environment."""
    emulator = Emulator(tmp_path_factory.mktemp("gcs"))
    yield emulator.env
    emulator.close()


@pytest.fixture
def own_gcs(tmp_path):
    """An emulator of this test's own, to pause or kill."""
    emulator = Emulator(tmp_path)
    yield emulator
    emulator.close()


def _quiet(out: str) -> None:
    """No warning of gcsfs (each request used to repeat one) and no credentials message: an emulator needs none."""
    assert "gcsfs" not in out and "WARNING" not in out and "credentials" not in out.lower(), out


def test_gs_workdir_trains_stops_resumes_and_reports(gcs):
    workdir = f"gs://{BUCKET}/run"
    args = [*TINY, "--workdir", workdir, "--config.num_steps=60", "--config.log_every_steps=2",
            "--config.checkpoint_every_steps=1000", "--config.eval_every_steps=1000"]
    proc = start(*args, env=gcs)
    wait_until(lambda: list_objects(gcs, "run/c2/metrics.parts/"), proc, "metrics in the bucket")
    assert read_object(gcs, "run/c2/lock.json") is not None  # the lock lives in the bucket too
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 143, out
    _quiet(out)
    saved = int(out.split("SIGTERM: saved checkpoint at step ")[1].split()[0].rstrip(".;,"))
    assert 0 < saved < 60
    assert any(name.startswith(f"run/c2/checkpoints/{saved}/") for name in list_objects(gcs, "run/c2/checkpoints/"))
    assert not (ROOT / "gs:").exists()  # no local folder named after the URL

    resumed = launch(*args, env=gcs)
    assert f"c2: resuming at step {saved} from {workdir}/c2/checkpoints/{saved}" in resumed.stdout, resumed.stdout
    _quiet(resumed.stdout + resumed.stderr)
    metrics = read_object(gcs, "run/c2/metrics.jsonl")
    records = [json.loads(line) for line in metrics.decode().splitlines()]
    steps = [r["step"] for r in records if "train_loss" in r]
    assert steps == list(range(2, 61, 2))  # each logged step once, in order, across the two sessions
    assert list_objects(gcs, "run/c2/metrics.parts/") == []  # folded into metrics.jsonl when the run ended
    assert json.loads(read_object(gcs, "run/c2/summary.json"))["steps"] == 60
    assert read_object(gcs, "run/c2/lock.json") is None  # released
    assert b"| c2 | resnext11_2x10d |" in read_object(gcs, "run/report.md")
    assert read_object(gcs, "run/error_vs_cardinality.png")[:4] == b"\x89PNG"

    again = launch(*args, env=gcs)  # a finished run, relaunched: kept as it is, the report written again
    assert "c2: already trained to step 60; its summary is kept." in again.stdout, again.stdout
    assert read_object(gcs, "run/c2/metrics.jsonl") == metrics and read_object(gcs, "run/c2/lock.json") is None
    assert b"| c2 | resnext11_2x10d |" in read_object(gcs, "run/report.md")


STALL = 8  # seconds: the storage limit of the stall tests


def _stall(emulator: Emulator, how: str) -> tuple[list[str], float, list]:
    """Trains on `emulator`, pauses it (SIGSTOP) once the checkpoint at step 20 is in the bucket (then kills it
    when `how` is "kill"), and returns the run's lines, the seconds it took to end and the launch's arguments."""
    args = [*TINY, "--workdir", f"gs://{BUCKET}/run", "--config.num_steps=60", "--config.log_every_steps=2",
            "--config.checkpoint_every_steps=10", "--config.eval_every_steps=1000",
            f"--config.storage_timeout_s={STALL}"]
    proc = start(*args, env=emulator.env)
    wait_until(lambda: read_object(emulator.env, "run/c2/checkpoints/20/commit_success.txt"), proc, "checkpoint 20")
    paused = time.monotonic()
    emulator.server.send_signal(signal.SIGSTOP)
    if how == "kill":
        emulator.server.kill()
    proc.wait(timeout=300)
    waited = time.monotonic() - paused
    lines = proc.output().splitlines()
    assert proc.returncode == 75, proc.output()
    return lines, waited, args


def _one_stall_line(lines: list[str], waited: float) -> None:
    errors = [line for line in lines if "error" in line.lower() and "top-1 error" not in line]
    assert len(errors) == 1 and errors[0].startswith("error: storage stalled: "), lines
    assert f"gs://{BUCKET}/run/c2/" in errors[0] and f"(storage_timeout_s={STALL})" in errors[0]
    assert "Traceback" not in "\n".join(lines)
    # The limit, then at most one watchdog tick (1 s) and the exit; 30 s of slack for a loaded 2-core machine.
    assert STALL <= waited < STALL + 30, waited


def _from_another_host(*args: str, env: dict) -> subprocess.CompletedProcess:
    """`launch.py *args` on a host of another name (a UTS namespace of its own), as a pod's replacement VM."""
    if subprocess.run(["unshare", "--uts", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs `unshare --uts` (root) to relaunch under another host name")
    return subprocess.run(["unshare", "--uts", "sh", "-c", 'hostname gconv-other-host && exec "$0" "$@"',
                           sys.executable, "launch.py", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **env})


def test_a_paused_store_ends_the_run_in_one_line_and_another_host_resumes_with_takeover(own_gcs):
    """The stall leaves the run lock in the bucket with a fresh heartbeat; the stall line names --takeover. Once the
    store answers, a relaunch from another host is refused in one line naming the holder and the flag; with
    --takeover it says whose lock it took and resumes with nothing lost."""
    lines, waited, args = _stall(own_gcs, "pause")
    _one_stall_line(lines, waited)
    stalled = next(line for line in lines if line.startswith("error: storage stalled"))
    assert "run lock gs://" in stalled and "--takeover" in stalled, stalled
    own_gcs.server.send_signal(signal.SIGCONT)  # the store answers again
    refused = _from_another_host(*args, env=own_gcs.env)
    assert refused.returncode == 2 and "--takeover" in refused.stderr, refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and "is in use by pid" in refused.stderr
    resumed = _from_another_host(*args, "--takeover", env=own_gcs.env)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"note: taking over the lock of gs://{BUCKET}/run/c2 from pid " in resumed.stdout, resumed.stdout
    assert "c2: resuming at step " in resumed.stdout, resumed.stdout
    assert int(resumed.stdout.split("c2: resuming at step ")[1].split()[0]) >= 20  # nothing written was lost
    records = [json.loads(line) for line in read_object(own_gcs.env, "run/c2/metrics.jsonl").decode().splitlines()]
    assert [r["step"] for r in records if "train_loss" in r] == list(range(2, 61, 2))
    assert json.loads(read_object(own_gcs.env, "run/c2/summary.json"))["steps"] == 60
    assert not list_objects(own_gcs.env, "run/c2/checkpoints_unreadable/")


def test_a_store_that_dies_while_paused_ends_the_run_in_one_line(own_gcs):
    lines, waited, _ = _stall(own_gcs, "kill")
    _one_stall_line(lines, waited)
