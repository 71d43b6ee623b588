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


def _resnext50_shapes() -> list[tuple]:
    """The grouped 3x3s of ResNeXt-50 32x4d at 224x224: (input HxWxC, kernel, groups, stride, padding), in order.
    Stage i has width 128 x 2^i at 56 / 2^i pixels; its first block (from stage 2 on) is strided, at the previous
    stage's size."""
    same = ((1, 1), (1, 1))
    shapes = [((56, 56, 128), (3, 3, 4, 128), 32, 1, same)]
    for i in (1, 2, 3):
        width, size = 128 * 2**i, 56 // 2**i
        shapes += [((2 * size, 2 * size, width), (3, 3, width // 32, width), 32, 2, same),
                   ((size, size, width), (3, 3, width // 32, width), 32, 1, same)]
    return shapes


def _shufflenet_v1_shapes(groups: int) -> list[tuple]:
    """The grouped 1x1s of ShuffleNet v1 1.0x (g = `groups`) at 224x224, in order: stage 2 has c channels at 28x28,
    stage 3 2c at 14x14, stage 4 4c at 7x7, bottlenecks a quarter of a stage's output; each stage's first unit is
    strided and concatenates its pooled input (stage 2's first reduce is ungrouped: only 24 input channels)."""
    c, none = {2: 200, 3: 240, 4: 272, 8: 384}[groups], ((0, 0), (0, 0))
    conv = lambda size, c_in, c_out: ((size, size, c_in), (1, 1, c_in // groups, c_out), groups, 1, none)  # noqa
    shapes = [conv(28, c // 4, c - 24), conv(28, c, c // 4), conv(28, c // 4, c)]  # stage 2 (4 units, 3 alike)
    for size, width in ((14, 2 * c), (7, 4 * c)):  # stages 3 and 4: the first unit, then the others
        shapes += [conv(2 * size, width // 2, width // 4), conv(size, width // 4, width // 2),
                   conv(size, width, width // 4), conv(size, width // 4, width)]
    return shapes


def _traced_shapes(name: str) -> list[tuple]:
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


SHAPES = {"resnext50_32x4d": _resnext50_shapes(),
          **{f"shufflenet_g{g}_w1": _shufflenet_v1_shapes(g) for g in (2, 3, 4, 8)}}
# The fast tier checks each model's first shape and ResNeXt-50's first strided one; the slow tier the rest.
FAST = [SHAPES[name][0] for name in MODELS] + [next(s for s in SHAPES[MODELS[0]] if s[3] == 2)]
CASES = [pytest.param(shape, id=f"{name}-{'x'.join(map(str, shape[0]))}-k{'x'.join(map(str, shape[1]))}-g{shape[2]}"
                      f"-s{shape[3]}", marks=() if shape in FAST else pytest.mark.slow)
         for name in MODELS for shape in SHAPES[name]]


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_the_tables_are_every_grouped_shape_of_the_models(name):
    """The tables (closed forms, so that collecting this file traces no model) equal what the model computes."""
    assert SHAPES[name] == _traced_shapes(name)


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
def test_pallas_lowering_equals_the_reference(shape, rng):
    (h, w, c_in), k_shape, groups, strides, padding = shape
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
