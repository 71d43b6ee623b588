"""gconv.nnx: the NNX layers against the linen ones, every family's representative as an NNX model equal to its
linen twin bit for bit (eval, train with its batch statistics, gradients), weights both ways, NNX's transforms, and
the NNX loop of docs/nnx.md against launch.py's losses."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import gconv.nnx as gnnx
from conftest import ROOT, TINY, launch_here, tiered
from gconv import complexity, layers, parallel
from gconv.checkpoints import restore_on_host
from gconv.metrics_log import read_metrics
from gconv.models import create_model
from test_models import REPRESENTATIVES
from tolerance import assert_within

SHAPE = (4, 32, 32, 3)  # every representative takes 32x32 (global pooling before the classifier)


def _exact(got, want, what: str) -> None:
    """The NNX model runs the linen definition over the same arrays: the same program, so the same bits."""
    got, want = jax.tree.map(np.asarray, got), jax.tree.map(np.asarray, want)
    assert jax.tree.structure(got) == jax.tree.structure(want), what
    for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
        np.testing.assert_array_equal(g, w, err_msg=f"{what} at {jax.tree_util.keystr(path)}")


@pytest.mark.parametrize("groups,strides,padding", [(1, 1, "SAME"), (4, 2, "VALID"), (8, 1, ((1, 0), (2, 1)))])
def test_nnx_grouped_conv_equals_the_linen_layer_with_its_names_and_shapes(rng, groups, strides, padding):
    x = jnp.asarray(rng.standard_normal((2, 9, 9, 8)), jnp.float32)
    conv = gnnx.GroupedConv(8, 16, (3, 3), groups=groups, strides=strides, padding=padding, rngs=nnx.Rngs(0))
    variables = {"params": {"kernel": conv.kernel[...], "bias": conv.bias[...]}}
    linen = layers.GroupedConv(16, (3, 3), groups=groups, strides=strides, padding=padding)
    assert jax.tree.map(jnp.shape, variables) == jax.tree.map(jnp.shape, linen.init(jax.random.key(0), x))
    _exact(conv(x), linen.apply(variables, x), "output")  # the same op, lowering and operands
    shuffle = gnnx.ChannelShuffle(4)
    _exact(shuffle(x), layers.ChannelShuffle(4).apply({}, x), "shuffle")


def test_nnx_grouped_conv_init_and_errors():
    conv = gnnx.GroupedConv(32, 64, (3, 3), groups=8, rngs=nnx.Rngs(0))
    fan_in = 3 * 3 * 32 // 8  # He-normal over one group's fan-in, as the linen layer
    assert_within(np.std(conv.kernel[...]), np.sqrt(2 / fan_in), 0.1 * np.sqrt(2 / fan_in), "init std")
    with pytest.raises(ValueError, match="groups=3 must divide in_features=32"):
        gnnx.GroupedConv(32, 64, (3, 3), groups=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="input has 16 channels"):
        conv(jnp.zeros((1, 8, 8, 16)))


# One block per stage for the deep ones: every layer kind, stem, stage and family of theirs, a quarter of the compile.
ONE_BLOCK = {"resnext50_32x4d": {"stage_sizes": (1, 1, 1, 1)}, "resnet50_root8": {"stage_sizes": (1, 1, 1, 1)},
             "regnetx_200mf": {"depths": (1, 1, 1, 1)},
             "condensenet86_cifar": {"stage_sizes": (1, 1, 1), "condense_steps": 4}, "igcv3_wd4": {"units": (1,) * 7}}


@pytest.mark.parametrize("name", tiered(REPRESENTATIVES, fast=["resnext11_8x4d"]))
def test_nnx_model_equals_its_linen_twin_in_eval_train_and_gradients(name, rng):
    definition = create_model(name, num_classes=7, **ONE_BLOCK.get(name, {}))
    variables = _random_variables(definition, rng)
    x = jnp.asarray(rng.standard_normal(SHAPE), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 7, SHAPE[0]))
    model = gnnx.from_linen(definition, variables, rngs=nnx.Rngs(dropout=3))
    dropout = {"dropout": nnx.Rngs(dropout=3).dropout()}  # the key the model's stream gives first

    assert _flat_paths(nnx.state(model, nnx.Not(nnx.RngState))) == _flat_paths(variables)  # the linen paths
    _exact(gnnx.to_linen(model), variables, "to_linen(from_linen(v))")

    def loss(logits):
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    graphdef, state = nnx.split(model)

    @jax.jit  # both sides in one program, compiled once: a wrong variable, mode or update still shows
    def both(variables, state):
        def train_loss(params):
            logits, updates = definition.apply({**variables, "params": params}, x, train=True, rngs=dropout,
                                               mutable=[c for c in variables if c != "params"])
            return loss(logits), updates

        linen = definition.apply(variables, x, train=False), jax.value_and_grad(train_loss, has_aux=True)(
            variables["params"])
        model = nnx.merge(graphdef, state)
        model.eval()
        out = model(x)
        model.train()
        return linen, (out, nnx.value_and_grad(lambda m: loss(m(x)))(model)), nnx.state(model)

    (out, ((train_loss, updates), grads)), (nnx_out, (nnx_loss, nnx_grads)), state = both(variables, state)
    nnx.update(model, state)
    _exact(nnx_out, out, "eval")
    _exact(nnx_loss, train_loss, "train loss")
    _exact(nnx.to_pure_dict(nnx_grads)["params"], grads, "gradients")
    _exact({c: v for c, v in gnnx.to_linen(model).items() if c != "params"}, dict(updates),
           "running averages (and the other collections training changes)")
    _exact(gnnx.to_linen(model)["params"], variables["params"], "params (a gradient does not change them)")


def _random_variables(definition, rng) -> dict:
    """Variables of the model's shapes drawn from `rng` (no compiled init): kernels at He scale, BN variances in
    [0.5, 1.5), so that activations stay finite in both modes."""
    abstract = jax.eval_shape(lambda: definition.init(jax.random.key(0), jnp.zeros(SHAPE), train=False))

    def draw(path, leaf):
        if jax.tree_util.keystr(path).endswith("['var']"):
            return jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), leaf.dtype)
        scale = np.sqrt(2 / np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 0.1
        return jnp.asarray(rng.standard_normal(leaf.shape) * scale, leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, jax.tree.map(lambda x: x, abstract))


def _flat_paths(tree) -> list[tuple[str, ...]]:
    return sorted(tuple(str(getattr(k, "key", k)) for k in path) for path, _ in
                  jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(tree) if isinstance(tree, nnx.State)
                                                       else tree)[0])


def test_nnx_transforms_modes_and_counting():
    model = gnnx.create_model("resnext11_2x10d", num_classes=10, input_shape=(8, 8, 1), rngs=nnx.Rngs(0))
    assert isinstance(model, nnx.Module) and model.use_running_average  # built in eval mode
    x = jax.random.normal(jax.random.key(0), (6, 8, 8, 1))
    forward = nnx.jit(lambda m, x: m(x))
    graphdef, state = nnx.split(model)
    _exact(forward(nnx.merge(graphdef, state), x), forward(model, x), "split/merge")
    assert nnx.view(model, use_running_average=False).use_running_average is False and model.use_running_average
    model.train()
    before = gnnx.to_linen(model)["batch_stats"]
    forward(model, x)  # train mode: the running averages move, in place
    after = gnnx.to_linen(model)["batch_stats"]
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))
    model.eval()
    stacked = nnx.jit(nnx.vmap(lambda m, x: m(x), in_axes=(None, 0)))(model, x.reshape(2, 3, 8, 8, 1))
    assert_within(stacked.reshape(6, 10), forward(model, x), 0, "nnx.vmap")  # vmap folds its axis into the batch: the same ops
    linen = create_model("resnext11_2x10d", num_classes=10)
    assert complexity.count_macs(model, (8, 8, 1)) == complexity.count_macs(linen, (8, 8, 1))
    assert complexity.count_params(model) == complexity.count_params(jax.eval_shape(
        lambda: linen.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1))))["params"])


def test_a_launch_checkpoint_loads_into_nnx_and_back(trained_tiny):
    """A checkpoint `launch.py` wrote: its params and statistics into an NNX model, which evaluates as the run's
    linen model does and gives back the same arrays."""
    state = restore_on_host(trained_tiny / "c2" / "checkpoints" / "6" / "default")
    variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
    definition = create_model("resnext11_2x10d", num_classes=10)
    model = gnnx.from_linen(definition, variables)
    x = jax.random.normal(jax.random.key(0), (5, 8, 8, 1))
    _exact(model(x), definition.apply(variables, x, train=False), "eval of the checkpoint")
    _exact(gnnx.to_linen(model), jax.tree.map(jnp.asarray, variables), "weights back")


@pytest.mark.slow
def test_the_nnx_loop_of_the_docs_trains_as_launch_does(tmp_path):
    """docs/nnx.md's loop (its python blocks, run here) and `launch.py` on the same point, seed, data order and
    device: the same operations in the same order (one device, one batch, the same optax chain), so the same 50
    losses bit for bit; a different reduction order would show at step 1 already."""
    from test_docs import blocks

    namespace: dict = {}
    for block in blocks(ROOT / "docs" / "nnx.md"):
        if block.lang == "python":
            exec(compile(block.text, str(block.path), "exec"), namespace)
    launch_here(*TINY, "--config.num_steps=50", "--config.log_every_steps=1", "--workdir", str(tmp_path))
    logged = [r["train_loss"] for r in read_metrics(tmp_path / "c2" / "metrics.jsonl") if "train_loss" in r]
    assert len(namespace["losses"]) == 50 and logged[:50] == namespace["losses"], json.dumps(
        {"nnx": namespace["losses"][:5], "launch": logged[:5]})


def test_nnx_models_carry_the_group_parallel_specs_and_place_themselves_under_a_mesh():
    """Each variable's `out_sharding` is what `gconv.parallel` gives the linen variable at its path; created under
    a mesh, NNX's eager sharding places it so (here the grouped 3x3s split over `model`)."""
    model = gnnx.create_model("resnext11_8x4d", num_classes=10, rngs=nnx.Rngs(0))
    linen = gnnx.to_linen(model)
    want = {c: parallel.partition_specs(tree, parallel.group_parallel_rules(model.definition))
            for c, tree in linen.items()}
    got = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(model, (nnx.Param, nnx.BatchStat))))
    assert got == want and any(spec != P() for spec in jax.tree.leaves(want, is_leaf=lambda s: isinstance(s, P)))
    mesh = jax.make_mesh((2, 4), (parallel.DATA, parallel.MODEL), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
    with jax.set_mesh(mesh):
        placed = gnnx.create_model("resnext11_8x4d", num_classes=10, rngs=nnx.Rngs(0))
    placed_as = jax.tree.map(lambda v, spec: v.sharding.is_equivalent_to(NamedSharding(mesh, spec), v.ndim),
                             gnnx.to_linen(placed), want)
    assert all(jax.tree.leaves(placed_as)), placed_as
    _exact(gnnx.to_linen(placed), linen, "the placed model's values")


def test_terms_a_model_adds_to_its_loss_are_nnx_intermediates():
    """A model's `losses` collection (CondenseNet's group lasso) comes out of an NNX train call as
    `nnx.Intermediate`, NNX's sown values: what `gconv.train.train_step` adds to the loss, bit for bit."""
    model = create_model("condensenet", stage_sizes=(1, 1), growth_rates=(4, 8), groups=2, condense_steps=4,
                         group_lasso=1e-3, stem_strides=1, num_classes=5)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 3))
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), x)
    _, sown = model.apply(variables, x, train=True, mutable=["batch_stats", "condense", "losses"])
    twin = gnnx.from_linen(model, variables)
    twin.train()
    twin(x)
    got = nnx.pop(twin, nnx.Intermediate)["losses"][...]
    _exact(got, sum(jax.tree.leaves(sown["losses"])), "losses")
    assert float(got) > 0
