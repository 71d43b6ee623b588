"""Test setup and shared helpers.

8 simulated CPU devices for the multi-device tests (CI sets the same flag), programs compiled at low optimisation in the fast tier (`pytest_configure`),
and grouped convs lowered by the static rule (`GCONV_AUTOTUNE=0`): deterministic, and no time spent measuring;
tests/test_autotune.py turns measuring on where it is the subject. Compiled programs are cached on disk across processes. Tests marked `slow` (multi-process
runs, signals, object storage, the documentation's commands) are the slow tier: `pytest -m slow`; the README's
test command runs the rest, `pytest -m "not slow"`.
"""
import os
import tempfile

_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    _flags += " --xla_force_host_platform_device_count=8"
assert "device_count=8" in _flags, f"the suite runs on 8 simulated devices; XLA_FLAGS={_flags!r}"
os.environ["XLA_FLAGS"] = _flags.strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("GCONV_AUTOTUNE", "0")
# One persistent XLA compilation cache for the whole session (both xdist workers and every launch.py they start):
# the end-to-end tests compile the same tiny runs many times. Entries are keyed by program and jax version.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "gconv-tests-xla-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import importlib.util  # noqa: E402
import secrets  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SEED_ENV = "GCONV_TEST_SEED"


def pytest_configure(config):
    """LLVM at -O0 in the fast tier: 40 % less compile time for its tiny programs, whose run time is negligible. Not
    in the slow tier (`-m slow`), whose end-to-end runs train hundreds of steps in the processes they start: there
    -O0 code runs 3x slower than -O2, and the compiled steps are cached on disk across processes anyway. No test
    compares against values computed under other flags (fixtures are compared within error-model tolerances), and
    every test process (xdist's workers inherit this) and subprocess of a session has the same flags, so runs that
    must agree exactly still run the same code. Set here, before any test initialises a JAX backend."""
    flags = os.environ["XLA_FLAGS"]
    if "xla_backend_optimization_level" not in flags and (config.option.markexpr or "").strip() != "slow":
        os.environ["XLA_FLAGS"] = f"{flags} --xla_backend_optimization_level=0"


def tiered(values, fast) -> list:
    """`values` as `parametrize` cases: those in `fast` run in the fast tier (the README's test command), the others
    are marked slow; CI runs both tiers, so every case still runs there."""
    return [pytest.param(v, marks=() if v in fast else pytest.mark.slow) for v in values]


@pytest.fixture
def seed(request) -> int:
    """A seed drawn fresh for each test (fresh random inputs every run), or `$GCONV_TEST_SEED`; a failing test
    prints the command that replays it with the same seed."""
    value = int(os.environ[SEED_ENV]) if os.environ.get(SEED_ENV) else secrets.randbits(31)
    request.node.gconv_seed = value
    return value


@pytest.fixture
def rng(seed) -> np.random.Generator:
    """numpy's generator from `seed`."""
    return np.random.default_rng(seed)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    value = getattr(item, "gconv_seed", None)
    if value is not None and report.failed:
        line = f"drawn with seed {value}; replay: {SEED_ENV}={value} python -m pytest '{item.nodeid}'"
        report.sections.append(("replay", line))
    return report


