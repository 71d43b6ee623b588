"""A pod job meets its faults in sequence: 2 processes x 4 devices on a `gs://` run directory (the local emulator),
stopped by SIGTERM at 4 random steps, each time to a random process, and relaunched after each; then one process
SIGKILLed in the middle of a checkpoint save and the job relaunched. The job ends with exactly the metrics of an
uninterrupted 2-process run, one report, both processes exiting 0, and no checkpoint set aside as unreadable.

Lowerings are measured (`impl="auto"` on every conv), each process with a disk cache of its own: process 0
measures and process 1 receives its choices (its cache is never written), the run records them in
`lowerings.json`, and every relaunch compiles with them. The uninterrupted job and the first session of the soaked
one share process 0's cache, so both compile the same program and their metrics can be equal exactly.

The plan is random, from the test's seed (conftest's `seed`: printed with a failure, `GCONV_TEST_SEED=N` replays it)."""
import json
import random
import signal
import time

import pytest

from conftest import strip_timing, two_processes
from gcs_emulator import BUCKET, Emulator, list_objects, read_object

pytestmark = pytest.mark.slow

ARGS = ["--config", "experiments/default.py:local", "--point", "c2", "--config.mesh.data=-1",
        "--config.num_steps=40", "--config.log_every_steps=3", "--config.checkpoint_every_steps=5",
        "--config.eval_every_steps=20"]  # logs out of step with the checkpoints: pending metrics in each


def _records(env: dict, run: str) -> list[dict]:
    """The run's metrics as `read_metrics` reads them: `metrics.jsonl`, then the segments not folded into it."""
    text = (read_object(env, f"{run}/metrics.jsonl") or b"").decode()
    records = [json.loads(line) for line in text.splitlines() if line.strip()]
    for name in sorted(list_objects(env, f"{run}/metrics.parts/")):
        index = int(name.rsplit("/", 1)[1].split(".")[0])
        part = [json.loads(line) for line in (read_object(env, name) or b"").decode().splitlines() if line.strip()]
        records.extend(part[len(records) - index:])
    return records


def _job(env: tuple[dict, dict], name: str):
    return two_processes(f"gs://{BUCKET}/{name}", *ARGS, env=env)


def _finish(procs, code: int, what: str) -> list[str]:
    outs = [proc.communicate(timeout=400)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [code, code], f"{what}:\n" + "\n---\n".join(outs)
    return outs


def _wait(procs, ready, what: str, timeout: float = 300.0) -> None:
    deadline = time.time() + timeout
    while not ready():
        assert all(proc.poll() is None for proc in procs), f"the job ended before {what}:\n" + "\n---\n".join(
            proc.output() for proc in procs)
        assert time.time() < deadline, f"no {what} within {timeout:.0f} s"
        time.sleep(0.05)


def _unfinished_checkpoint(env: dict, run: str) -> bool:
    """Whether a checkpoint is being written: its objects are in the bucket but not yet orbax's commit marker."""
    names = list_objects(env, f"{run}/checkpoints/")
    steps = {name.split("/")[3] for name in names if name.split("/")[3].isdigit()}
    return any(f"{run}/checkpoints/{step}/commit_success.txt" not in names for step in steps)


def test_soak_sigterms_to_random_processes_then_a_sigkill_mid_checkpoint(tmp_path, seed):
    rng = random.Random(seed)
    targets = sorted(rng.sample(range(4, 20), 4))
    victims = [rng.randrange(2) for _ in targets]
    killed = rng.randrange(2)
    print(f"soak seed {seed}: SIGTERM after steps {targets} to processes {victims}; then SIGKILL to process "
          f"{killed} mid-checkpoint")
    emulator = Emulator(tmp_path)
    try:
        env = emulator.env
        caches = [tmp_path / f"lowerings{i}.json" for i in range(2)]
        envs = tuple({**env, "GCONV_AUTOTUNE": "1", "GCONV_AUTOTUNE_MIN_MACS": "0",  # the tiny model's convs too
                      "GCONV_AUTOTUNE_CACHE": str(cache)} for cache in caches)
        started = time.monotonic()
        outs = _finish(_job(envs, "straight"), 0, "the uninterrupted job")
        for out in outs:
            assert "error" not in out.lower().replace("top-1 error", ""), out
        straight = strip_timing(_records(env, "straight/c2"))
        lowerings = json.loads(read_object(env, "straight/c2/lowerings.json"))
        measured = json.loads(caches[0].read_text())
        assert len(lowerings) >= 10 and lowerings == {key: measured[key] for key in lowerings}
        assert not caches[1].exists()  # process 1 measured nothing: it received process 0's choices

        soak_started, resumed, stops = time.monotonic(), 0, []
        for target, victim in zip(targets, victims):
            procs = _job(envs, "soak")
            target = max(target, resumed + 1)
            _wait(procs, lambda: any(r["step"] >= target for r in _records(env, "soak/c2")), f"step {target}")
            procs[victim].send_signal(signal.SIGTERM)  # the preemption notice reaches one host
            outs = _finish(procs, 143, f"SIGTERM after step {target} to process {victim}")
            saved = {int(out.split("SIGTERM: saved checkpoint at step ")[1].split()[0].rstrip(".;,")) for out in outs}
            assert len(saved) == 1, outs  # both processes stopped at the same step
            resumed = saved.pop()
            stops.append(resumed)

        assert resumed <= 35, f"the stops ran to step {resumed}: no checkpoint left to interrupt before step 40"
        procs = _job(envs, "soak")
        _wait(procs, lambda: _unfinished_checkpoint(env, "soak/c2"), "a checkpoint being written")
        procs[killed].kill()
        try:  # the other process's next collective fails, or the scheduler ends it as it would on a pod
            procs[1 - killed].wait(timeout=30)
        except Exception:
            procs[1 - killed].kill()
        for proc in procs:
            proc.wait(timeout=60)
        outs = _finish(_job(envs, "soak"), 0, "the relaunch after SIGKILL")
        after_kill = int(outs[0].split("c2: resuming at step ")[1].split()[0])
        soaked = strip_timing(_records(env, "soak/c2"))
        print(f"soak: {len(stops)} SIGTERM stops at steps {stops} and a SIGKILL (resumed at step {after_kill}) "
              f"survived; 40 steps; "
              f"{time.monotonic() - soak_started:.0f} s for the soaked job, {soak_started - started:.0f} s for the "
              f"uninterrupted one")
        assert soaked == straight
        assert [r["step"] for r in soaked if "train_loss" in r] == list(range(3, 40, 3)) + [40]
        assert json.loads(read_object(env, "soak/c2/lowerings.json")) == lowerings and not caches[1].exists()
        assert list_objects(env, "soak/c2/metrics.parts/") == []
        assert not list_objects(env, "soak/c2/checkpoints_unreadable/")
        report = read_object(env, "soak/report.md").decode()
        assert report.count("| c2 | resnext11_2x10d |") == 1 and "wrote" in outs[0]
    finally:
        emulator.close()
