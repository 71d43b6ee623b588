"""The Pallas lowering (gconv.ops.lowerings.pallas), run by Pallas's interpreter on the CPU: forward, input gradient
and weight gradient against `grouped_conv_reference` on every grouped-conv shape of ResNeXt-50 32x4d and of
ShuffleNet v1 (g = 2, 3, 4, 8) at 224x224, random inputs drawn fresh each run."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from gconv import ops
from gconv.models import create_model
from tolerance import assert_within, conv_terms, linear_bound, sin_loss_gradient_bound

MODELS = ("resnext50_32x4d", "shufflenet_g2_w1", "shufflenet_g3_w1", "shufflenet_g4_w1", "shufflenet_g8_w1")


def _shapes(name: str) -> list[tuple]:
    """Every distinct (input HxWxC, kernel shape, groups, strides, padding) of the model's convs that the Pallas
    lowering is for: grouped, with more than one channel per group."""
    seen = []
    original = ops.grouped_conv

    def record(x, kernel, groups, **kw):
        key = (tuple(x.shape[1:]), tuple(kernel.shape), int(groups), kw.get("strides", 1), kw.get("padding", "SAME"))
        if groups > 1 and kernel.shape[-2] > 1 and key not in seen:
            seen.append(key)
        return original(x, kernel, groups, **kw)

    model = create_model(name)
    ops.grouped_conv = record
    try:
        jax.eval_shape(model.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
    finally:
        ops.grouped_conv = original
    return seen


SHAPES = {name: _shapes(name) for name in MODELS}
# The fast tier checks ResNeXt-50's shapes and the first of each ShuffleNet's; the slow tier the rest.
CASES = [pytest.param(shape, id=f"{name}-{'x'.join(map(str, shape[0]))}-k{'x'.join(map(str, shape[1]))}-g{shape[2]}"
                      f"-s{shape[3]}", marks=() if name.startswith("resnext") or i == 0 else pytest.mark.slow)
         for name in MODELS for i, shape in enumerate(SHAPES[name])]


def test_the_tables_have_the_shapes_they_should():
    """ResNeXt-50: the grouped 3x3 of each stage, stride 1 and (first block of stages 2-4) stride 2; ShuffleNet v1:
    the grouped 1x1s of each stage."""
    assert len(SHAPES["resnext50_32x4d"]) == 7
    assert all(k[:2] == (3, 3) and g == 32 for _, k, g, _, _ in SHAPES["resnext50_32x4d"])
    assert {s for *_, s, _ in SHAPES["resnext50_32x4d"]} == {1, 2}
    for name in MODELS[1:]:
        assert SHAPES[name] and all(k[:2] == (1, 1) for _, k, _, _, _ in SHAPES[name]), name


def _value_and_sin_gradients(f):
    """`f(x, k)` and the gradients of `sum(sin(f(x, k)))` (the cotangent is `cos(y)`), in one compiled program."""
    def run(x, k):
        y, vjp = jax.vjp(f, x, k)
        return y, vjp(jnp.cos(y))
    return jax.jit(run)


@pytest.mark.parametrize("shape", CASES)
def test_pallas_lowering_equals_the_reference(shape):
    (h, w, c_in), k_shape, groups, strides, padding = shape
    rng = np.random.default_rng(np.random.SeedSequence().entropy)
    x = jnp.asarray(rng.standard_normal((1, h, w, c_in)), jnp.float32)
    k = jnp.asarray(rng.standard_normal(k_shape) / np.sqrt(np.prod(k_shape[:-1])), jnp.float32)
    kw = dict(strides=strides, padding=padding, precision=lax.Precision.HIGHEST)
    conv = functools.partial(ops.grouped_conv, groups=groups, impl="pallas", **kw)
    reference = lambda a, b: ops.grouped_conv_reference(a, b, groups, **kw)  # noqa: E731
    bounds = jax.jit(lambda a, b: (linear_bound(reference, a, b, terms=conv_terms(k.shape, c_in)),
                                   sin_loss_gradient_bound(reference, a, b)))(x, k)
    (y, grads), (y_ref, grads_ref) = _value_and_sin_gradients(conv)(x, k), _value_and_sin_gradients(reference)(x, k)
    assert_within(y, y_ref, bounds[0], "forward")
    for name, g, r, bound in zip(("input gradient", "weight gradient"), grads, grads_ref, bounds[1]):
        assert_within(g, r, bound, name)
