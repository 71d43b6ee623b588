"""Measured lowering choice: equal results, one measurement per shape, disk cache, static rule, no re-tracing."""
import json
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from gconv import autotune, ops
from gconv.metrics_log import read_metrics
from gconv.ops import choice
from conftest import TINY, TRAINED_TINY, strip_timing
from tolerance import assert_within, conv_gradient_bound, conv_terms, linear_bound, sin_loss_gradient_bound


@pytest.fixture
def measuring(monkeypatch, tmp_path):
    """Autotuning on (for the tests' tiny convs too), with a fresh memory and a disk cache in tmp_path."""
    monkeypatch.setenv(autotune.ENV_ENABLE, "1")
    monkeypatch.setattr(choice, "AUTOTUNE_MIN_MACS", 0)
    cache = tmp_path / "autotune.json"
    monkeypatch.setenv(autotune.ENV_CACHE, str(cache))
    autotune.clear()
    yield cache
    autotune.clear()


def _case(seed):
    rng = np.random.default_rng(seed)  # fresh inputs each run
    x = jnp.asarray(rng.standard_normal((2, 9, 9, 12)), jnp.float32)
    return x, {"depthwise": (jnp.asarray(rng.standard_normal((3, 3, 1, 12)), jnp.float32), 12),
               "grouped_1x1": (jnp.asarray(rng.standard_normal((1, 1, 4, 6)), jnp.float32), 3),
               "grouped_3x3": (jnp.asarray(rng.standard_normal((3, 3, 4, 12)), jnp.float32), 3)}


@pytest.mark.parametrize("name", ["depthwise", "grouped_1x1", "grouped_3x3"])
def test_measured_choice_equals_reference_values_and_gradients(measuring, name, seed):
    x, cases = _case(seed)
    k, groups = cases[name]
    kw = dict(strides=2, precision=lax.Precision.HIGHEST)
    loss = lambda conv: lambda x, k: jnp.sum(jnp.sin(conv(x, k, groups, **kw)))  # noqa: E731
    reference = lambda a, b: ops.grouped_conv_reference(a, b, groups, **kw)  # noqa: E731
    assert_within(jax.jit(lambda x, k: ops.grouped_conv(x, k, groups, **kw))(x, k), reference(x, k),
                  linear_bound(reference, x, k, terms=conv_terms(k.shape, 12)), name)
    got = jax.jit(jax.grad(loss(ops.grouped_conv), argnums=(0, 1)))(x, k)
    want = jax.grad(loss(ops.grouped_conv_reference), argnums=(0, 1))(x, k)
    for a, b, bound in zip(got, want, sin_loss_gradient_bound(reference, x, k)):
        assert_within(a, b, bound, name)
    assert len(autotune.measurements()) == 2  # forward and backward, once each for this shape


def test_one_measurement_per_shape_no_retrace_and_disk_cache(measuring):
    x, cases = _case(1)
    k, groups = cases["depthwise"]

    @jax.jit
    @chex.assert_max_traces(n=1)
    def f(x, k):
        return ops.grouped_conv(x, k, groups)

    f(x, k)
    f(x * 2.0, k + 1.0)  # a second trace would raise
    jax.jit(lambda x, k: ops.grouped_conv(x, k, groups) * 2.0)(x, k)  # another function, same conv: cached
    assert len(autotune.measurements()) == 2
    stored = json.loads(measuring.read_text())
    assert len(stored) == 2 and set(stored.values()) <= set(ops.IMPLS)
    autotune.clear()  # a new process: memory empty, disk cache present
    jax.jit(lambda x, k: ops.grouped_conv(x, k, groups))(x, k)
    assert autotune.measurements() == []


def test_torn_disk_cache_is_measured_again_and_rewritten(measuring):
    measuring.write_text('{"forward [')
    x, cases = _case(2)
    k, groups = cases["grouped_1x1"]
    ops.grouped_conv(x, k, groups)
    assert len(autotune.measurements()) == 2 and len(json.loads(measuring.read_text())) == 2


def test_static_rule_when_off_and_inside_static_blocks(measuring, monkeypatch):
    x, cases = _case(3)
    k, groups = cases["grouped_3x3"]
    with autotune.static():
        jax.eval_shape(lambda x, k: ops.grouped_conv(x, k, groups), x, k)
    monkeypatch.setenv(autotune.ENV_ENABLE, "0")
    ops.grouped_conv(x, k, groups)
    assert autotune.measurements() == [] and not measuring.exists()


def test_candidates_and_static_rule():
    assert ops.candidate_impls((3, 3, 1, 240), 240, 240, "cpu") == ("blockdiag", "shift")
    assert "xla" in ops.candidate_impls((3, 3, 1, 240), 240, 240, "gpu")
    assert ops.candidate_impls((1, 1, 80, 240), 240, 3, "cpu") == ("blockdiag", "split", "dot")
    assert ops.candidate_impls((3, 3, 64, 64), 64, 1, "cpu") == ("xla",)
    assert ops.static_impl((3, 3, 1, 240), 240, 240, "cpu") == "shift"
    assert ops.static_impl((1, 1, 256, 64), 256, 1, "cpu") == "dot"
    assert ops.static_impl((3, 3, 4, 128), 128, 32, "gpu") == "xla"
    assert ops.static_impl((1, 1, 80, 240), 240, 3, "gpu") == "blockdiag"
    for shape, c_in, groups in [((3, 3, 1, 240), 240, 240), ((1, 1, 80, 240), 240, 3), ((3, 3, 4, 128), 128, 32),
                                ((1, 1, 256, 64), 256, 1), ((3, 3, 64, 64), 64, 1)]:
        for backend in ("cpu", "gpu"):
            assert ops.static_impl(shape, c_in, groups, backend) in ops.candidate_impls(shape, c_in, groups, backend)


