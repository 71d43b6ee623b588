"""Many devices on 8 simulated CPU devices: the global step jitted on a mesh == one device (data, group and FSDP
sharding), the ops partitioning themselves (HLO), pmap, sharding rules, checkpoints across meshes."""
import functools
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from gconv import parallel, train
from gconv.ops import partition
from jax.sharding import NamedSharding, PartitionSpec as P
from gconv.config import base_config
from gconv.models import create_model

from conftest import TINY, checkpoint_steps, launch, tiered
from tolerance import assert_within, conv_terms, linear_bound, step_rtol


def _max_diff(a, b):
    return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(jnp.max(jnp.abs(x - y))), a, b)))


@pytest.fixture(scope="module")
def setup():
    assert len(jax.devices()) == 8, "the suite runs with XLA_FLAGS=--xla_force_host_platform_device_count=8"
    config = base_config()
    kw = dict(num_classes=10, stage_sizes=(1, 1, 1))
    single = create_model("resnext11_4x4d", **kw)
    tx, _ = train.create_optimizer(config.optim, 10, 100)
    state = train.create_train_state(single, tx, (16, 16, 3), 0)
    # Zero-mean images: BN's variance E[x^2] - E[x]^2 cancels badly in fp32 on shifted inputs, which would
    # swamp the per-device summation order this module compares.
    batch = {"image": jax.random.normal(jax.random.PRNGKey(1), (32, 16, 16, 3)),
             "label": jnp.arange(32) % 10}
    return state, batch, functools.partial(train.train_step, model=single, tx=tx), single


def _on_mesh(step, mesh, specs=P(), batch_spec=P("data")):
    """`step` jitted on `mesh` as gconv.parallel.compile_steps does, and the placing of its arguments."""
    state = parallel.named(specs, mesh)
    jitted = parallel.MeshStep(jax.jit(step, in_shardings=(state, NamedSharding(mesh, batch_spec)),
                                       out_shardings=(state, parallel.replicated(mesh))), mesh)
    place = lambda s, b: (jax.device_put(s, state), jax.device_put(b, NamedSharding(mesh, batch_spec)))  # noqa
    return jitted, place


def test_make_mesh():
    mesh = parallel.make_mesh({"data": -1, "model": 2})
    assert dict(mesh.shape) == {"data": 4, "model": 2}
    assert dict(parallel.make_mesh({"data": 1, "model": 1}).shape) == {"data": 1, "model": 1}
    with pytest.raises(ValueError, match="needs 16 devices, but only 8"):
        parallel.make_mesh({"data": 8, "model": 2})
    with pytest.raises(ValueError, match="not divisible by 3"):
        parallel.make_mesh({"data": -1, "model": 3})
    ids = lambda mesh: [[d.id for d in row] for row in mesh.devices]  # noqa: E731
    assert ids(parallel.make_mesh({"data": 4, "model": 2})) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert ids(parallel.make_mesh({"data": 4, "model": 2, "layout": "model_major"})) == [[0, 4], [1, 5], [2, 6],
                                                                                           [3, 7]]
    with pytest.raises(ValueError, match="mesh.layout='rows' is not known"):
        parallel.make_mesh({"data": 4, "model": 2, "layout": "rows"})
    with pytest.raises(ValueError, match="at most one -1"):
        parallel.make_mesh({"data": -1, "model": -1})
    with pytest.raises(ValueError, match="batch_size=12 is not divisible by the 8 devices"):
        parallel.check_batch_divides(12, parallel.make_mesh({"data": -1, "model": 1}))


