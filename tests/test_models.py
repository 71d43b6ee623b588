"""Model zoo: exact parameter counts, MACs against torchvision/papers, every name builds, gradients, BN, bf16."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gconv.complexity import breakdown, count_macs, count_params, layer_costs, preserving_width
from gconv.models import create_model, family_of, list_models, model_from_config, model_spec
from conftest import tiered
from tolerance import U16B


def _abstract_params(model, res=224):
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, res, res, 3))))["params"]


# torchvision 0.26 / timm (ResNeXt, ShuffleNet v2) and osmr/imgclsmob's table (ShuffleNet v1), exact.
PUBLISHED_PARAMS = {
    "resnext50_32x4d": 25_028_904,
    "resnext101_32x4d": 44_177_704,
    "resnext101_32x8d": 88_791_336,
    "resnext101_64x4d": 83_455_272,
    "shufflenet_v2_x0_5": 1_366_792,
    "shufflenet_v2_x1_0": 2_278_604,
    "shufflenet_v2_x1_5": 3_503_624,
    "shufflenet_v2_x2_0": 7_393_996,
    "shufflenet_g1_w1": 1_531_936,
    "shufflenet_g2_w1": 1_733_848,
    "shufflenet_g3_w1": 1_865_728,
    "shufflenet_g4_w1": 1_968_344,
    "shufflenet_g8_w1": 2_434_768,
    "shufflenet_g1_w3d4": 975_214,
    "shufflenet_g3_w3d4": 1_238_266,
    "shufflenet_g1_wd2": 534_484,
    "shufflenet_g3_wd2": 718_324,
    "shufflenet_g1_wd4": 209_746,
    "shufflenet_g3_wd4": 305_902,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_param_count_equals_published(name):
    assert count_params(_abstract_params(create_model(name))) == PUBLISHED_PARAMS[name]


def test_resnext29_counts_match_paper_table7():
    # Paper Table 7: 8x64d 34.4M, 16x64d 68.1M (rounded to 0.1M).
    for name, millions in (("resnext29_8x64d", 34.4), ("resnext29_16x64d", 68.1)):
        count = count_params(_abstract_params(create_model(name), res=32))
        assert abs(count / 1e6 - millions) < 0.1, (name, count)


@pytest.mark.parametrize("name,gmacs", [("resnext50_32x4d", 4.2305), ("shufflenet_v2_x1_0", 0.1449),
                                        ("resnext101_32x8d", 16.4140), ("shufflenet_v2_x0_5", 0.0405)])
def test_flops_within_2_percent_of_torchvision(name, gmacs):
    assert abs(count_macs(create_model(name), (224, 224, 3)) / 1e9 - gmacs) / gmacs < 0.02


@pytest.mark.parametrize("groups,mflops", [(1, 143), (2, 140), (3, 137), (4, 133), (8, 137)])
def test_shufflenet_v1_complexity_near_paper_table2(groups, mflops):
    ours = count_macs(create_model(f"shufflenet_g{groups}_w1"), (224, 224, 3)) / 1e6
    assert abs(ours - mflops) / mflops < 0.035, ours


def test_preserving_width_reproduces_resnext_table2():
    assert [preserving_width(c) for c in (1, 2, 4, 8, 32)] == [64, 40, 24, 14, 4]
    with pytest.raises(ValueError, match="cardinality=0"):
        preserving_width(0)


def test_breakdown_sums_to_totals():
    model = create_model("resnext11_8x4d")
    table = breakdown(model, (32, 32, 3))
    assert sum(v["macs"] for v in table.values()) == count_macs(model, (32, 32, 3))
    # Conv/dense weights plus BN parameters (2 per channel) make up every parameter.
    conv_params = sum(v["params"] for v in table.values())
    params = _abstract_params(model, 32)
    bn_params = sum(leaf.size for path, leaf in jax.tree_util.tree_leaves_with_path(params)
                    if "bn" in jax.tree_util.keystr(path))
    assert conv_params + bn_params == count_params(params)
    kinds = {layer.kind for layer in layer_costs(create_model("shufflenet_g3_wd4"), (64, 64, 3))}
    assert kinds == {"stem", "dense_1x1", "grouped", "depthwise", "head"}


def test_registry_lists_the_named_models():
    names = list_models()
    for name in ("resnext50_32x4d", "resnext101_32x4d", "resnext101_32x8d", "resnext101_64x4d", "resnext152_32x4d",
                 "resnext29_8x64d", "resnext29_16x64d", "shufflenet_v2_x1_0", "shufflenet_g8_wd4", "shufflenet_g3_w3d2"):
        assert name in names
    assert len(list_models("shufflenet_g*")) == 30
    assert list_models("resnext101*") == ["resnext101_32x4d", "resnext101_32x8d", "resnext101_64x4d"]
    assert model_spec("resnext50_2x40d")[1]["cardinality"] == 2  # any CxDd builds


def test_unknown_name_and_bad_override_raise():
    with pytest.raises(ValueError, match="unknown model 'resnext50_32x4'.*resnext50_32x4d"):
        create_model("resnext50_32x4")
    with pytest.raises(ValueError, match="unknown model 'resnext42_32x4d'"):
        create_model("resnext42_32x4d")
    with pytest.raises(ValueError, match=r"takes no argument\(s\) \['num_class'\].*num_classes"):
        create_model("shufflenet_v2_x1_0", num_class=10)
    with pytest.raises(ValueError, match="groups=5 is not in ShuffleNet v1's Table 1"):
        jax.eval_shape(lambda: create_model("shufflenet_g1_w1", groups=5).init(
            jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3))))


def _tiny(name, **kw):
    """The registered model made small, same layout and groups, fast to compile: one block/unit per stage, or
    (AlexNet, NiN) a quarter of the channels; with the input size it takes."""
    cls, spec = model_spec(name)
    fields = {f for f in cls.__dataclass_fields__}
    if "stage_sizes" in fields:
        small = dict(stage_sizes=(1,) * len(spec.get("stage_sizes", (4, 8, 4))))
    elif "depths" in fields:  # AnyNet
        small = dict(depths=(1,) * len(spec["depths"]))
    elif "units" in fields:  # IGCV3
        small = dict(units=(1,) * 7)
    else:
        small = dict(width_multiplier=0.25) | (dict(fc_features=32) if "fc_features" in fields else {})
    return create_model(name, num_classes=7, **small, **kw)


def _input_size(model):
    return 67 if family_of(model).name == "alexnet" else 32  # AlexNet's strided 11x11 and 3 pools need > 32


# One name of each family and structural variant (stems, stage groups, channel rounding, groups that need
# the shuffle's all-to-all, v2's split units, LRN and dropout, grouping schemes): compiled and run.
REPRESENTATIVES = ["resnext11_8x4d", "resnext50_32x4d", "resnet50_root8", "shufflenet_g3_w1", "shufflenet_g8_wd4",
                   "shufflenet_v2_x0_5", "alexnet_g2", "nin_cifar_tree4", "regnetx_200mf", "igcv3_wd4",
                   "condensenet86_cifar"]


@pytest.mark.parametrize("name", tiered(list_models(), fast=REPRESENTATIVES))
def test_every_name_builds(name):
    """Every registered name, at the input size its counts are given at, from shapes alone."""
    model = create_model(name, num_classes=7)
    shape = (2,) + family_of(model).input_shape(model)
    abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(shape)))
    assert jax.eval_shape(lambda v: model.apply(v, jnp.zeros(shape)), abstract).shape == (2, 7)


@pytest.mark.parametrize("name", REPRESENTATIVES)
def test_representatives_compile_and_run(name):
    tiny = _tiny(name)
    res = _input_size(tiny)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, res, res, 3))
    variables = jax.jit(tiny.init)(jax.random.PRNGKey(0), x)
    logits = jax.jit(tiny.apply)(variables, x)
    assert logits.shape == (2, 7) and bool(jnp.all(jnp.isfinite(logits)))


def test_representatives_cover_every_family():
    from gconv.models import FAMILIES

    assert {family_of(n).name for n in REPRESENTATIVES} == {f.name for f in FAMILIES}


def _loss_and_grads(model, variables, x, y):
    def loss(params):
        logits, _ = model.apply({"params": params, "batch_stats": variables.get("batch_stats", {})}, x, train=True,
                                mutable=["batch_stats"], rngs={"dropout": jax.random.PRNGKey(2)})
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return jax.jit(jax.value_and_grad(loss))(variables["params"])


@pytest.mark.parametrize("name", tiered(["resnext11_4x4d", "shufflenet_g3_wd4", "shufflenet_v2_x0_5", "alexnet_g2",
                                         "nin_cifar_root4", "regnetx_400mf"], fast=["resnext11_4x4d", "shufflenet_g3_wd4"]))
def test_every_parameter_receives_a_gradient(name):
    model = _tiny(name)
    res = _input_size(model)
    x = jax.random.normal(jax.random.PRNGKey(1), (4, res, res, 3))
    y = jnp.arange(4) % 7
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), x)
    loss, grads = _loss_and_grads(model, variables, x, y)
    assert np.isfinite(float(loss))
    dead = [jax.tree_util.keystr(p) for p, g in jax.tree_util.tree_leaves_with_path(grads)
            if not float(jnp.abs(g).max()) > 0]
    assert not dead, dead


def test_batchnorm_train_vs_eval():
    model = _tiny("resnext11_4x4d", bn_momentum=0.5)
    x = 3.0 + 2.0 * jax.random.normal(jax.random.PRNGKey(1), (8, 16, 16, 3))
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), x)
    train_out, updates = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables, x)
    stats_before = variables["batch_stats"]["stem_bn"]
    stats_after = updates["batch_stats"]["stem_bn"]
    assert not np.allclose(stats_before["mean"], stats_after["mean"])  # running stats move in training
    evaluate = jax.jit(lambda v, x: model.apply(v, x, train=False))
    eval_out = evaluate(variables, x)
    assert not np.allclose(train_out, eval_out)  # batch vs running statistics
    np.testing.assert_array_equal(eval_out, evaluate(variables, x))  # eval is deterministic
    with pytest.raises(Exception):  # training without a mutable batch_stats is a mistake, not silently ignored
        jax.eval_shape(lambda: model.apply(variables, x, train=True))


@pytest.mark.parametrize("name", tiered(["resnext11_4x4d", "shufflenet_g2_wd2", "shufflenet_v2_x0_5"],
                                        fast=["shufflenet_g2_wd2"]))
def test_bf16_compute_with_f32_params(name):
    model, model16 = _tiny(name), _tiny(name, dtype=jnp.bfloat16)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
    variables = jax.jit(model16.init)(jax.random.PRNGKey(0), x)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables["params"]))
    logits16 = jax.jit(model16.apply)(variables, x)
    logits32 = jax.jit(model.apply)(variables, x)
    assert logits16.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits16)))
    # Error model: bfloat16 keeps 8 significand bits (u = 2^-8); each of the L conv/dense layers rounds its
    # activations once more, relative to their scale, and BN rescales in between, so the logits move by about
    # L u of their scale (statistically sqrt-growing sums inside a layer stay below that). L counts the kernels.
    depth = sum(1 for path, _ in jax.tree_util.tree_leaves_with_path(variables["params"]) if "kernel" in str(path[-1]))
    scale = float(jnp.abs(logits32).max())
    assert depth * U16B < 0.5, depth  # the model is first order
    np.testing.assert_allclose(logits16, logits32, atol=depth * U16B * scale)


def test_shufflenet_shuffle_switch_changes_function_not_params():
    on, off = _tiny("shufflenet_g3_wd2"), _tiny("shufflenet_g3_wd2", shuffle=False)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
    variables = jax.jit(on.init)(jax.random.PRNGKey(0), x)
    assert jax.tree.map(jnp.shape, variables) == jax.tree.map(jnp.shape, jax.jit(off.init)(jax.random.PRNGKey(0), x))
    assert not np.allclose(jax.jit(on.apply)(variables, x), jax.jit(off.apply)(variables, x))


def test_bare_names_take_their_fields_and_configs_say_each_field_once():
    full = create_model("resnext29_8x64d")
    assert create_model("resnext29", cardinality=8, base_width=64) == full
    assert create_model("shufflenet_v1", groups=8, width_multiplier=0.25) == create_model("shufflenet_g8_wd4")
    with pytest.raises(ValueError, match=r"resnext29 needs \['cardinality', 'base_width'\]"):
        create_model("resnext29")
    with pytest.raises(ValueError, match=r"already fixes \['cardinality'\].*resnext\{depth\}"):
        model_from_config({"name": "resnext29_8x64d", "cardinality": 16}, 10)
    model = model_from_config({"name": "resnext29", "cardinality": 16, "base_width": 4, "dtype": "bfloat16"}, 100)
    family = family_of(model)
    assert family.name_of(model) == "resnext29_16x4d" and model.num_classes == 100 and model.dtype == jnp.bfloat16
    assert family.fields_of(model) == {"cardinality": 16, "width d": 4} and family.groups_of(model) == 16


@pytest.mark.parametrize("name", ["resnext11_8x4d", "resnext50_32x4d", "shufflenet_g3_wd4", "shufflenet_g8_w1",
                                  "shufflenet_v2_x0_5", "shufflenet_v2_x1_5"])
def test_each_name_round_trips_through_its_family(name):
    model = create_model(name)
    assert family_of(model).name_of(model) == name
    assert family_of(name) is family_of(type(model)) is family_of(model)
    noshuffle = create_model("shufflenet_g3_w1", shuffle=False)
    assert family_of(noshuffle).name_of(noshuffle) == "shufflenet_g3_w1_noshuffle"


def test_the_family_of_docs_models_md_registers_and_runs_everywhere():
    """docs/models.md's "Adding a family" example, as written there: one module plus `register`."""
    import re
    import types

    from conftest import ROOT
    from gconv import analysis, parallel
    from gconv.convert import torch_key
    from gconv.models import FAMILIES, register

    text = (ROOT / "docs" / "models.md").read_text().split("## Adding a family", 1)[1]
    module = types.ModuleType("plaingroup")
    exec(re.search(r"```python\n(.*?)```", text, re.S).group(1), module.__dict__)
    register(module.FAMILY)
    try:
        with pytest.raises(ValueError, match="registered already"):
            register(module.FAMILY)
        assert list_models("plain*") == ["plaingroup_g4"]
        model = model_from_config({"name": "plaingroup", "groups": 8}, 10)
        assert family_of(model).name_of(model) == "plaingroup_g8"
        x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3))
        variables = jax.jit(model.init)(jax.random.PRNGKey(1), x)
        assert model.apply(variables, x).shape == (2, 10)
        layers = [layer.path for layer in layer_costs(model, (16, 16, 3))]
        assert layers == ["stem_conv", "stage1_conv", "stage2_conv", "stage3_conv", "head"]
        [(corr, _, groups)] = analysis.filter_correlations(model, variables, x, analysis.default_layer_pairs(model)[:1])
        assert corr.shape == (32, 64) and groups == 8
        with pytest.raises(ValueError, match="no PyTorch layout is known for the plaingroup family"):
            torch_key(model, ("head", "kernel"))
        with pytest.raises(ValueError, match="PlainGroupedNet has no group-parallel form"):
            parallel.group_parallel_rules(model)
    finally:
        FAMILIES.remove(module.FAMILY)


def test_count_flops_is_a_deprecated_name_of_count_macs():
    from gconv.complexity import count_flops

    model = create_model("resnext11_8x4d")
    with pytest.warns(DeprecationWarning, match="renamed count_macs"):
        assert count_flops(model, (32, 32, 3)) == count_macs(model, (32, 32, 3))
