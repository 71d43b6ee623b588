"""One contender of tests/test_runlock.py, in a process of its own.

    python tests/lock_racer.py race ROOT ROUNDS DIR INDEX COUNT  # each round, acquire ROOT/round{r} with the others
    python tests/lock_racer.py hold RUN_DIR READY                # acquire, write READY, heartbeat every 0.1 s

`race` writes DIR/INDEX.ready, waits for DIR/go (the first round's start time; round r starts INTERVAL s later) and
writes one JSON line per round to DIR/INDEX.jsonl: "held" or the refusal. A winner keeps the lock until every
contender has written its line for the round, so a late one cannot find the directory free.
`hold` heartbeats until the lock is taken from it, when `RunLock.beat` ends the process.
"""
import json
import sys
import time
from pathlib import Path

from gconv.runlock import RunLock
from gconv.storage import RunDirError, as_path

INTERVAL = 0.3  # seconds between rounds


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def race(root: str, rounds: int, folder: str, index: int, count: int) -> None:
    folder = Path(folder)
    (folder / f"{index}.ready").touch()
    while not (folder / "go").exists() or not (folder / "go").read_text():
        time.sleep(0.01)
    start = float((folder / "go").read_text())
    mine = folder / f"{index}.jsonl"
    for r in range(rounds):
        time.sleep(max(0.0, start + r * INTERVAL - time.time()))  # the same instant in every process
        lock = RunLock(as_path(root) / f"round{r}")
        try:
            lock.acquire()
            outcome = "held"
        except RunDirError as e:
            outcome = str(e)
        with mine.open("a") as f:
            f.write(json.dumps({"round": r, "outcome": outcome}) + "\n")
        if outcome == "held":
            while min(_lines(folder / f"{i}.jsonl") for i in range(count)) <= r:
                time.sleep(0.01)
            lock.release()


def hold(run_dir: str, ready: str) -> None:
    lock = RunLock(as_path(run_dir), stale_after=0.4).acquire()  # a heartbeat every 0.1 s
    Path(ready).touch()
    deadline = time.time() + 120
    while time.time() < deadline:
        lock.beat()
        time.sleep(0.02)
    sys.exit("still holding the lock after 120 s")


if __name__ == "__main__":
    if sys.argv[1] == "race":
        race(sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5]), int(sys.argv[6]))
    else:
        hold(sys.argv[2], sys.argv[3])