def test_data_parallel_step_equals_single_device_step_on_the_global_batch(setup):
    state, batch, step, _ = setup
    s1, m1 = jax.jit(step)(state, batch)
    mesh = parallel.make_mesh({"data": 8, "model": 1})
    jitted, place = _on_mesh(step, mesh)
    s8, m8 = jitted(*place(state, batch))
    rtol = step_rtol(batch["image"].size // 3)  # BN's sums: batch x positions; parameters and statistics are O(1)
    for k in ("loss", "accuracy", "grad_norm"):
        np.testing.assert_allclose(m8[k], m1[k], rtol=rtol)
    assert _max_diff(s1.params, s8.params) < rtol  # so the gradients agree
    assert _max_diff(s1.batch_stats, s8.batch_stats) < rtol  # BN statistics of the global batch


def test_pmap_step_averages_the_devices_steps(setup):
    """pmap: each device normalises with its own rows' BatchNorm statistics (no cross-device BatchNorm in a
    global model) and the gradients, metrics and statistics are averaged. With the same rows on every device
    the per-device statistics are the global ones: the step equals one device's on those rows."""
    state, batch, step, _ = setup
    rows = jax.tree.map(lambda x: x[:4], batch)
    s1, m1 = jax.jit(step)(state, rows)
    s_pm, m_pm = parallel.pmap_data_parallel(step)(state, jax.tree.map(lambda x: jnp.concatenate([x] * 8), rows))
    rtol = step_rtol(rows["image"].size // 3)  # the mean of 8 equal gradients: one rounding of a sum of 8
    np.testing.assert_allclose(m_pm["loss"], m1["loss"], rtol=rtol)
    assert _max_diff(s_pm.params, s1.params) < rtol and _max_diff(s_pm.batch_stats, s1.batch_stats) < rtol
    assert _max_diff(s_pm.params, state.params) > 1e-3  # the step moved them


def test_data_parallel_hlo_keeps_grouped_convs_local(setup):
    """No all-gather of activations: every device convolves its own slice; only reductions cross devices."""
    state, batch, step, _ = setup
    mesh = parallel.make_mesh({"data": 8, "model": 1})
    jitted, place = _on_mesh(step, mesh)
    hlo = jitted.lower(*place(state, batch)).compile().as_text()
    assert "all-gather" not in hlo
    assert "all-reduce" in hlo
    # The convolutions see the per-device batch of 32 / 8 = 4 images; the global (32, 16, 16, 3) batch never exists.
    assert "f32[4,16,16,3]" in hlo and "f32[32,16,16,3]" not in hlo


def test_batch_sharded_grouped_conv_is_not_gathered():
    """The trap the ops partition themselves around (openxla/xla#47945): XLA alone all-gathers a batch-sharded
    grouped conv; `grouped_conv` under `jax.set_mesh` keeps each device's images local (and its result equal)."""
    from gconv import ops

    mesh = parallel.make_mesh({"data": 8, "model": 1})
    x = jax.device_put(jax.random.normal(jax.random.PRNGKey(0), (16, 8, 8, 16)), NamedSharding(mesh, P("data")))
    k = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 4, 16))
    plain = jax.jit(lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=(
        "NHWC", "HWIO", "NHWC"), feature_group_count=4))
    ours = parallel.MeshStep(jax.jit(lambda x, k: ops.grouped_conv(x, k, 4, impl="xla")), mesh)
    assert "all-gather" in plain.lower(x, k).compile().as_text()  # the trap is still there: else drop this test
    assert "all-gather" not in ours.lower(x, k).compile().as_text()
    # The same linear function summed in another order: within 2 gamma(taps x C_in / groups) of it on |x|, |k|.
    bound = linear_bound(lambda a, b: plain(a, b), x, k, terms=conv_terms(k.shape, 16 // 4))
    assert_within(ours(x, k), plain(x, k), bound, "grouped conv split over data")


@pytest.mark.parametrize("axes", tiered([{"data": 8, "model": 1}, {"data": 4, "model": 2}],
                                        fast=[{"data": 4, "model": 2}]), ids=["data=8", "data=4,model=2"])
def test_dense_1x1_kernel_gradient_crosses_the_devices_in_the_kernels_layout(rng, axes):
    """The "dot" lowering's dense 1x1 conv on a split batch (inside the op's `shard_map` on data=8, left to XLA's
    partitioner on data=4 x model=2): its kernel gradient is computed and summed over the devices as (C_in, C_out),
    the kernel's layout, not as (C_out, C_in) to be transposed by every later use of it (bench/RESULTS.md), and
    both cotangents are one device's autodiff within the transposed sums' error (`conv_gradient_bound`). Outside
    a mesh the op is the plain product, which forward-mode autodiff goes through (a bilinear map: its tangent along
    (x, k) is the sum of two products, each, like the value, within gamma(6) |x| |k| of x k (6 terms an output),
    and the sum adds one rounding, u 2 |x| |k| (1 + gamma(6)): so within 4 gamma(6) + 2.1 u <= 4 gamma(7) of 2 x the
    value, i.e. 2 x `linear_bound` with 7 terms)."""
    from gconv import ops
    from tolerance import conv_gradient_bound

    mesh = parallel.make_mesh(axes)
    x, k, g = (rng.standard_normal(shape).astype(np.float32) for shape in ((16, 4, 4, 6), (1, 1, 6, 10),
                                                                            (16, 4, 4, 10)))
    conv = lambda x, k: ops.grouped_conv(x, k, 1, impl="dot")  # noqa: E731
    vjp = jax.jit(lambda x, k, g: jax.vjp(conv, x, k)[1](g))
    split = parallel.MeshStep(vjp, mesh)
    on_batch = NamedSharding(mesh, P("data"))
    args = (jax.device_put(x, on_batch), k, jax.device_put(g, on_batch))
    reduced = [line.split(" all-reduce(")[0] for line in split.lower(*args).compile().as_text().splitlines()
               if " all-reduce(" in line]
    assert any("f32[6,10]" in r for r in reduced) and not any("f32[10,6]" in r for r in reduced), reduced
    reference = lambda a, b: ops.grouped_conv_reference(a, b, 1)  # noqa: E731
    for got, want, bound in zip(split(*args), vjp(x, k, g), conv_gradient_bound(reference, x, k, g)):
        assert_within(got, want, bound, f"the dense 1x1 conv's cotangents on {axes}")
    y, tangent = jax.jvp(conv, (x, k), (x, k))
    assert_within(tangent, 2 * y, 2 * linear_bound(reference, x, k, terms=7), "forward mode outside a mesh")


@pytest.mark.parametrize("target", [{"data": 1, "model": 1}, {"data": 2, "model": 4}])
def test_checkpoint_from_8_devices_restores_onto_another_mesh(setup, tmp_path, target):
    state = setup[0]
    mesh8 = parallel.make_mesh({"data": 8, "model": 1})
    manager = ocp.CheckpointManager(tmp_path.absolute())
    manager.save(1, args=ocp.args.StandardSave(jax.device_put(state, parallel.replicated(mesh8))))
    manager.wait_until_finished()
    mesh = parallel.make_mesh(target)
    like = jax.device_put(jax.tree.map(jnp.zeros_like, state), parallel.replicated(mesh))
    restored = manager.restore(1, args=ocp.args.StandardRestore(like))
    assert _max_diff(restored.params, state.params) == 0.0
    leaf = jax.tree.leaves(restored.params)[0]
    assert leaf.sharding.mesh.devices.size == mesh.devices.size


@pytest.mark.slow
def test_cli_run_on_8_devices_resumes_on_1(tmp_path):
    args = TINY[:-1] + ["--workdir", str(tmp_path), "--config.num_steps=10", "--config.checkpoint_every_steps=5"]
    launch(*args, "--config.mesh.data=8")
    assert checkpoint_steps(tmp_path / "c2")[-1] == 10
    first = json.loads((tmp_path / "c2" / "summary.json").read_text())
    launch(*args, "--config.mesh.data=1")  # restores the 8-device checkpoint onto one device
    again = json.loads((tmp_path / "c2" / "summary.json").read_text())
    assert again["final_top1_error"] == first["final_top1_error"]


# --- group parallel ---------------------------------------------------------------------------------------------

def test_sharded_channel_shuffle_equals_channel_shuffle():
    from gconv import ops
    from gconv.ops.partition import sharded_channel_shuffle

    mesh = parallel.make_mesh({"data": 2, "model": 4})
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 64))  # 8 groups of 8 channels, 2 groups per device
    spec = P(None, None, parallel.MODEL)
    sharded = jax.shard_map(lambda v: sharded_channel_shuffle(v, 8, parallel.MODEL, 4), mesh=mesh,
                            in_specs=spec, out_specs=spec, check_vma=False)
    np.testing.assert_array_equal(jax.jit(sharded)(x), ops.channel_shuffle(x, 8))
    with pytest.raises(ValueError, match="cannot be split over 4 devices"):
        sharded_channel_shuffle(jnp.zeros((2, 9)), 6, parallel.MODEL, 4)
    # The op itself, traced under the mesh with its channels split over model: one all_to_all, the same values.
    placed = jax.device_put(x, NamedSharding(mesh, P("data", None, "model")))
    ours = parallel.MeshStep(jax.jit(lambda v: ops.channel_shuffle(v, 8)), mesh)
    assert "all-to-all" in ours.lower(placed).compile().as_text()
    np.testing.assert_array_equal(ours(placed), ops.channel_shuffle(x, 8))


