"""Running `launch.py` in a subprocess, as a user does: the tiny default configuration and helpers to start, wait
for, and compare runs."""
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--config", "experiments/default.py:local", "--point", "c2", "--config.mesh.data=1"]
TIMING = ("img_per_sec", "wall_time")


def launch(*args, check=True, env=None, **kwargs) -> subprocess.CompletedProcess:
    """`launch.py *args` to completion; raises with its output when it fails and `check` is set."""
    proc = subprocess.run([sys.executable, "launch.py", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"launch.py {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def start(*args, env=None) -> subprocess.Popen:
    """`launch.py *args` in the background, stdout and stderr together."""
    return subprocess.Popen([sys.executable, "launch.py", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})})


def wait_until(ready, proc: subprocess.Popen, what: str, timeout: float = 240.0) -> None:
    """Polls `ready()` while `proc` runs; fails when `proc` ends first or `timeout` seconds pass."""
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, f"run ended before {what}:\n{proc.stdout.read()}"
        assert time.time() < deadline, f"no {what} within {timeout:.0f} s"
        time.sleep(0.02)


def has_content(path: Path) -> bool:
    return path.exists() and path.stat().st_size > 0


def checkpoint_steps(run_dir: Path) -> list[int]:
    ckpt = run_dir / "checkpoints"
    return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.exists() else []


def strip_timing(records: list[dict]) -> list[dict]:
    """Metrics records without the fields that measure time."""
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def free_port() -> int:
    """A TCP port on localhost that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
