"""Learned and interleaved groups: IGCV3's and CondenseNet's counts against imgclsmob, the condensation schedule and
mask against CondenseNet's definition, and condensing (gather + group conv + shuffle) against the masked conv."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gconv import analysis, ops
from gconv.complexity import count_macs, count_params
from gconv.models import create_model, model_from_config
from gconv.models.condensenet import condense
from tolerance import U32, assert_within, gamma, linear_bound

# imgclsmob (pytorchcv) `calc_net_weights` and its MAC counter (convolutions and linear layers), 224 x 224.
IMGCLSMOB = {
    "igcv3_w1": (3_491_688, 312_970_176),
    "igcv3_w3d4": (2_638_084, 189_889_232),
    "igcv3_wd2": (1_985_528, 96_913_888),
    "igcv3_wd4": (1_534_020, 34_044_144),
    "condensenet74_c4_g4": (4_773_944, 516_640_576),
    "condensenet74_c8_g8": (2_935_416, 261_545_792),
}
FAST = {"igcv3_wd4", "condensenet74_c8_g8"}  # one representative of each family in the fast tier


def _params(model, shape):
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1,) + shape)))["params"]


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n in FAST else pytest.mark.slow) for n in IMGCLSMOB])
def test_counts_equal_imgclsmob(name):
    model = create_model(name, condensed=True) if name.startswith("condensenet") else create_model(name)
    assert (count_params(_params(model, (224, 224, 3))), count_macs(model, (224, 224, 3))) == IMGCLSMOB[name]


# CondenseNet's README (CIFAR-10): millions of parameters, rounded to 0.01M. They count the whole classifier (a
# condensed one keeps half its inputs: CondenseNet-86 has 0.516M either way, the others differ in the last digit).
README_CIFAR = {50: 0.22, 74: 0.41, 86: 0.52, 98: 0.65, 110: 0.79, 122: 0.95, 182: 4.2}


@pytest.mark.slow
@pytest.mark.parametrize("depth", sorted(README_CIFAR))
def test_cifar_counts_within_rounding_of_the_readme(depth):
    digits = 1 if depth == 182 else 2
    whole = count_params(_params(create_model(f"condensenet{depth}_cifar", condensed=True, head_keep=1.0), (32, 32, 3)))
    assert round(whole / 1e6, digits) == README_CIFAR[depth], whole
    if depth == 86:
        condensed = count_params(_params(create_model("condensenet86_cifar", condensed=True), (32, 32, 3)))
        assert round(condensed / 1e6, 2) == 0.52, condensed


def _reference_stage(progress: float, factor: int) -> int:
    """CondenseNet's `LearnedGroupConv._check_drop`: the first stage i with progress * 2 < (i + 1) / (C - 1)."""
    for i in range(factor - 1):
        if progress * 2 < (i + 1) / (factor - 1):
            return i
    return factor - 1


@pytest.mark.parametrize("factor", [2, 4, 8])
def test_condensation_stage_is_condensenets_schedule(factor, rng):
    half = int(rng.integers(3, 50))  # condense_steps: half of a run of 2 * half steps
    steps = np.arange(2 * half + 3)
    got = np.asarray(ops.learned.condensation_stage(steps, half, factor))
    want = [_reference_stage(s / (2 * half), factor) for s in steps]
    assert got.tolist() == want, f"condense_steps={half}"


