"""Test setup and shared helpers.

8 simulated CPU devices for the multi-device tests (CI sets the same flag), and grouped convs lowered by the static
rule (`GCONV_AUTOTUNE=0`): deterministic, and no time spent measuring; tests/test_autotune.py turns measuring on
where it is the subject. Compiled programs are cached on disk across processes. Tests marked `slow` (multi-process
runs, signals, object storage) can be left out while iterating: `pytest -m "not slow"`.
"""
import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("GCONV_AUTOTUNE", "0")
# One persistent XLA compilation cache for the whole session (both xdist workers and every launch.py they start):
# the end-to-end tests compile the same tiny runs many times. Entries are keyed by program and jax version.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "gconv-tests-xla-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import importlib.util  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def cli(monkeypatch):
    """`launch.py` in this process: `cli(*args) -> exit code`, with the repository as working directory."""
    monkeypatch.chdir(ROOT)
    spec = importlib.util.spec_from_file_location("gconv_launch", ROOT / "launch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return lambda *args: module.run(list(args))


# --- running launch.py in a subprocess, as a user does (test modules import these: `from conftest import ...`) ---
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
