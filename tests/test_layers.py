"""gconv.layers: GroupedConv vs flax.linen.Conv, init scale, the three ResNeXt forms, and use from NNX."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gconv import layers, ops
from tolerance import assert_within, gamma


def _x(shape, seed=0):
    return jax.random.normal(jax.random.PRNGKey(seed), shape)


@pytest.mark.parametrize("groups,strides,padding", [(1, 1, "SAME"), (4, 2, "VALID"), (8, 1, ((1, 0), (2, 1)))])
def test_grouped_conv_params_and_output_match_flax_conv(groups, strides, padding):
    x = _x((2, 9, 9, 8))
    ours = layers.GroupedConv(16, (3, 3), groups=groups, strides=strides, padding=padding)
    flax_conv = nn.Conv(16, (3, 3), feature_group_count=groups, strides=strides, padding=padding)
    variables = ours.init(jax.random.PRNGKey(0), x)
    flax_variables = flax_conv.init(jax.random.PRNGKey(0), x)
    assert jax.tree.map(jnp.shape, variables) == jax.tree.map(jnp.shape, flax_variables)
    # two lowerings of one conv (+ the same bias): 2 gamma(taps x C_in + 1) times the conv of the absolute values
    magnitude = flax_conv.apply(jax.tree.map(jnp.abs, variables), jnp.abs(x))
    assert_within(ours.apply(variables, x), flax_conv.apply(variables, x), 2 * gamma(9 * 8 + 1) * magnitude, "conv")


def test_default_init_is_he_normal_over_group_fan_in():
    groups, c_in = 4, 256
    variables = layers.GroupedConv(512, (3, 3), groups=groups).init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, c_in)))
    fan_in = 3 * 3 * c_in // groups
    std = float(jnp.std(variables["params"]["kernel"]))
    assert abs(std - np.sqrt(2.0 / fan_in)) / np.sqrt(2.0 / fan_in) < 0.05


def test_dtype_and_param_dtype():
    conv = layers.GroupedConv(8, (3, 3), groups=2, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    variables = conv.init(jax.random.PRNGKey(0), jnp.zeros((1, 5, 5, 4)))
    assert variables["params"]["kernel"].dtype == jnp.float32
    assert conv.apply(variables, jnp.ones((1, 5, 5, 4))).dtype == jnp.bfloat16


def test_grouped_conv_layer_rejects_bad_groups():
    with pytest.raises(ValueError, match="groups=3 must divide C_in=8"):
        layers.GroupedConv(12, (3, 3), groups=3).init(jax.random.PRNGKey(0), jnp.zeros((1, 5, 5, 8)))


def test_channel_shuffle_module():
    x = _x((2, 3, 3, 12))
    np.testing.assert_array_equal(layers.ChannelShuffle(3).apply({}, x), ops.channel_shuffle(x, 3))


@pytest.mark.parametrize("cardinality,width", [(1, 8), (4, 3), (8, 2)])
def test_three_resnext_forms_compute_the_same_function(cardinality, width):
    """ResNeXt Fig. 3: (a) split-transform-sum == (b) split-transform-concat == (c) grouped conv."""
    x = _x((2, 7, 7, 16))
    form_c = layers.GroupedTransform(16, cardinality, width)
    params_c = form_c.init(jax.random.PRNGKey(1), x)["params"]
    params_c = jax.tree.map(lambda p: p + 0.1 * _x(p.shape, 2), params_c)  # non-zero biases too
    params_a, params_b = layers.split_transform_params(params_c, cardinality)
    form_a = layers.SplitTransformSum(16, cardinality, width)
    form_b = layers.SplitTransformConcat(16, cardinality, width)
    # The mapped trees have exactly the structure the (a) and (b) modules create themselves.
    for form, mapped in ((form_a, params_a), (form_b, params_b)):
        own = form.init(jax.random.PRNGKey(0), x)["params"]
        assert jax.tree.map(jnp.shape, own) == jax.tree.map(jnp.shape, mapped)
    y_c = form_c.apply({"params": params_c}, x)
    # Error model: each of the three layers sums K_l terms (+ its bias), in another order per form; ReLU is
    # 1-Lipschitz. With |params| and |x| every ReLU passes its input, so form (c) on absolute values is the
    # magnitude M of every layer's sums, and the forms differ by at most 2 (sum_l gamma(K_l)) M <= 2 gamma(sum K_l) M.
    magnitude = form_c.apply({"params": jax.tree.map(jnp.abs, params_c)}, jnp.abs(x))
    bound = 2 * gamma((16 + 1) + (9 * width + 1) + (cardinality * width + 1)) * magnitude
    assert_within(form_a.apply({"params": params_a}, x), y_c, bound, "form (a)")
    assert_within(form_b.apply({"params": params_b}, x), y_c, bound, "form (b)")
    assert float(jnp.std(y_c)) > 0.1  # the comparison is not between zeros


def test_use_from_nnx_through_bridge():
    """A linen GroupedConv inside NNX code: same output as linen with the same parameters, and trainable."""
    x = _x((2, 8, 8, 8))
    conv = nnx.bridge.ToNNX(layers.GroupedConv(16, (3, 3), groups=4), rngs=nnx.Rngs(0))
    nnx.bridge.lazy_init(conv, x)
    y = conv(x)
    kernel, bias = jnp.asarray(conv.kernel[...]), jnp.asarray(conv.bias[...])
    assert kernel.shape == (3, 3, 2, 16)
    y_linen = layers.GroupedConv(16, (3, 3), groups=4).apply({"params": {"kernel": kernel, "bias": bias}}, x)
    np.testing.assert_array_equal(y, y_linen)  # the same module and parameters: the same program
    grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2))(conv)
    assert all(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(nnx.state(grads, nnx.Param)))


def test_batchnorm_is_flax_batchnorm(rng):
    """`layers.BatchNorm` against `flax.linen.BatchNorm`: the same variables (names, shapes, dtypes, initial values)
    and outputs and running statistics up to the order of the statistics' sums. Each statistic sums n = 16*6*6
    terms (|x| or x^2): the two differ by at most 2 gamma(n) of their sums' absolute values; var = E[x^2] - E[x]^2
    carries E[x^2]'s error and 2|E[x]| times E[x]'s (+ 4u of its terms' rounding); y = (x - mean) * scale /
    sqrt(var + eps) + bias moves by |scale| / sqrt(var + eps) per unit of mean and |y - bias| / (2 (var + eps)) per
    unit of var, + 8u of |y| (its elementwise roundings, taken twice). Evaluating (running averages) is bit for bit."""
    x = (3 * rng.standard_normal((16, 6, 6, 12)) + 1).astype(np.float32)
    ours, flax_bn = layers.BatchNorm(momentum=0.9), nn.BatchNorm(momentum=0.9)
    variables = flax_bn.init(jax.random.PRNGKey(0), x, use_running_average=False)
    assert jax.tree.map(lambda a: (a.shape, a.dtype, np.asarray(a).tolist()), variables) == jax.tree.map(
        lambda a: (a.shape, a.dtype, np.asarray(a).tolist()), ours.init(jax.random.PRNGKey(0), x,
                                                                         use_running_average=False))
    variables = jax.tree.map(lambda a: a + 0.3 * rng.standard_normal(a.shape).astype(np.float32), variables)
    variables["batch_stats"]["var"] = np.abs(variables["batch_stats"]["var"]) + 0.5
    got, got_stats = ours.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
    want, want_stats = flax_bn.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
    n, u = x.size // x.shape[-1], 2.0 ** -24
    x64 = x.reshape(-1, 12).astype(np.float64)
    mean, mean2 = x64.mean(0), np.square(x64).mean(0)
    d_mean, d_mean2 = 2 * gamma(n) * np.abs(x64).mean(0), 2 * gamma(n) * mean2
    d_var = d_mean2 + 2 * np.abs(mean) * d_mean + 4 * u * (mean2 + np.square(mean))
    var, scale = mean2 - np.square(mean), np.abs(np.asarray(variables["params"]["scale"], np.float64))
    y = np.asarray(want, np.float64)
    bound = (d_mean * scale / np.sqrt(var + 1e-5) + np.abs(y - np.asarray(variables["params"]["bias"])) * d_var / (
        2 * (var + 1e-5)) + 8 * u * np.abs(y))
    assert_within(got, want, bound, "BatchNorm's output")
    assert_within(got_stats["batch_stats"]["mean"], want_stats["batch_stats"]["mean"],
                  0.1 * d_mean + 4 * u * np.abs(want_stats["batch_stats"]["mean"]), "the running mean")
    assert_within(got_stats["batch_stats"]["var"], want_stats["batch_stats"]["var"],
                  0.1 * d_var + 4 * u * want_stats["batch_stats"]["var"], "the running variance")
    np.testing.assert_array_equal(ours.apply(variables, x, use_running_average=True),
                                  flax_bn.apply(variables, x, use_running_average=True))
