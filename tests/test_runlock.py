"""The run lock under contention, on a file system and on the GCS emulator: 8 processes acquiring one directory at
the same instant, 20 rounds, and exactly one holds it each round; a holder whose lock is taken over stops at its
next heartbeat in one line, and a stale holder's release leaves the new holder's lock alone."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT
from gcs_emulator import BUCKET, Emulator

CONTENDERS, ROUNDS = 8, 20
RACER = str(ROOT / "tests" / "lock_racer.py")


def _spawn(args: list[str], log: Path, env: dict) -> subprocess.Popen:
    with log.open("w") as f:  # a file, not a pipe: an unread pipe would stall the racer
        return subprocess.Popen([sys.executable, RACER, *args], stdout=f, stderr=subprocess.STDOUT,
                                env={**os.environ, **env, "PYTHONPATH": str(ROOT)})


def _race(root: str, folder: Path, env: dict) -> None:
    procs = [_spawn(["race", root, str(ROUNDS), str(folder), str(i), str(CONTENDERS)], folder / f"{i}.log", env)
             for i in range(CONTENDERS)]
    deadline = time.time() + 120
    while sum((folder / f"{i}.ready").exists() for i in range(CONTENDERS)) < CONTENDERS:
        assert all(p.poll() is None for p in procs) and time.time() < deadline, \
            [(folder / f"{i}.log").read_text() for i in range(CONTENDERS)]
        time.sleep(0.05)
    (folder / "go.tmp").write_text(str(time.time() + 0.5))
    (folder / "go.tmp").rename(folder / "go")
    for i, p in enumerate(procs):
        assert p.wait(timeout=300) == 0, (folder / f"{i}.log").read_text()
    outcomes = [[json.loads(line)["outcome"] for line in (folder / f"{i}.jsonl").read_text().splitlines()]
                for i in range(CONTENDERS)]
    for r in range(ROUNDS):
        held = [i for i in range(CONTENDERS) if outcomes[i][r] == "held"]
        assert len(held) == 1, f"round {r}: contenders {held} all held the lock: {[o[r] for o in outcomes]}"
        refused = [outcomes[i][r] for i in range(CONTENDERS) if i not in held]
        assert all(("is in use by pid" in o or "taken by another launch at the same moment" in o) for o in refused), \
            refused


def _taken_over(run_dir: str, folder: Path, env: dict) -> None:
    """A holder heartbeating every 0.1 s; this process takes its lock (`takeover=True`): the holder stops at its
    next heartbeat in one line, exit code 73, and leaves the new lock as it is; its late release deletes nothing."""
    from gconv.runlock import EXIT_CODE, RunLock
    from gconv.storage import as_path

    holder = _spawn(["hold", run_dir, str(folder / "ready")], folder / "hold.log", env)
    deadline = time.time() + 120
    while not (folder / "ready").exists():
        assert holder.poll() is None and time.time() < deadline, (folder / "hold.log").read_text()
        time.sleep(0.02)
    mine = RunLock(as_path(run_dir)).acquire(takeover=True)
    assert holder.wait(timeout=60) == EXIT_CODE, (folder / "hold.log").read_text()
    lines = (folder / "hold.log").read_text().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: the lock of ") and \
        f"was taken over by pid {os.getpid()}" in lines[0], lines
    info, generation = mine._read()
    assert info["token"] == mine.token and generation == mine.generation  # not overwritten after the takeover
    stale = RunLock(as_path(run_dir))
    stale.generation = b"1" if run_dir.startswith("gs://") else b"\x00stale"  # a holder that lost the lock
    if not run_dir.startswith("gs://"):  # the emulator ignores ifGenerationMatch on DELETE (see test below)
        stale.release()
        assert mine._read()[0]["token"] == mine.token
    mine.beat(force=True)  # still the holder
    mine.release()
    assert mine._read()[0] is None


def test_one_holder_per_round_on_a_file_system(tmp_path):
    _race(str(tmp_path / "runs"), tmp_path, {})


def test_a_taken_over_holder_stops_at_its_next_heartbeat_on_a_file_system(tmp_path):
    _taken_over(str(tmp_path / "run"), tmp_path, {})


@pytest.fixture
def gcs(tmp_path, monkeypatch):
    emulator = Emulator(tmp_path)
    for key, value in emulator.env.items():
        monkeypatch.setenv(key, value)
    yield emulator
    emulator.close()


@pytest.mark.slow
def test_the_emulator_honours_generation_preconditions_where_the_lock_uses_them(gcs):
    """Before trusting the GCS tests below: fake-gcs-server answers 412 to a multipart upload whose
    `ifGenerationMatch` does not hold (the lock's create and heartbeat). It ignores the condition on simple
    (`uploadType=media`) uploads and on DELETE, which the lock's writes therefore do not rely on in tests."""
    from gconv.runlock import _GcsStore
    from gconv.storage import as_path

    store = _GcsStore(as_path(f"gs://{BUCKET}/pre/lock.json"))
    first = store.write(b"{}", store.missing)
    assert first is not None and store.write(b"{}", store.missing) is None  # create only where there is none
    second = store.write(b"[]", first)
    assert second is not None and store.write(b"{}", first) is None  # replace only the generation last seen
    assert store.read() == (b"[]", second)


@pytest.mark.slow
def test_one_holder_per_round_on_gcs(tmp_path, gcs):
    _race(f"gs://{BUCKET}/runs", tmp_path, gcs.env)


@pytest.mark.slow
def test_a_taken_over_holder_stops_at_its_next_heartbeat_on_gcs(tmp_path, gcs):
    _taken_over(f"gs://{BUCKET}/run", tmp_path, gcs.env)
