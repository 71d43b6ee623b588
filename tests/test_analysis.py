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
    variables = model.init(jax.random.PRNGKey(1), x)
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
    variables = model.init(jax.random.PRNGKey(1), x)
    pairs = [("a", "b"), ("b", "a")]
    for (corr, score, groups), pair in zip(analysis.filter_correlations(model, variables, x, pairs), pairs):
        alone = analysis.filter_correlation(model, variables, x, *pair)
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
