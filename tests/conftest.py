"""Test setup: 8 simulated CPU devices for the multi-device tests (CI sets the same flag), and grouped convs
lowered by the static rule (`GCONV_AUTOTUNE=0`): deterministic, and no time spent measuring; tests/test_autotune.py
turns measuring on where it is the subject. Compiled programs are cached on disk across processes."""
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
