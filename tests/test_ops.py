"""gconv.ops: grouped_conv against the split-per-group reference, channel_shuffle, and bad input."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax import lax
from jax.test_util import check_grads

from gconv import ops
from tolerance import U16B, U64, assert_within, conv_terms, gamma, linear_bound, sin_loss_gradient_bound


def _rand(seed, shape, dtype=jnp.float32):
    return jax.random.normal(jax.random.PRNGKey(seed), shape, dtype)


@st.composite
def conv_cases(draw):
    nd = draw(st.integers(1, 3))
    groups = draw(st.integers(1, 4))
    c_in = groups * draw(st.integers(1, 3))
    c_out = groups * draw(st.integers(1, 3))
    window = draw(st.one_of(st.just((1,) * nd), st.tuples(*[st.integers(1, 3)] * nd)))
    spatial = tuple(draw(st.integers(5, 8)) for _ in range(nd))
    strides = draw(st.one_of(st.integers(1, 2), st.tuples(*[st.integers(1, 2)] * nd)))
    dilation = draw(st.one_of(st.integers(1, 2), st.tuples(*[st.integers(1, 2)] * nd)))
    padding = draw(st.one_of(st.sampled_from(["SAME", "VALID"]), st.integers(0, 2),
                             st.tuples(*[st.tuples(st.integers(0, 2), st.integers(0, 2))] * nd)))
    impl = draw(st.sampled_from(ops.IMPLS))
    return dict(impl=impl, nd=nd, groups=groups, c_in=c_in, c_out=c_out, window=window, spatial=spatial,
                strides=strides, dilation=dilation, padding=padding, seed=draw(st.integers(0, 2**16)))


@settings(max_examples=40, deadline=None)
@given(conv_cases())
def test_grouped_conv_matches_reference(case):
    x = _rand(case["seed"], (2,) + case["spatial"] + (case["c_in"],))
    k = _rand(case["seed"] + 1, case["window"] + (case["c_in"] // case["groups"], case["c_out"]))
    kw = dict(strides=case["strides"], padding=case["padding"], dilation=case["dilation"],
              precision=lax.Precision.HIGHEST)
    if case["impl"] == "dot" and case["window"] != (1,) * case["nd"]:
        with pytest.raises(ValueError, match="impl='dot' computes 1x1 convolutions"):
            ops.grouped_conv(x, k, case["groups"], impl="dot", **kw)
        return
    if case["impl"] == "pallas" and case["nd"] != 2:
        with pytest.raises(ValueError, match="impl='pallas' computes 2-D convs"):
            ops.grouped_conv(x, k, case["groups"], impl="pallas", **kw)
        return
    got = jax.jit(lambda a, b: ops.grouped_conv(a, b, case["groups"], impl=case["impl"], **kw))(x, k)
    reference = jax.jit(lambda a, b: ops.grouped_conv_reference(a, b, case["groups"], **kw))
    bound = linear_bound(reference, x, k, terms=conv_terms(k.shape, case["c_in"]))
    assert_within(got, reference(x, k), bound, case["impl"])


def test_reference_is_per_group_dense_conv():
    """The reference itself: output group j depends only on input group j."""
    x, k = _rand(0, (1, 6, 6, 4)), _rand(1, (3, 3, 2, 6))
    y = ops.grouped_conv_reference(x, k, 2)
    x_perturbed = x.at[..., 2:].set(0.0)  # zero group 1's inputs
    y2 = ops.grouped_conv_reference(x_perturbed, k, 2)
    np.testing.assert_array_equal(y[..., :3], y2[..., :3])
    assert not np.allclose(y[..., 3:], y2[..., 3:])


def test_groups_one_is_plain_conv():
    x, k = _rand(0, (2, 9, 9, 5)), _rand(1, (3, 3, 5, 7))
    want = lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                    precision=lax.Precision.HIGHEST)
    bound = linear_bound(lambda a, b: ops.grouped_conv_reference(a, b, 1), x, k, terms=conv_terms(k.shape, 5))
    assert_within(ops.grouped_conv(x, k, 1, precision=lax.Precision.HIGHEST), want, bound, "groups=1")


@pytest.mark.parametrize("multiplier", [1, 2, 3])
def test_depthwise_with_multiplier(multiplier):
    c = 6
    x, k = _rand(0, (2, 7, 7, c)), _rand(1, (3, 3, 1, c * multiplier))
    y = ops.grouped_conv(x, k, c, strides=2, precision=lax.Precision.HIGHEST)
    # Depthwise by hand: output channel o sees only input channel o // multiplier.
    for o in range(c * multiplier):
        xi = x[..., o // multiplier: o // multiplier + 1]
        yo = lax.conv_general_dilated(xi, k[..., o:o + 1], (2, 2), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=lax.Precision.HIGHEST)
        bound = linear_bound(lambda a, b: lax.conv_general_dilated(a, b, (2, 2), "SAME", dimension_numbers=(
            "NHWC", "HWIO", "NHWC"), precision=lax.Precision.HIGHEST), xi, k[..., o:o + 1], terms=9)
        assert_within(y[..., o:o + 1], yo, bound, f"output channel {o}")


@pytest.mark.parametrize("nd", [1, 2, 3])
def test_gradients(nd, seed):
    """Autodiff against central differences, to second order, in float64.

    Error model: the checked maps are polynomials in (x, k) of degree <= 3 (the conv is bilinear; the order-2 VJP
    map, conv^T(conv(x, k), k), is cubic), so a central difference is exact up to its truncation, eps^2 |f'''| / 6
    <= eps^2 S, and the rounding of the two evaluations it differences, gamma_L S / eps, where L <= 2 n + 1 is the
    longest chain of sums (n = 3^nd x 2 terms per output, twice in the order-2 map, and the perturbed input) and S
    the largest sum of |terms|: the order-2 map on |x| + 5 eps, |k| + 5 eps (the directions check_grads draws are
    standard normals, within 5 of 0), where nothing cancels. check_close allows atol + rtol |want|."""
    eps = 1e-5
    with jax.enable_x64(True):
        x = jax.random.normal(jax.random.PRNGKey(seed), (2,) + (5,) * nd + (4,), jnp.float64)
        k = jax.random.normal(jax.random.PRNGKey(seed + 1), (3,) * nd + (2, 6), jnp.float64)
        f = lambda x, k: ops.grouped_conv(x, k, 2, strides=2, padding=1, precision=lax.Precision.HIGHEST)  # noqa
        second = lambda x, k: jax.vjp(f, x, k)[1](f(x, k))  # noqa: E731 - the order-2 VJP map
        big = max(float(jnp.max(g)) for g in second(jnp.abs(x) + 5 * eps, jnp.abs(k) + 5 * eps))
        n = 3**nd * 2
        tol = gamma(2 * n + 1, U64) * big / eps + eps**2 * big
        check_grads(f, (x, k), order=2, modes=("fwd", "rev"), atol=tol, rtol=tol, eps=eps)


@pytest.mark.parametrize("impl", ops.IMPLS)
@pytest.mark.parametrize("k_shape,groups", [((3, 3, 2, 12), 4), ((1, 1, 2, 12), 4), ((3, 3, 1, 16), 8),
                                            ((1, 1, 8, 12), 1)])
def test_gradients_match_reference(impl, k_shape, groups):
    if impl == "dot" and k_shape[0] != 1:
        pytest.skip("dot lowers 1x1 convs only")
    x, k = _rand(0, (2, 8, 8, 8)), _rand(1, k_shape)
    loss = lambda conv, **kw: lambda x, k: jnp.sum(jnp.sin(conv(x, k, groups, strides=2, dilation=2, **kw)))  # noqa
    g = jax.grad(loss(ops.grouped_conv, impl=impl), argnums=(0, 1))(x, k)
    g_ref = jax.grad(loss(ops.grouped_conv_reference), argnums=(0, 1))(x, k)
    reference = lambda a, b: ops.grouped_conv_reference(a, b, groups, strides=2, dilation=2)  # noqa: E731
    for got, want, bound in zip(g, g_ref, sin_loss_gradient_bound(reference, x, k)):
        assert_within(got, want, bound, impl)


def test_block_diagonal_kernel_structure():
    k = _rand(0, (3, 3, 2, 6))
    dense = ops.block_diagonal_kernel(k, 3)
    assert dense.shape == (3, 3, 6, 6)
    for i in range(3):
        for j in range(3):
            block = dense[:, :, 2 * i:2 * i + 2, 2 * j:2 * j + 2]
            np.testing.assert_array_equal(block, k[:, :, :, 2 * j:2 * j + 2] if i == j else 0.0)
    with pytest.raises(ValueError, match="impl='fast' is not one of"):
        ops.grouped_conv(jnp.zeros((1, 4, 4, 6)), k, 3, impl="fast")


def test_bfloat16():
    x, k = _rand(0, (2, 8, 8, 8), jnp.bfloat16), _rand(1, (3, 3, 2, 8), jnp.bfloat16)
    y = ops.grouped_conv(x, k, 4)
    assert y.dtype == jnp.bfloat16
    x32, k32 = x.astype(jnp.float32), k.astype(jnp.float32)  # the same values, exactly
    want = ops.grouped_conv_reference(x32, k32, 4)
    # bfloat16 accumulation (the most a backend may do) over 3x3x2 terms, then rounding the result to bfloat16
    bound = gamma(18, U16B) * ops.grouped_conv_reference(jnp.abs(x32), jnp.abs(k32), 4) + U16B * jnp.abs(want)
    assert_within(y.astype(jnp.float32), want, bound, "bfloat16")
    y32 = ops.grouped_conv(x, k, 4, preferred_element_type=jnp.float32)
    assert y32.dtype == jnp.float32


def test_jit_and_vmap_compose():
    x, k = _rand(0, (3, 2, 6, 6, 4)), _rand(1, (3, 3, 2, 4))
    f = jax.jit(jax.vmap(lambda xi: ops.grouped_conv(xi, k, 2, precision=lax.Precision.HIGHEST)))
    reference = lambda a, b: ops.grouped_conv_reference(a, b, 2, precision=lax.Precision.HIGHEST)  # noqa: E731
    flat = x.reshape(6, 6, 6, 4)
    assert_within(f(x).reshape(6, 6, 6, 4), reference(flat, k), linear_bound(reference, flat, k, terms=9 * 4), "vmap")


def test_no_recompile_on_second_call():
    @jax.jit
    @chex.assert_max_traces(n=1)
    def f(x, k):
        return ops.grouped_conv(x, k, 2)

    x, k = _rand(0, (2, 6, 6, 4)), _rand(1, (3, 3, 2, 4))
    f(x, k)
    f(x + 1.0, k * 2.0)  # a second trace would raise


def test_channel_shuffle_matches_torch_permutation():
    x = jnp.arange(6.0)[None, None, :]
    np.testing.assert_array_equal(ops.channel_shuffle(x, 2)[0, 0], [0, 3, 1, 4, 2, 5])
    assert ops.shuffle_permutation(6, 2) == [0, 3, 1, 4, 2, 5]


@pytest.mark.parametrize("channels,groups,axis", [(12, 3, -1), (12, 4, 1), (8, 8, -1), (10, 1, -1)])
def test_channel_shuffle_is_permutation_and_inverts(channels, groups, axis):
    shape = [2, 3, 4]
    shape.insert(axis % 4 if axis >= 0 else len(shape), channels)
    x = _rand(0, tuple(shape))
    y = ops.channel_shuffle(x, groups, axis)
    perm = ops.shuffle_permutation(channels, groups)
    assert sorted(perm) == list(range(channels))
    np.testing.assert_array_equal(y, jnp.take(x, np.array(perm), axis=axis))
    np.testing.assert_array_equal(ops.channel_unshuffle(y, groups, axis), x)


BAD_CONV = [
    ((1, 8, 8, 6), (3, 3, 2, 8), 4, "C_in=6 is not divisible by groups=4"),
    ((1, 8, 8, 8), (3, 3, 2, 6), 4, "C_out=6 is not divisible by groups=4"),
    ((1, 8, 8, 8), (3, 3, 4, 8), 4, "kernel in-channel axis is 4 but C_in // groups"),
    ((1, 8, 8, 8), (3, 3, 8, 8), 0, "groups=0 must be a positive int"),
    ((1, 8, 8), (3, 3, 8, 8), 1, "x has rank 3"),
    ((1, 8, 8, 8), (8, 8), 1, "expected (*window, C_in // groups, C_out)"),
]


@pytest.mark.parametrize("x_shape,k_shape,groups,message", BAD_CONV)
@pytest.mark.parametrize("fn", [ops.grouped_conv, ops.grouped_conv_reference])
def test_bad_conv_input_raises_value_error(fn, x_shape, k_shape, groups, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("*", r"\*")):
        fn(jnp.zeros(x_shape), jnp.zeros(k_shape), groups)


@pytest.mark.parametrize("kwargs,message", [
    (dict(padding="FULL"), "padding='FULL' is not valid"),
    (dict(padding=((1, 1),)), "not valid for 2 spatial dim"),
    (dict(strides=(1, 2, 1)), "strides=.* is not valid for 2 spatial dim"),
    (dict(dilation=0), "dilation=0 is not valid"),
])
def test_bad_conv_options_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ops.grouped_conv(jnp.zeros((1, 8, 8, 4)), jnp.zeros((3, 3, 2, 4)), 2, **kwargs)


def test_bad_shuffle_raises_value_error():
    with pytest.raises(ValueError, match="10 channels are not divisible by groups=3"):
        ops.channel_shuffle(jnp.zeros((1, 10)), 3)
    with pytest.raises(ValueError, match="groups=0"):
        ops.channel_shuffle(jnp.zeros((1, 10)), 0)


def test_integer_scalar_groups_and_clear_errors_for_axis_and_dtype():
    x, k = _rand(0, (1, 6, 6, 4)), _rand(1, (3, 3, 2, 4))
    want = ops.grouped_conv(x, k, 2)
    for groups in (np.int64(2), jnp.int32(2)):
        np.testing.assert_array_equal(ops.grouped_conv(x, k, groups), want)
        np.testing.assert_array_equal(ops.channel_shuffle(x, groups), ops.channel_shuffle(x, 2))
    with pytest.raises(ValueError, match="groups=True"):
        ops.grouped_conv(x, k, True)
    with pytest.raises(ValueError, match="axis=4 is out of range for an array of rank 4"):
        ops.channel_shuffle(x, 2, axis=4)
    with pytest.raises(ValueError, match="x is float32 but kernel is bfloat16: cast both to one dtype"):
        ops.grouped_conv(x, k.astype(jnp.bfloat16), 2)