def _exchanged(hlo: str) -> int:
    """How many arrays a compiled program's all-reduces exchange (XLA's CPU runtime meets the other devices once for
    each operand of an all-reduce)."""
    return sum(len(operands.split(",")) for operands in re.findall(r" all-reduce\(([^)]*)\)", hlo))


def test_norm_and_batch_statistics_cross_the_devices_once(rng):
    """`parallel.sharded_norm` of a tree split over data=2 x model=4 as its specs say is `optax.tree.norm`'s value
    (each is a sum of the N squares in some order: they differ by at most 2 gamma(N) of it, halved by the square
    root) with one array exchanged per set of axes the leaves are split over (here model, and data), where the norm
    traced leaf by leaf exchanges one per split leaf; and
    `layers.BatchNorm`'s two batch statistics, over a batch split over data=8 (traced under the mesh, as the steps
    are), cross as one array (flax's: two); `batch_moments` of a `(C,)` input, which has no batch axis, is the
    input and its square there too."""
    import flax.linen as nn
    import optax
    from gconv import layers
    from tolerance import gamma

    mesh = parallel.make_mesh({"data": 2, "model": 4})
    specs = {"a": P(None, "model"), "b": P("model"), "c": P(), "d": P("data", None), "e": P(None, None, "model")}
    shapes = {"a": (6, 8), "b": (12,), "c": (5,), "d": (4, 3), "e": (2, 3, 16)}
    tree = {k: jax.device_put(rng.standard_normal(shape).astype(np.float32), NamedSharding(mesh, specs[k]))
            for k, shape in shapes.items()}
    programs = {name: parallel.MeshStep(jax.jit(norm), mesh) for name, norm in (
        ("sharded", parallel.sharded_norm(specs)), ("leaf by leaf", optax.tree.norm))}
    got, want = (float(programs[name](tree)) for name in programs)
    total = sum(int(np.prod(shape)) for shape in shapes.values())
    assert_within(got, want, gamma(total) * want, "the norm")
    assert _exchanged(programs["sharded"].lower(tree).compile().as_text()) == 2  # a, b and e; d
    assert _exchanged(programs["leaf by leaf"].lower(tree).compile().as_text()) == 4  # a, b, d and e

    mesh = parallel.make_mesh({"data": 8, "model": 1})
    x = jax.device_put(rng.standard_normal((16, 4, 4, 6)).astype(np.float32), NamedSharding(mesh, P("data")))
    for norm, arrays in ((layers.BatchNorm, 1), (nn.BatchNorm, 2)):
        module = norm(use_running_average=False)
        variables = module.init(jax.random.PRNGKey(0), x)
        apply = parallel.MeshStep(jax.jit(lambda v, x: module.apply(v, x, mutable=["batch_stats"])), mesh)
        assert _exchanged(apply.lower(variables, x).compile().as_text()) == arrays, norm
    c = np.asarray(x[0, 0, 0])  # no batch axis: each channel is its own mean, on any mesh (exact)
    with jax.set_mesh(mesh):
        mean, mean2 = partition.batch_moments(jnp.asarray(c))
    np.testing.assert_array_equal(mean, c)
    np.testing.assert_array_equal(mean2, np.square(c))