def launch_module():
    """launch.py, loaded as a module (its `run(argv)` is the command line in this process)."""
    spec = importlib.util.spec_from_file_location("gconv_launch", ROOT / "launch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def cli(monkeypatch):
    """`launch.py` in this process: `cli(*args) -> exit code`, with the repository as working directory."""
    monkeypatch.chdir(ROOT)
    module = launch_module()
    return lambda *args: module.run(list(args))


def launch_here(*args: str) -> None:
    """`launch.py *args` in this process, from the repository (no interpreter start-up); fails unless it exits 0."""
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        assert launch_module().run(list(args)) == 0, f"launch.py {' '.join(args)} failed"
    finally:
        os.chdir(cwd)


def _trained(workdir: Path, *args: str) -> Path:
    launch_here(*TINY, *args, "--workdir", str(workdir))
    return workdir


@pytest.fixture(scope="session")
def trained_tiny(tmp_path_factory) -> Path:
    """A finished `TINY + TRAINED_TINY` run, trained once per test process: its workdir (the run is `c2` in it).
    Tests that change a run copy it first (`shutil.copytree`)."""
    return _trained(tmp_path_factory.mktemp("trained_tiny"), *TRAINED_TINY)


@pytest.fixture(scope="session")
def straight_run(tmp_path_factory) -> Path:
    """The uninterrupted `TINY + RESUME` run (workdir), trained once per test process, in it: the same program as
    the `launch.py` subprocesses the stop-and-resume tests start, so their metrics must equal its exactly."""
    return _trained(tmp_path_factory.mktemp("straight"), *RESUME)


# --- running launch.py in a subprocess, as a user does (test modules import these: `from conftest import ...`) ---
# One point of the default experiment's local variant on one device; the report without its analysis pass, which
# tests/test_analysis.py and the report tests exercise.
TINY = ["--config", "experiments/default.py:local", "--point", "c2", "--skip_analysis", "--config.mesh.data=1"]
# 120 steps, logs every 7 (out of step with the checkpoints every 10), evaluations every 40: long enough to stop
# in the middle. `straight_run` is its uninterrupted run, which the stop-and-resume tests compare with.
RESUME = ["--config.num_steps=120", "--config.checkpoint_every_steps=10", "--config.log_every_steps=7",
          "--config.eval_every_steps=40"]
# 6 steps, a log line each, a checkpoint every 2 of which 3 are kept: `trained_tiny`'s run.
TRAINED_TINY = ["--config.num_steps=6", "--config.checkpoint_every_steps=2", "--config.log_every_steps=1",
                "--config.keep_checkpoints=3"]
TIMING = ("img_per_sec", "wall_time")


def launch(*args, check=True, env=None, **kwargs) -> subprocess.CompletedProcess:
    """`launch.py *args` to completion; raises with its output when it fails and `check` is set."""
    proc = subprocess.run([sys.executable, "launch.py", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"launch.py {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


class Started(subprocess.Popen):
    """A background `launch.py` whose stdout and stderr go to a file (an unread pipe would stall it once full)."""
    log: Path

    def output(self) -> str:
        return self.log.read_text()

    def communicate(self, input=None, timeout=None):  # noqa: A002 - Popen's signature
        self.wait(timeout=timeout)
        return self.output(), None


def start(*args, env=None) -> Started:
    """`launch.py *args` in the background, stdout and stderr together in a log file (`proc.output()`)."""
    fd, log = tempfile.mkstemp(prefix="gconv-launch-", suffix=".log")
    with os.fdopen(fd, "w") as f:
        proc = Started([sys.executable, "launch.py", *args], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                       env={**os.environ, **(env or {})})
    proc.log = Path(log)
    return proc


def two_processes(workdir, *args, env=({}, {})):
    """The same run in 2 processes x 4 devices: process 0 told by flags, process 1 by the JAX_* variables; `env`:
    each process's own variables."""
    port = free_port()
    four = {"XLA_FLAGS": os.environ["XLA_FLAGS"].replace("device_count=8", "device_count=4")}  # conftest's flags
    first = start(*args, "--workdir", str(workdir), f"--coordinator_address=localhost:{port}", "--num_processes=2",
                  "--process_id=0", env={**four, **env[0]})
    second = start(*args, "--workdir", str(workdir), "--multiprocess",
                   env={**four, **env[1], "JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": "2",
                        "JAX_PROCESS_ID": "1"})
    return first, second


def wait_until(ready, proc: Started, what: str, timeout: float = 240.0) -> None:
    """Polls `ready()` while `proc` runs; fails when `proc` ends first or `timeout` seconds pass."""
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, f"run ended before {what}:\n{proc.output()}"
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
