"""Test setup: 8 simulated CPU devices for the multi-device tests (CI sets the same flag), and grouped convs
lowered by the static rule (`GCONV_AUTOTUNE=0`): deterministic, and no time spent measuring; tests/test_autotune.py
turns measuring on where it is the subject."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("GCONV_AUTOTUNE", "0")