@pytest.mark.parametrize("name", tiered(["resnext11_8x4d", "shufflenet_g8_w1"], fast=["resnext11_8x4d"]))
def test_group_parallel_train_step_on_a_2x4_mesh_equals_one_device(name):
    """The global model, its grouped layers split over model=4 by the family's rules (ResNeXt: column-parallel
    reduce 1x1, local grouped 3x3, row-parallel expand 1x1; ShuffleNet v1: local units, one all_to_all per
    shuffle) and the batch over data=2: forward (loss), gradients (parameters after one SGD step) and BN
    statistics equal the one-device step's."""
    config = base_config()
    model = create_model(name, num_classes=10, stage_sizes=(1, 1, 1))
    tx, _ = train.create_optimizer(config.optim, 10, 100)
    state = train.create_train_state(model, tx, (32, 32, 3), 0)
    batch = {"image": 1.0 + jax.random.normal(jax.random.PRNGKey(1), (8, 32, 32, 3)), "label": jnp.arange(8) % 10}
    step = functools.partial(train.train_step, model=model, tx=tx)
    s1, m1 = jax.jit(step)(state, batch)
    mesh = parallel.make_mesh({"data": 2, "model": 4})
    specs = parallel.state_specs(state, "group", model, mesh)
    jitted, place = _on_mesh(step, mesh, specs)
    placed = place(state, batch)
    s8, m8 = jitted(*placed)
    rtol = step_rtol(batch["image"].size // 3)  # as in the data-parallel test: sums of batch x positions
    np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=rtol)
    np.testing.assert_allclose(m8["grad_norm"], m1["grad_norm"], rtol=rtol)
    assert _max_diff(s1.params, state.params) > 1e-3  # the step moved the parameters
    assert _max_diff(s1.params, s8.params) < rtol
    assert _max_diff(s1.batch_stats, s8.batch_stats) < rtol
    # Each device holds only its groups' weights: a grouped kernel is split 4 ways.
    kernel = s8.params["stage2"]["block0" if "resnext" in name else "unit0"]
    kernel = kernel["conv_group" if "resnext" in name else "expand_conv"]["kernel"]
    assert {s.data.shape[-1] for s in kernel.addressable_shards} == {kernel.shape[-1] // 4}
    hlo = jitted.lower(*placed).compile().as_text()
    if "shufflenet" in name:
        assert "all-to-all" in hlo  # the channel shuffle
    else:
        assert "all-gather" not in hlo  # ResNeXt blocks need only reductions


def test_fsdp_step_shards_parameters_and_optimizer_state(setup):
    """FSDP: every leaf of >= FSDP_MIN_SIZE elements (parameters and momentum) split 8 ways over data, so a device
    holds at most 1/8 of them plus the small replicated leaves; the step equals one device's; the HLO gathers
    parameters (per layer), never the activations (no all-gather of a batch-sized array)."""
    state, batch, step, model = setup
    mesh = parallel.make_mesh({"data": 8, "model": 1})
    specs = parallel.state_specs(state, "fsdp", model, mesh)
    jitted, place = _on_mesh(step, mesh, specs)
    placed = place(state, batch)
    s8, m8 = jitted(*placed)
    s1, m1 = jax.jit(step)(state, batch)
    rtol = step_rtol(batch["image"].size // 3)
    np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=rtol)
    assert _max_diff(s1.params, s8.params) < rtol and _max_diff(s1.batch_stats, s8.batch_stats) < rtol
    for tree in (s8.params, s8.opt_state):
        leaves = jax.tree.leaves(tree)
        total = sum(x.size for x in leaves)
        small = sum(x.size for x in leaves if x.size < parallel.FSDP_MIN_SIZE)
        held = sum(x.addressable_shards[0].data.size for x in leaves)  # what device 0 holds
        assert held <= (total - small) / 8 + small, (held, total, small)
        assert small < total / 4  # the bound is about the big leaves
    hlo = jitted.lower(*placed).compile().as_text()
    gathered = re.findall(r"= f32\[([\d,]*)\]\S* all-gather\(", hlo)
    assert gathered, "FSDP gathers its parameters in the step"
    shapes = {s for x in jax.tree.leaves(state.params) for s in (x.shape, tuple(d for d in x.shape if d != 1))}
    assert {tuple(map(int, g.split(","))) for g in gathered} <= shapes  # parameters (1x1s as matrices), no activation


def _rules(*rules):
    return {"strategy": "auto", "rules": rules}


def test_sharding_rules_refuse_what_they_cannot_place(setup):
    state, _, _, model = setup
    mesh = parallel.make_mesh({"data": 2, "model": 4})
    with pytest.raises(ValueError, match=r"match no parameter"):
        parallel.state_specs(state, _rules((r"conv_nothing/kernel", (None, None, None, "model"))), model, mesh)
    with pytest.raises(ValueError, match=r"stem_conv/kernel of shape \(3, 3, 3, 16\) cannot be split"):
        parallel.state_specs(state, _rules((r"stem_conv/kernel", (None, None, "model", None))), model, mesh)
    with pytest.raises(ValueError, match=r"names \['rows'\], not axes of the mesh"):
        parallel.state_specs(state, _rules((r"kernel", ("rows",))), model, mesh)
    with pytest.raises(ValueError, match="sharding.strategy='zero' is not known"):
        parallel.state_specs(state, "zero", model, mesh)
    with pytest.raises(ValueError, match="ShuffleNetV2 has no group-parallel form"):
        parallel.group_parallel_rules(create_model("shufflenet_v2_x0_5"))


@pytest.mark.slow
def test_cli_group_parallel_run_and_preflight(tmp_path):
    proc = launch(*TINY[:-1], "--workdir", str(tmp_path), "--config.num_steps=4", "--config.mesh.data=4",
                  "--config.mesh.model=2")
    assert "resnext11_2x10d" in proc.stdout
    bad = launch("--config", "experiments/default.py:local", "--workdir", str(tmp_path / "bad"),
                 "--config.mesh.model=2", check=False)
    assert bad.returncode != 0 and "sweep point 'c1'" in bad.stderr and "not divisible by mesh.model=2" in bad.stderr
    assert not (tmp_path / "bad").exists()  # refused before anything ran


def test_autotune_measures_one_devices_shapes_under_a_mesh(monkeypatch):
    """Traced under a 2x4 mesh, "auto" measures the conv a device computes (its 4 of 8 images, its 2 of 8 groups),
    on one device, while the outer step is being traced inside the op's shard_map."""
    from gconv import autotune, ops

    monkeypatch.setenv("GCONV_AUTOTUNE", "1")
    monkeypatch.setenv("GCONV_AUTOTUNE_MIN_MACS", "0")
    monkeypatch.delenv("GCONV_AUTOTUNE_CACHE", raising=False)
    autotune.clear()
    mesh = parallel.make_mesh({"data": 2, "model": 4})
    x, k = jnp.ones((8, 6, 6, 32)), jnp.ones((3, 3, 4, 32))
    parallel.MeshStep(jax.jit(lambda a, b: ops.grouped_conv(a, b, 8)), mesh).lower(x, k)
    keys = [json.loads(key.split(" ", 1)[1]) for key in autotune.measurements()]
    autotune.clear()
    assert keys and all(key[3] == [4, 6, 6, 8] and key[5] == [3, 3, 4, 8] and key[7] == 2 for key in keys), keys