def test_forward_and_backward_lowerings_can_differ(measuring):
    """The forward of one lowering and the backward of another compose to the reference's gradients."""
    x, cases = _case(4)
    k, groups = cases["grouped_3x3"]
    kw = dict(strides=(1, 1), padding="SAME", dilation=(1, 1), precision=lax.Precision.HIGHEST,
              preferred_element_type=None)
    conv = choice.forward_backward("shift", "split", groups, 2, kw)
    y, vjp = jax.vjp(conv, x, k)
    y_ref, vjp_ref = jax.vjp(lambda a, b: ops.grouped_conv_reference(a, b, groups, **kw), x, k)
    reference = lambda a, b: ops.grouped_conv_reference(a, b, groups, **kw)  # noqa: E731
    assert_within(y, y_ref, linear_bound(reference, x, k, terms=conv_terms(k.shape, 12)), "forward")
    for a, b, bound in zip(vjp(jnp.cos(y)), vjp_ref(jnp.cos(y)), conv_gradient_bound(reference, x, k, jnp.cos(y))):
        assert_within(a, b, bound, "backward")


def test_tiny_convs_take_the_static_rule(monkeypatch):
    monkeypatch.setenv(autotune.ENV_ENABLE, "1")
    autotune.clear()
    x, cases = _case(5)
    k, groups = cases["depthwise"]
    ops.grouped_conv(x, k, groups)  # 2 x 5 x 5 x 12 outputs x 9 taps: far below AUTOTUNE_MIN_MACS
    assert autotune.measurements() == []


@pytest.mark.slow
def test_a_resumed_run_lowers_as_the_run_it_resumes(cli, measuring, monkeypatch, tmp_path):
    """A run records its measured choices in `lowerings.json`. Resumed after the disk cache changed (here: every
    entry turned to another candidate), it compiles with its recorded choices, so `lowerings.json` stays as it
    was and the metrics equal an uninterrupted run's exactly (the same program)."""
    monkeypatch.setenv("GCONV_AUTOTUNE_MIN_MACS", "0")  # measure the tiny model's convs too
    args = [*TINY, *TRAINED_TINY]
    assert cli(*args, "--workdir", str(tmp_path / "straight")) == 0
    run = tmp_path / "straight" / "c2"
    recorded = json.loads((run / "lowerings.json").read_text())
    assert len(recorded) >= 10 and recorded == {k: v for k, v in json.loads(measuring.read_text()).items()
                                                if k in recorded}
    shutil.copytree(tmp_path / "straight", tmp_path / "stopped")  # as if stopped after its checkpoint at step 4
    stopped = tmp_path / "stopped" / "c2"
    shutil.rmtree(stopped / "checkpoints" / "6")
    (stopped / "summary.json").unlink()
    flipped = {}
    for key, chosen in json.loads(measuring.read_text()).items():
        backend, _, _, x_shape, _, k_shape, _, groups, _ = json.loads(key.split(" ", 1)[1])
        others = [c for c in ops.candidate_impls(k_shape, x_shape[-1], groups, backend) if c != chosen]
        flipped[key] = others[0]
    measuring.write_text(json.dumps(flipped))
    autotune.clear()  # a new process: only the disk cache, which now disagrees with the run
    assert cli(*args, "--workdir", str(tmp_path / "stopped")) == 0
    assert json.loads((stopped / "lowerings.json").read_text()) == recorded
    assert strip_timing(read_metrics(stopped / "metrics.jsonl")) == strip_timing(read_metrics(run / "metrics.jsonl"))
    assert autotune.measurements() == []


def test_a_lowering_table_is_taken_before_measuring(measuring, monkeypatch, tmp_path):
    """bench/lowering_table.py measures every conv of a model once and writes the device kind's table; with the
    table in place, a fresh process measures nothing and takes its choices (a table flipped to other candidates
    shows that they come from it), across JAX versions (the key leaves the version out)."""
    import subprocess
    import sys

    from gconv.ops import lowering_table
    from conftest import ROOT

    out = tmp_path / "tables"
    proc = subprocess.run([sys.executable, "bench/lowering_table.py", "--models", "resnext11_4x6d", "--image",
                           "8,8,1", "--batch", "8", "--dtype", "float32", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    path = lowering_table.table_path(jax.devices()[0].device_kind, str(out))
    table = json.loads(open(path).read())
    assert table["choices"] and "measured" in table and f"wrote {path}" in proc.stdout
    key = next(iter(table["choices"]))
    assert jax.__version__ not in key


    def other(key, chosen):  # another candidate of the key's conv (fields: backend, kind, x, dtype, kernel, ...)
        backend, _, x_shape, _, kernel_shape, _, groups, _ = json.loads(key.partition(" ")[2])
        return next(c for c in choice.candidate_impls(kernel_shape, x_shape[-1], groups, backend) if c != chosen)

    flipped = {k: other(k, v) for k, v in table["choices"].items()}
    with open(path, "w") as f:
        json.dump({**table, "choices": flipped}, f)
    monkeypatch.setenv(lowering_table.ENV_TABLES, str(out))
    monkeypatch.delenv(autotune.ENV_CACHE)
    lowering_table._load.cache_clear()
    from gconv.models import create_model

    model = create_model("resnext11_4x6d", num_classes=10)
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, 8, 8, 1), jnp.float32))
    with autotune.recording() as used:
        jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables,
                       jax.ShapeDtypeStruct((8, 8, 8, 1), jnp.float32))
    assert autotune.measurements() == [] and used
    assert all(flipped[lowering_table.portable(k)] == v for k, v in used.items())
    lowering_table._load.cache_clear()
