"""AlexNet's filter groups and Ioannou's root networks: every count of the thesis' tables, exactly, and the layers
that make them (LRN, Caffe pooling, grouping schemes)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gconv.complexity import counts, layer_costs
from gconv.models import create_model, family_of, list_models, model_from_config
from gconv.layers import record_calls
from gconv.models.alexnet import local_response_norm

# Ioannou's thesis (yanii/phd-thesis, rootdata/): weights and MACs in its convention (conv and fc weights plus
# biases, no normalisation layers; MACs plus one per bias). alexnetma.csv's header swaps its two count columns.
THESIS_ALEXNET = {  # at 227x227
    "alexnet_g1": (62_378_344, 1_135_266_664),
    "alexnet_g2": (60_965_224, 724_417_384),
    "alexnet_g4": (60_258_664, 518_992_744),
}
THESIS_NIN = {  # CIFAR-10, 32x32: nincifar.csv, nincifar_root_s.csv, nincifar_tree_s.csv, nincifar_col_s.csv
    "nin_cifar": (966_986, 222_487_946),
    "nin_cifar_root2": (736_586, 163_505_546), "nin_cifar_root4": (455_498, 123_397_514),
    "nin_cifar_root8": (314_954, 103_343_498), "nin_cifar_root16": (244_682, 93_316_490),
    "nin_cifar_tree2": (487_754, 147_580_298), "nin_cifar_tree4": (331_082, 115_434_890),
    "nin_cifar_tree8": (252_746, 99_362_186), "nin_cifar_tree16": (213_578, 91_325_834),
    "nin_cifar_col2": (570_698, 152_888_714), "nin_cifar_col4": (372_554, 118_089_098),
    "nin_cifar_col8": (273_482, 100_689_290), "nin_cifar_col16": (223_946, 91_989_386),
}
# resnet50ma.csv and resnet50maconvonly.csv: ResNet-50 and its roots, in Caffe's layout (see test below).
THESIS_RESNET50 = {
    "resnext50_1x64d": (25_503_976, 3_857_974_312),
    "resnet50_root2": (25_448_680, 3_684_566_056), "resnet50_root4": (25_126_120, 3_366_650_920),
    "resnet50_root8": (23_195_368, 2_860_876_840), "resnet50_root16": (18_691_048, 2_434_581_544),
    "resnet50_root32": (16_438_888, 2_221_433_896), "resnet50_root64": (15_312_808, 2_114_860_072),
}


@pytest.mark.parametrize("name", sorted(THESIS_ALEXNET) + sorted(THESIS_NIN))
def test_counts_equal_the_thesis_tables(name):
    model = create_model(name)
    got = counts(model, family_of(model).input_shape(model), convention="ioannou")
    assert (got.params, got.macs) == (THESIS_ALEXNET | THESIS_NIN)[name]


@pytest.mark.parametrize("name", sorted(THESIS_RESNET50))
def test_resnet50_roots_differ_from_the_thesis_by_caffes_layout_alone(name):
    """gconv builds torchvision's ResNet-50 (stride on the 3x3, no conv biases); the thesis used Caffe's (stride on
    the first 1x1 of stages 3-5, conv1 with a bias). Layout aside the counts are the same: Caffe has conv1's 64
    biases more (one MAC each), and its strided 1x1s run on a quarter of the positions, saving 3/4 of their MACs."""
    model = create_model(name)
    layers = {layer.path: layer for layer in layer_costs(model, (224, 224, 3))}
    strided_1x1 = sum(layers[f"stage{s}/block0/conv_reduce"].macs for s in (2, 3, 4))
    ours = counts(model, (224, 224, 3), convention="ioannou")
    assert strided_1x1 % 4 == 0 and 3 * strided_1x1 // 4 == 231_211_008  # 3 x 3/4 x 102,760,448
    assert (ours.params + 64, ours.macs - 3 * strided_1x1 // 4 + 64) == THESIS_RESNET50[name]


def test_torchvision_convention_counts_every_parameter():
    model = create_model("nin_cifar")
    bn = 2 * (192 + 160 + 96 + 192 * 4 + 192)  # scale and bias of each BatchNorm (all but the head's conv)
    assert counts(model, (32, 32, 3)).params == THESIS_NIN["nin_cifar"][0] + bn
    with pytest.raises(ValueError, match="convention='caffe'"):
        counts(model, (32, 32, 3), convention="caffe")


@pytest.mark.parametrize("name,conv2a,conv3a", [
    ("nin_cifar", 1, 1), ("nin_cifar_root2", 2, 1), ("nin_cifar_root16", 16, 8), ("nin_cifar_tree4", 4, 8),
    ("nin_cifar_tree16", 16, 32), ("nin_cifar_col8", 8, 8)])
def test_nin_schemes_group_conv2a_and_conv3a(name, conv2a, conv3a):
    model = create_model(name)
    groups = {layer.path: 5 * 5 * 96 * 192 // (layer.params - 192) for layer in layer_costs(model, (32, 32, 3))
              if layer.path == "conv2a"}
    groups |= {layer.path: 3 * 3 * 192 * 192 // (layer.params - 192) for layer in layer_costs(model, (32, 32, 3))
               if layer.path == "conv3a"}
    assert groups == {"conv2a": conv2a, "conv3a": conv3a}
    assert family_of(model).name_of(model) == name


def test_bare_names_take_scheme_and_groups():
    assert model_from_config({"name": "nin_cifar", "scheme": "tree", "groups": 4}, 10) == create_model(
        "nin_cifar_tree4")
    assert create_model("alexnet", groups=4) == create_model("alexnet_g4")
    with pytest.raises(ValueError, match="already fixes"):
        model_from_config({"name": "nin_cifar_root4", "groups": 8}, 10)
    x = jnp.zeros((1, 32, 32, 3))
    with pytest.raises(ValueError, match="scheme='funnel'"):
        jax.eval_shape(lambda: create_model("nin_cifar", scheme="funnel", groups=4).init(jax.random.PRNGKey(0), x))
    with pytest.raises(ValueError, match="norm='layer'"):
        jax.eval_shape(lambda: create_model("alexnet", norm="layer").init(jax.random.PRNGKey(0), jnp.zeros((1, 227, 227, 3))))
    with pytest.raises(ValueError, match="groups=3 must divide"):
        jax.eval_shape(lambda: create_model("alexnet", groups=3).init(jax.random.PRNGKey(0), jnp.zeros((1, 227, 227, 3))))


def test_feature_map_sizes_are_caffes():
    shapes = {}

    def record(module, args, out):
        shapes["/".join(module.scope.path)] = out.shape[1:3]

    for name, size in (("alexnet_g2", 227), ("nin_cifar_root4", 32)):
        model = create_model(name)
        with record_calls(record):
            jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3))))
    assert [shapes[k] for k in ("conv1", "conv2", "conv3", "conv5")] == [(55, 55), (27, 27), (13, 13), (13, 13)]
    assert [shapes[k] for k in ("conv1a", "conv2a", "conv3a")] == [(32, 32), (16, 16), (8, 8)]
    assert all(layer.biases > 0 for layer in layer_costs(create_model("alexnet_g1"), (227, 227, 3)))  # Caffe's biases


def test_local_response_norm_equals_its_definition(seed):
    x = jax.random.normal(jax.random.PRNGKey(seed), (2, 3, 4, 11)) * 30
    ref = np.empty(x.shape)
    xs = np.asarray(x, np.float64)
    for c in range(11):
        window = (xs[..., max(0, c - 2):c + 3] ** 2).sum(-1)
        ref[..., c] = xs[..., c] / (1.0 + 1e-4 / 5 * window) ** 0.75
    # fp32: a sum of 5 squares and one power, each within a few ulps: relative error well under 1e-5.
    np.testing.assert_allclose(local_response_norm(x), ref, rtol=1e-5)


def test_dropout_is_on_in_training_only():
    model = create_model("alexnet_g2", width_multiplier=0.25, fc_features=32, num_classes=5)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 67, 67, 3))
    variables = jax.jit(model.init)(jax.random.PRNGKey(1), x)
    eval_out = model.apply(variables, x)
    np.testing.assert_array_equal(eval_out, model.apply(variables, x))
    a = model.apply(variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.PRNGKey(2)})[0]
    b = model.apply(variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.PRNGKey(3)})[0]
    assert not np.allclose(a, b)


def test_registry_lists_the_new_names():
    assert list_models("alexnet*") == ["alexnet_g1", "alexnet_g2", "alexnet_g4"]
    assert len(list_models("nin_cifar*")) == 13 and len(list_models("resnet50_root*")) == 6
    root = create_model("resnet50_root16")
    assert tuple(root.stage_groups) == (16, 8, 4, 2) and family_of(root).name_of(root) == "resnet50_root16"


@pytest.mark.slow
@pytest.mark.parametrize("spec,points,extra", [
    ("experiments/deep_roots.py:local", ["nin", "root4"], "mean abs corr in / out"),
    ("experiments/alexnet_groups.py:local", ["g1", "g2"], "colour score by group")])
def test_local_experiment_trains_reports_and_analyses(cli, tmp_path, spec, points, extra):
    import json

    import matplotlib.image

    assert cli("--config", spec, "--workdir", str(tmp_path), "--config.mesh.data=1") == 0
    report = (tmp_path / "report.md").read_text()
    assert all(f"| {p} |" in report for p in points) and extra in report
    assert "![correlation_by_point.png](correlation_by_point.png)" in report
    image = matplotlib.image.imread(tmp_path / "correlation_by_point.png")
    assert image.shape[1] > image.shape[0] and float(image[..., :3].std()) > 0.01  # side by side, not blank
    grouped = json.loads((tmp_path / points[1] / "analysis" / "analysis.json").read_text())
    pair = grouped["pairs"][0]
    assert pair["blocks"] == pair["groups"] == 2 and pair["chance"] == 0.5
    assert 0 < pair["outside"] and 0 < pair["inside"] and 0 < pair["score"] < 1
    if spec.startswith("experiments/alexnet"):
        colour = grouped["first_layer"]["colour_scores"]
        assert len(colour) == 2 and all(0 <= m <= 1 for m, _ in colour)  # one (mean, std) per conv2 group


def test_full_sweeps_carry_the_thesis_figures():
    from gconv.config import load_experiment

    _, roots = load_experiment("experiments/deep_roots.py")
    assert [p["name"] for p in roots][:3] == ["nin", "root2", "root4"] and len(roots) == 13
    assert {p["name"]: p["paper_top1_error"] for p in roots}["root4"] == pytest.approx(100 - 92.02)
    config, alex = load_experiment("experiments/alexnet_groups.py")
    assert config.data.crop_size == 227 and [p["model.groups"] for p in alex] == [1, 2, 4]
    assert (alex[1]["paper_top1_error"], alex[1]["paper_top5_error"]) == pytest.approx((100 - 58.16, 100 - 81.86))