def _reference_keep(weights: list[np.ndarray], groups: int, factor: int) -> np.ndarray:
    """CondenseNet's `_dropping`, entering stage 1, 2, ... with the kernel `weights[s - 1]` of that moment: each group
    sums |W * mask| over its filters (o mod G) and masks the next `C_in / C` inputs in ascending order."""
    c_in, c_out = weights[0].shape
    mask = np.ones((c_out, c_in))  # (out, in) as PyTorch's
    delta, count = c_in // factor, 0
    for w in weights:
        shuffled = np.abs(w.T * mask).reshape(c_out // groups, groups, c_in).transpose(1, 0, 2)
        for i in range(groups):
            for d in np.argsort(shuffled[i].sum(0), kind="stable")[count:count + delta]:
                mask[i::groups, d] = 0
        count += delta
    return mask[:groups].astype(bool)  # filter i's row is group i's


@pytest.mark.parametrize("groups,factor", [(2, 2), (4, 4), (2, 4)])
def test_condensing_masks_drop_condensenets_inputs(groups, factor, rng):
    c_in, c_out = 8 * factor, 4 * groups
    weights = [rng.standard_normal((c_in, c_out)).astype(np.float32) for _ in range(factor - 1)]
    keep = jnp.ones((groups, c_in), bool)
    for stage, w in enumerate(weights, start=1):
        keep = ops.learned.condense_keep(jnp.asarray(w)[None, None], keep, jnp.int32(stage), factor)
    np.testing.assert_array_equal(np.asarray(keep), _reference_keep(weights, groups, factor))
    assert (np.asarray(keep).sum(1) == c_in // factor).all()


def test_group_lasso_is_condensenets(rng):
    """`LearnedGroupConv.lasso_loss`: (W * mask)^2 as (C_out / G, G, C_in) (filter o = k G + g), summed over k,
    clamped at 1e-6, square-rooted and summed."""
    groups, c_in, c_out = 4, 12, 8
    kernel = rng.standard_normal((c_in, c_out)).astype(np.float32)
    keep = rng.random((groups, c_in)) < 0.6
    mask = keep[np.arange(c_out) % groups].T  # (C_in, C_out)
    w = ((kernel.astype(np.float64) * mask).T ** 2).reshape(c_out // groups, groups, c_in).sum(0)
    want = np.sqrt(np.maximum(w, 1e-6)).sum()  # in float64: the exact value, for float32's error
    got = ops.learned.group_lasso(jnp.asarray(kernel)[None, None], jnp.asarray(keep))
    # float32, every term positive: each squared norm sums C_out / G squares (gamma(C_out / G + 1)), its root halves
    # that and rounds once (u), the total sums G * C_in roots (gamma(G * C_in)): relative errors that add
    assert abs(float(got) - want) <= (gamma(c_out // groups + 1) + U32 + gamma(groups * c_in)) * want


@pytest.mark.parametrize("groups,factor", [(2, 2), (4, 4), (4, 2)])
def test_condensed_conv_computes_the_masked_conv(groups, factor, rng):
    c_in, c_out, kept = 4 * factor, 3 * groups, 4
    keep = np.zeros((groups, c_in), bool)
    for row in keep:
        row[rng.choice(c_in, kept, replace=False)] = True
    x = jnp.asarray(rng.standard_normal((2, 5, 5, c_in)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((1, 1, c_in, c_out)), jnp.float32)
    masked = ops.learned.masked_kernel(kernel, jnp.asarray(keep))
    want = ops.grouped_conv(x, masked, 1)
    index = ops.learned.condensed_index(keep)
    got = ops.channel_shuffle(ops.grouped_conv(x[..., index], ops.learned.condensed_kernel(kernel, index, groups),
                                               groups), groups)
    # Both sum the same `kept` products per output (the masked conv adds exact zeros): 2 gamma(C_in) |x| |W|.
    assert_within(got, want, linear_bound(lambda a, w: ops.grouped_conv(a, w, 1), x, masked, terms=c_in),
                  "condensed vs masked")


def test_condensed_index_refuses_an_unfinished_condensation():
    keep = np.ones((2, 8), bool)
    keep[0, :4] = False
    with pytest.raises(ValueError, match=r"the groups keep \[4, 8\] inputs.*condense_steps"):
        ops.learned.condensed_index(keep)


# head_keep=1: the condensed classifier keeps all its inputs (CondenseNet's keeps half, a change of function)
TINY = dict(stage_sizes=(2, 2), growth_rates=(4, 8), groups=2, condense_factor=4, stem_strides=1, num_classes=5,
            head_keep=1.0)


def _train_through_condensation(rng, steps: int = 8, condense_steps: int = 4):
    """A tiny learned CondenseNet through `steps` SGD steps on random images, every stage entered on the way."""
    model = create_model("condensenet", condense_steps=condense_steps, **TINY)
    x = jnp.asarray(rng.standard_normal((steps, 4, 16, 16, 3)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 5, (steps, 4)))
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), x[0])

    @jax.jit
    def step(variables, x, y):
        def loss(params):
            logits, state = model.apply({**variables, "params": params}, x, train=True,
                                        mutable=["batch_stats", "condense"])
            return jnp.mean(-jax.nn.log_softmax(logits)[jnp.arange(len(y)), y]), state
        grads, state = jax.grad(loss, has_aux=True)(variables["params"])
        params = jax.tree.map(lambda p, g: p - 0.1 * g, variables["params"], grads)
        return {"params": params, **state}

    for i in range(steps):
        variables = step(variables, x[i], labels[i])
    return model, variables


def test_a_trained_condensenet_condenses_to_the_same_function(rng):
    model, variables = _train_through_condensation(rng)
    assert int(variables["condense"]["step"]) == 8
    for unit in jax.tree.leaves(variables["condense"]["stage1"], is_leaf=lambda n: isinstance(n, dict) and "keep" in n):
        assert int(unit["stage"]) == 3 and (np.asarray(unit["keep"]).sum(1) == unit["keep"].shape[1] // 4).all()
    small, condensed = condense(model, variables)
    x = jnp.asarray(rng.standard_normal((3, 16, 16, 3)), jnp.float32)
    want = model.apply(variables, x)
    got = small.apply(condensed, x)
    # The condensed net sums the same products per output as the masked one (minus exact zeros), in another order:
    # rounding like sqrt(K) u per layer over L layers, x4 for BN, ReLU and pooling (as tests/test_convert.py).
    fan_ins = [int(np.prod(k.shape[:-1])) for k in jax.tree.leaves(variables["params"]) if k.ndim > 1]
    rel = float(jnp.abs(got - want).max() / jnp.abs(want).max())
    assert rel < 4 * len(fan_ins) * np.sqrt(max(fan_ins)) * U32, rel
    assert count_params(condensed["params"]) < count_params(variables["params"])


def test_the_condensed_classifier_keeps_the_inputs_of_largest_weight(rng):
    model, variables = _train_through_condensation(rng, steps=4, condense_steps=2)
    small, condensed = condense(model.clone(head_keep=0.5), variables)
    kernel = np.asarray(variables["params"]["head"]["kernel"])
    index = np.asarray(condensed["condense"]["head_select"]["index"])
    norms = np.abs(kernel).sum(axis=1)
    assert len(index) == len(norms) // 2 and norms[index].min() >= np.delete(norms, index).max()
    np.testing.assert_array_equal(condensed["params"]["head"]["kernel"], kernel[index])
    assert small.head_keep == 0.5 and small.condensed


# --- FLGC ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("balanced", [False, True])
def test_hard_assignments_are_one_hot_forward_and_softmax_backward(balanced, rng):
    logits = jnp.asarray(rng.standard_normal((12, 3)), jnp.float32)
    hard = ops.learned.hard_assignment(logits, balanced)
    assert set(np.unique(np.asarray(hard)).tolist()) <= {0.0, 1.0} and (np.asarray(hard).sum(1) == 1).all()
    if balanced:
        assert (np.asarray(hard).sum(0) == 4).all()
    else:
        np.testing.assert_array_equal(np.argmax(hard, 1), np.argmax(logits, 1))
    cotangent = jnp.asarray(rng.standard_normal((12, 3)), jnp.float32)
    got = jax.vjp(lambda z: ops.learned.hard_assignment(z, balanced), logits)[1](cotangent)[0]
    want = jax.vjp(lambda z: jax.nn.softmax(z, axis=-1), logits)[1](cotangent)[0]
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("balanced", [False, True])
def test_deployed_flgc_computes_the_layers_hard_forward(balanced, rng):
    from gconv.layers import FullyLearnedGroupConv

    layer = FullyLearnedGroupConv(8, (3, 3), groups=4, balanced=balanced, padding=((1, 1), (1, 1)))
    x = jnp.asarray(rng.standard_normal((2, 6, 6, 12)), jnp.float32)
    params = layer.init(jax.random.PRNGKey(0), x)["params"]
    params = {**params, "input_groups": jnp.asarray(rng.standard_normal((12, 4)), jnp.float32),
              "filter_groups": jnp.asarray(rng.standard_normal((8, 4)), jnp.float32)}  # unequal groups unless balanced
    want = layer.apply({"params": params}, x)
    ins, outs = (ops.learned.assigned_groups(params[k], balanced) for k in ("input_groups", "filter_groups"))
    got = ops.learned.assigned_conv(x, params["kernel"], ins, outs, 4, padding=((1, 1), (1, 1))) + params["bias"]
    mask = np.asarray(ins)[:, None] == np.asarray(outs)[None, :]
    masked = params["kernel"] * mask
    conv = lambda a, w: ops.grouped_conv(a, w, 1, padding=((1, 1), (1, 1)))  # noqa: E731
    # the same products per output, summed in another order (the layer adds exact zeros): 2 gamma(9 C_in) |x| |W|
    assert_within(got, want, linear_bound(conv, x, masked, terms=9 * 12), f"balanced={balanced}")


def test_group_lasso_joins_the_training_loss_until_the_last_stage(rng):
    """`group_lasso=lam`: the train step's loss is the cross-entropy plus lam times each learned layer's
    `ops.learned.group_lasso` (on the mask the step leaves), until the last condensation stage, where it is 0."""
    import optax

    from gconv import train
    from gconv.config import base_config

    optim = base_config().optim
    optim.learning_rate, optim.weight_decay, optim.warmup_epochs = 0.0, 0.0, 0.0  # the state's parameters stay
    lam, (tx, _) = 1e-3, train.create_optimizer(optim, 10, 100)
    model = create_model("condensenet", condense_steps=4, group_lasso=lam, **TINY)
    x = jnp.asarray(rng.standard_normal((4, 16, 16, 3)), jnp.float32)
    batch = {"image": x, "label": jnp.asarray(rng.integers(0, 5, (4,)))}
    state = train.create_train_state(model, tx, (16, 16, 3), seed=int(rng.integers(2**31)))
    step = jax.jit(functools.partial(train.train_step, model=model, tx=tx))
    forward = jax.jit(lambda v: model.apply(v, x, train=True, mutable=["batch_stats", "condense"])[0])
    lasso_of = jax.jit(ops.learned.group_lasso)
    for i in range(6):  # steps 0..5 of a 4-step schedule: stages 0, 0, 1, 2, 3 (the last), 3
        new, metrics = step(state, batch)
        logits = forward(state.variables())
        cross_entropy = float(jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])))
        kernels = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(state.params) if "conv1" in str(path)]
        keeps = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(new.model_state) if "keep" in str(path)]
        stages = {int(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(new.model_state)
                  if "'stage'" in str(path)}
        lasso = sum(float(lasso_of(k, m)) for k, m in zip(kernels, keeps, strict=True))
        want = cross_entropy + (lam * lasso if stages != {3} else 0.0)
        # the same sums in the same program up to fusion: a few roundings of the loss's magnitude
        np.testing.assert_allclose(float(metrics["loss"]), want, rtol=64 * U32, err_msg=f"step {i}")
        assert lam * lasso > 1e3 * 64 * U32 * want  # the term is visible above that tolerance
        state = new
    assert stages == {3}


def test_flgc_learns_a_grouping_hidden_in_its_data(rng):
    """64 FLGC layers (8 -> 8 channels, 2 balanced groups), each fitting a teacher whose inputs reach its filters in
    two hidden blocks (random channels), trained at once (vmap). A trial succeeds when the learned assignment puts
    exactly the teacher's input-filter pairs in the same group. Chance: 1 / 2450 (35 ways to halve the inputs, 35 the
    filters, 2 pairings). The straight-through assignment gets stuck now and then (a filter outside its inputs' group
    sees nothing it could learn from): 112/200 and 114/200 trials succeeded on two seeds, p ~ 0.56. At least 12 of 64
    are asked: P(fewer | p = 0.45) = 2.6e-6, P(as many | chance) < 1e-15."""
    import optax

    from gconv.layers import FullyLearnedGroupConv

    trials, c, groups, steps, batch = 64, 8, 2, 300, 256
    gin = np.stack([rng.permutation(c) % groups for _ in range(trials)])  # each trial's hidden blocks
    gout = np.stack([rng.permutation(c) % groups for _ in range(trials)])
    same = gin[:, :, None] == gout[:, None, :]
    teacher = jnp.asarray(rng.standard_normal((trials, c, c)) * same, jnp.float32)
    layer = FullyLearnedGroupConv(c, (1, 1), groups=groups, balanced=True, use_bias=False)
    keys = jax.random.split(jax.random.PRNGKey(int(rng.integers(2**31))), 2 * trials)
    params = jax.vmap(lambda k: layer.init(k, jnp.zeros((1, 1, 1, c)))["params"])(keys[:trials])
    opt = optax.adam(0.05)

    def fit(params, teacher, key):
        def step(carry, k):
            p, state = carry
            x = jax.random.normal(k, (batch, c))
            loss = lambda q: jnp.mean((layer.apply({"params": q}, x[:, None, None])[:, 0, 0] - x @ teacher) ** 2)
            updates, state = opt.update(jax.grad(loss)(p), state, p)
            return (optax.apply_updates(p, updates), state), None
        return jax.lax.scan(step, (params, opt.init(params)), jax.random.split(key, steps))[0][0]

    params = jax.jit(jax.vmap(fit))(params, teacher, keys[trials:])
    ins, outs = ([ops.learned.assigned_groups(z, balanced=True) for z in params[k]]
                 for k in ("input_groups", "filter_groups"))
    learned_same = np.stack([i[:, None] == o[None, :] for i, o in zip(ins, outs)])
    found = int((learned_same == same).all(axis=(1, 2)).sum())
    assert found >= 12, f"{found} of {trials} FLGC layers learned the hidden grouping (at least 12 expected)"


# --- a learned CondenseNet through launch.py: condensation state in the checkpoint, exact resume ------------------

LEARNED = ["--config", "experiments/learned_groups.py:local", "--point", "learned", "--skip_analysis",
           "--config.num_steps=40", "--config.checkpoint_every_steps=2", "--config.log_every_steps=1",
           "--config.eval_every_steps=20"]


@pytest.mark.slow
def test_a_learned_condensenet_stopped_mid_condensation_resumes_exactly(tmp_path):
    """40 steps condense over the first 20 (C = 4: stages entered at steps 7, 14 and 20); a SIGTERM after the first
    metrics stops the run inside that schedule, and the relaunch must give the uninterrupted run's metrics."""
    import signal

    from conftest import has_content, launch, start, strip_timing, wait_until
    from gconv.metrics_log import read_metrics

    launch(*LEARNED, "--workdir", str(tmp_path / "straight"))
    run = tmp_path / "stopped" / "learned"
    proc = start(*LEARNED, "--workdir", str(tmp_path / "stopped"))
    wait_until(lambda: has_content(run / "metrics.jsonl"), proc, "the first metrics")
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out
    saved = int(out.split("SIGTERM: saved checkpoint at step ")[1].split()[0].rstrip(".;,"))
    assert saved < 20, f"the run reached step {saved} before the signal: no condensation stage left to resume into"
    launch(*LEARNED, "--workdir", str(tmp_path / "stopped"))
    records = lambda d: strip_timing(read_metrics(d / "learned" / "metrics.jsonl"))  # noqa: E731
    assert records(tmp_path / "stopped") == records(tmp_path / "straight")


# --- what the groups learned ---------------------------------------------------------------------------------------

def test_the_learned_group_score_finds_groups_that_keep_correlated_inputs_together(rng):
    """Inputs 0, 2, 4, 6 respond together, and so do 1, 3, 5, 7 (|corr| 0.9 within, 0.1 across): groups that keep
    the parities apart score 9, groups that mix them score lower, and the view sorts the inputs into blocks."""
    parity = np.arange(8) % 2
    corr = np.where(parity[:, None] == parity[None, :], 0.9, 0.1)
    np.fill_diagonal(corr, 1.0)
    apart = np.stack([parity == 0, parity == 1])
    score = analysis.learned_group_score(apart, corr)
    assert score["inside"] == pytest.approx(0.9) and score["outside"] == pytest.approx(0.1)
    assert score["ratio"] == pytest.approx(9.0)
    mixed = np.stack([np.arange(8) < 4, np.arange(8) >= 4])  # two of each parity per group
    assert analysis.learned_group_score(mixed, corr)["ratio"] < score["ratio"]
    shuffled = apart[:, rng.permutation(8)]
    np.testing.assert_array_equal(analysis.connectivity_view(shuffled),
                                  np.kron(np.eye(2), np.ones((1, 4))).astype(np.float32))
    masks = {"stage1/unit0/conv1": apart, "stage1/unit1/conv1": np.ones((2, 8), bool), "stage2/unit0/conv1": apart}
    assert analysis.kept_fractions(masks) == {"stage1": 0.75, "stage2": 0.5}


def test_learned_input_correlations_are_those_of_the_layers_inputs(rng):
    model, variables = _train_through_condensation(rng, steps=4, condense_steps=2)
    x = jnp.asarray(rng.standard_normal((4, 16, 16, 3)), jnp.float32)
    corrs = analysis.learned_input_correlations(model, variables, x)
    masks = analysis.learned_masks(variables)
    assert list(corrs) == list(masks) == [f"stage{s}/unit{u}/conv1" for s in (1, 2) for u in (0, 1)]
    for path, corr in corrs.items():
        assert corr.shape == (masks[path].shape[1],) * 2 and np.allclose(corr, corr.T)
        live = np.diag(corr) > 0.5  # a channel that never varies (a dead ReLU) has no correlation
        np.testing.assert_allclose(np.diag(corr)[live], 1.0, rtol=1e-6)


def test_the_experiments_points_are_matched_in_macs():
    """experiments/learned_groups.py at CondenseNet-86: the dense point (half the growth, no groups) within 1 % of
    the condensed network's MACs, which the learned one reaches by condensing and the fixed one has throughout."""
    from gconv.config import apply_overrides, load_experiment

    config, sweep = load_experiment("experiments/learned_groups.py")
    macs = {}
    for point in sweep:
        point_config = apply_overrides(config.copy_and_resolve_references(),
                                       {k: v for k, v in point.items() if k != "name"})
        model = model_from_config(point_config.model, 10)
        if point["name"] == "learned":
            model = model.clone(condensed=True)  # what it condenses to
        macs[point["name"]] = count_macs(model, (32, 32, 3))
    assert macs["learned"] == macs["fixed"] == 62_377_888
    assert abs(macs["dense"] / macs["fixed"] - 1) < 0.01, macs


@pytest.mark.slow
def test_the_local_experiment_reports_what_the_groups_learned(cli, tmp_path):
    import json

    import matplotlib.image

    assert cli("--config", "experiments/learned_groups.py:local", "--workdir", str(tmp_path),
               "--config.mesh.data=1") == 0
    report = (tmp_path / "report.md").read_text()
    assert all(f"| {point} |" in report for point in ("dense", "learned", "fixed", "flgc"))
    assert "learned groups: abs corr in / out" in report
    learned = json.loads((tmp_path / "learned" / "analysis" / "analysis.json").read_text())["learned_groups"]
    assert [layer["layer"] for layer in learned["layers"]] == [f"stage{s}/unit0/conv1" for s in (1, 2, 3)]
    assert all(layer["kept"] == 0.25 for layer in learned["layers"])  # C = 4: every stage passed, a quarter kept
    assert learned["kept_by_stage"] == {"stage1": 0.25, "stage2": 0.25, "stage3": 0.25}
    image = matplotlib.image.imread(tmp_path / "learned" / "analysis" / "learned_groups.png")
    assert float(image[..., :3].std()) > 0.01
    fixed = json.loads((tmp_path / "fixed" / "analysis" / "analysis.json").read_text())
    assert fixed["learned_groups"] is None  # the condensed shape trained from the start learns no groups


@pytest.mark.parametrize("group_conv", ["flgc", pytest.param("flgc_balanced", marks=pytest.mark.slow)])
def test_any_family_learns_its_groups_by_a_config_field(group_conv, rng):
    """`group_conv="flgc"` makes every group conv that is not depthwise an FLGC layer (dense kernel, assignment
    logits), leaving dense and depthwise convs as they are; the model trains (the logits receive gradients)."""
    model = create_model("shufflenet_g3_wd4", num_classes=5, stage_sizes=(1, 1, 1), group_conv=group_conv)
    x = jnp.asarray(rng.standard_normal((2, 32, 32, 3)), jnp.float32)
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), x)
    unit = variables["params"]["stage3"]["unit0"]
    learned = {name for name, leaf in unit.items() if "input_groups" in leaf}
    assert learned and all(unit[name]["kernel"].shape[-2] == unit[name]["input_groups"].shape[0] for name in learned)
    assert all("input_groups" not in leaf for name, leaf in unit.items() if "dw" in name)  # depthwise stays fixed

    def loss(params):
        logits, _ = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
        return jnp.mean(logits ** 2)

    grads = jax.jit(jax.grad(loss))(variables["params"])["stage3"]["unit0"]
    assert all(float(jnp.abs(grads[name]["input_groups"]).sum()) > 0 for name in learned)
    with pytest.raises(ValueError, match="group_conv='learned' is not one of"):
        create_model("shufflenet_g3_wd4", group_conv="learned").init(jax.random.PRNGKey(0), x)
