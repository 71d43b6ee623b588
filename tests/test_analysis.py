"""gconv.analysis: block-diagonality on constructed networks, kernel views, compute breakdowns."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gconv import analysis
from gconv.complexity import count_macs
from gconv.layers import GroupedConv
from gconv.models import create_model


class TwoLayers(nn.Module):
    groups_a: int
    groups_b: int

    @nn.compact
    def __call__(self, x, train=False):
        x = GroupedConv(16, (1, 1), groups=self.groups_a, name="a")(x)
        return GroupedConv(16, (1, 1), groups=self.groups_b, name="b")(nn.relu(x))


def _corr(groups_a, groups_b):
    x = jax.random.normal(jax.random.PRNGKey(0), (128, 12, 12, 16))  # independent channels, so independent groups
    model = TwoLayers(groups_a, groups_b)
    variables = jax.jit(model.init)(jax.random.PRNGKey(1), x)
    return analysis.filter_correlation(model, variables, x, "a", "b")


def test_grouped_network_fed_independent_groups_is_block_diagonal():
    corr, score, groups = _corr(4, 4)
    assert corr.shape == (16, 16) and groups == 4
    assert score > 0.95


def test_dense_random_network_scores_near_chance():
    corr, score, groups = _corr(1, 1)
    assert groups == 1 and score == 1.0  # one group holds everything
    assert abs(analysis.block_diagonality(corr, 4) - 0.25) < 0.1  # chance for 4 blocks


def test_several_pairs_from_one_pass_equal_each_pair_alone():
    x = jax.random.normal(jax.random.PRNGKey(0), (16, 6, 6, 16))
    model = TwoLayers(2, 4)
    variables = jax.jit(model.init)(jax.random.PRNGKey(1), x)
    pairs = [("a", "b"), ("b", "a")]
    for (corr, score, groups), pair in zip(analysis.filter_correlations(model, variables, x, pairs), pairs):
        alone = analysis.filter_correlation(model, variables, x, *pair)
        # the same float32 outputs (one forward pass or two of the same program), correlated in float64: equal to
        # float64 rounding of a few hundred terms (~1e-13), far inside 1e-6
        np.testing.assert_allclose(corr, alone[0], rtol=1e-6)
        assert (score, groups) == pytest.approx(alone[1:]) and groups == {"a": 2, "b": 4}[pair[1]]


def test_block_diagonality_of_known_matrices():
    assert analysis.block_diagonality(np.eye(6), 3) == 1.0
    assert analysis.block_diagonality(np.ones((6, 6)), 3) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="does not split into 4 groups"):
        analysis.block_diagonality(np.ones((6, 6)), 4)


def test_unknown_layer_path_raises():
    x = jnp.ones((2, 6, 6, 16))
    model = TwoLayers(4, 4)
    with pytest.raises(ValueError, match=r"no layer at \['c'\]"):
        analysis.filter_correlation(model, model.init(jax.random.PRNGKey(0), x), x, "a", "c")


def test_kernel_views_shapes_and_group_order():
    groups, per_out, per_in = 4, 3, 2
    kernel = np.zeros((3, 3, per_in, groups * per_out))
    for g in range(groups):
        kernel[..., g * per_out:(g + 1) * per_out] = g  # each group's kernels hold its index
    views = analysis.kernel_views(kernel, groups)
    assert len(views) == groups
    assert all(v.shape == (per_out * 4 - 1, per_in * 4 - 1) for v in views)
    for g, view in enumerate(views):
        np.testing.assert_allclose(view[:3, :3], g / (groups - 1))  # scaled over the whole kernel, in order
    rgb = analysis.first_layer_view(np.random.default_rng(0).normal(size=(7, 7, 3, 10)), columns=5)
    assert rgb.shape == (2 * 8 - 1, 5 * 8 - 1, 3)


@pytest.mark.parametrize("name", ["resnext50_32x4d", "shufflenet_g3_w1"])
def test_breakdown_sums_to_count_macs(name):
    model = create_model(name)
    table = analysis.compute_breakdown(model, (224, 224, 3))
    assert sum(c["macs"] for stage in table.values() for c in stage.values()) == count_macs(model, (224, 224, 3))
    grouped = sum(stage.get("grouped", {}).get("macs", 0) for stage in table.values())
    assert grouped > 0


def test_default_layer_pairs_are_grouped_layers():
    resnext = create_model("resnext11_4x4d", num_classes=10)
    assert analysis.default_layer_pairs(resnext)[0] == ("stage1/block0/conv_reduce", "stage1/block0/conv_group")
    assert analysis.default_layer_pairs(create_model("shufflenet_g3_w1"))[0][1] == "stage2/unit1/expand_conv"


# --- constructed answers: exact correlation matrices, scores and colour scores ----------------------------------

class Linear(nn.Module):
    """a: a dense 1x1; b: a grouped 1x1 (stride `stride`). No nonlinearity, so correlations follow from the kernels."""
    groups_b: int
    stride: int = 1

    @nn.compact
    def __call__(self, x, train=False):
        x = GroupedConv(x.shape[-1], (1, 1), name="a")(x)
        return GroupedConv(x.shape[-1], (1, 1), groups=self.groups_b, strides=self.stride, name="b")(x)


def _orthogonal_channels(n=64, c=16):
    """`(n, 1, 1, c)` inputs whose channels are ±1 columns of a Sylvester Hadamard matrix (the all-ones one left
    out): zero mean, unit variance and exactly uncorrelated over the n samples."""
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return jnp.asarray(h[:, 1:c + 1].reshape(n, 1, 1, c), jnp.float32)


def _linear_variables(kernel_b, c=16):
    return {"params": {"a": {"kernel": jnp.eye(c).reshape(1, 1, c, c), "bias": jnp.zeros(c)},
                       "b": {"kernel": jnp.asarray(kernel_b, jnp.float32).reshape(1, 1, *kernel_b.shape),
                             "bias": jnp.zeros(c)}}}


def test_independent_groups_give_the_known_block_diagonal_matrix(rng):
    """a = x (identity), b = each group's channels mixed by its own random block: corr(a_i, b_j) is W[i, j] / ||W[:, j]||
    inside the blocks and exactly 0 outside (the input channels are orthogonal)."""
    c, groups = 16, 4
    blocks = [rng.normal(size=(c // groups, c // groups)) for _ in range(groups)]
    x = _orthogonal_channels(c=c)
    corr, score, got_groups = analysis.filter_correlation(Linear(groups), _linear_variables(np.hstack(blocks)), x,
                                                          "a", "b")
    expected = np.zeros((c, c))
    for g, w in enumerate(blocks):
        expected[g * 4:(g + 1) * 4, g * 4:(g + 1) * 4] = np.abs(w) / np.linalg.norm(w, axis=0)
    # fp32 outputs: sums of 4 products of ±1 and O(1) weights, each within 2^-24 relative; 1e-5 absolute is ~100x that.
    np.testing.assert_allclose(corr, expected, atol=1e-5)
    scores = analysis.score_blocks(corr, got_groups)
    assert got_groups == groups and scores["blocks"] == 4 and scores["chance"] == 0.25
    assert scores["score"] == pytest.approx(1.0, abs=1e-5) and scores["outside"] < 1e-5
    assert scores["inside"] == pytest.approx(expected[expected > 0].sum() / (groups * 16), abs=1e-5)


def test_dense_network_has_no_block_structure(rng):
    """b dense with ±1 weights: every |corr(a_i, b_j)| is exactly 1/sqrt(C), so the score is chance."""
    c = 16
    signs = rng.choice([-1.0, 1.0], size=(c, c))
    corr, _, groups = analysis.filter_correlation(Linear(1), _linear_variables(signs), _orthogonal_channels(c=c),
                                                  "a", "b")
    np.testing.assert_allclose(corr, np.full((c, c), 1 / np.sqrt(c)), atol=1e-5)  # error model as above
    scores = analysis.score_blocks(corr, groups)
    assert groups == 1 and scores["blocks"] == 2  # an ungrouped layer is scored at two blocks
    assert scores["score"] == pytest.approx(0.5, abs=1e-5) and scores["inside"] == pytest.approx(scores["outside"])


def test_smaller_map_is_upsampled_nearest_neighbour(seed):
    x = jax.random.normal(jax.random.PRNGKey(seed), (8, 6, 6, 8))
    model = Linear(2, stride=2)
    variables = jax.jit(model.init)(jax.random.PRNGKey(1), x)
    corr, _, _ = analysis.filter_correlation(model, variables, x, "a", "b")
    outs = analysis.layer_outputs(model, variables, x, ["a", "b"])
    a = np.asarray(outs["a"], np.float64).reshape(-1, 8)
    b = np.asarray(outs["b"], np.float64).repeat(2, axis=1).repeat(2, axis=2).reshape(-1, 8)
    # Both sides standardise the same float64 data; they differ only in summation order (~1e-15).
    np.testing.assert_allclose(corr, np.abs(np.corrcoef(a.T, b.T)[:8, 8:]), atol=1e-9)


def test_colour_scores_of_hand_made_kernels(rng):
    pattern = rng.normal(size=(5, 5))
    grey = np.repeat(pattern[:, :, None], 3, axis=2)
    red = np.stack([pattern, 0 * pattern, 0 * pattern], axis=2)
    opponent = np.stack([pattern, -pattern, 0 * pattern], axis=2)
    kernel = np.stack([grey, 2 * grey, red, opponent], axis=-1)
    np.testing.assert_allclose(analysis.colour_scores(kernel), [0, 0, np.sqrt(2 / 3), 1], atol=1e-12)
    (m0, s0), (m1, s1) = analysis.group_colour_scores(kernel, 2)  # the grey pair, then the coloured pair
    assert (m0, s0) == pytest.approx((0, 0), abs=1e-12)
    assert (m1, s1) == pytest.approx(((np.sqrt(2 / 3) + 1) / 2, (1 - np.sqrt(2 / 3)) / 2))
    panels = analysis.first_layer_by_group(kernel, 2, columns=2)
    assert len(panels) == 2 and panels[0].shape == (5, 11, 3)
    with pytest.raises(ValueError, match="RGB kernel"):
        analysis.colour_scores(np.ones((3, 3, 1, 4)))
    with pytest.raises(ValueError, match="do not split into 3 groups"):
        analysis.group_colour_scores(kernel, 3)


def test_family_declares_what_the_analysis_reads():
    alexnet, nin = create_model("alexnet_g2"), create_model("nin_cifar_root4")
    from gconv.models import family_of

    assert family_of(alexnet).first_conv == "conv1" and family_of(alexnet).first_conv_groups(alexnet) == 2
    assert analysis.default_layer_pairs(nin) == [("conv2c", "conv3a")] and family_of(nin).first_conv == "conv1a"
