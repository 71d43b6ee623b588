"""Many devices on 8 simulated CPU devices: data parallel == one device, pmap == shard_map, HLO, checkpoints."""
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from gconv import parallel, train
from gconv.collectives import GroupSplit
from gconv.config import base_config
from gconv.models import create_model

from conftest import TINY, checkpoint_steps, launch, tiered
from tolerance import step_rtol


def _max_diff(a, b):
    return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(jnp.max(jnp.abs(x - y))), a, b)))


@pytest.fixture(scope="module")
def setup():
    assert len(jax.devices()) == 8, "the suite runs with XLA_FLAGS=--xla_force_host_platform_device_count=8"
    config = base_config()
    kw = dict(num_classes=10, stage_sizes=(1, 1, 1))
    single = create_model("resnext11_4x4d", **kw)
    synced = create_model("resnext11_4x4d", axis_name=parallel.DATA, **kw)
    tx, schedule = train.create_optimizer(config.optim, 10, 100)
    state = train.create_train_state(single, tx, (16, 16, 3), 0)
    # Zero-mean images: BN's variance E[x^2] - E[x]^2 cancels badly in fp32 on shifted inputs, which would
    # swamp the per-device summation order this module compares.
    batch = {"image": jax.random.normal(jax.random.PRNGKey(1), (32, 16, 16, 3)),
             "label": jnp.arange(32) % 10}
    make_step = lambda model: functools.partial(train.train_step, model=model, tx=tx, schedule=schedule)  # noqa
    return state, batch, make_step(single), make_step(synced)


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
    state, batch, step1, step8 = setup
    s1, m1 = jax.jit(step1)(state, batch)
    mesh = parallel.make_mesh({"data": 8, "model": 1})
    s8, m8 = parallel.shard_step(step8, mesh, donate=False)(jax.device_put(state, parallel.replicated(mesh)),
                                                               parallel.shard_batch(batch, mesh))
    rtol = step_rtol(batch["image"].size // 3)  # BN's sums: batch x positions; parameters and statistics are O(1)
    for k in ("loss", "accuracy", "grad_norm"):
        np.testing.assert_allclose(m8[k], m1[k], rtol=rtol)
    assert _max_diff(s1.params, s8.params) < rtol  # so the gradients agree
    assert _max_diff(s1.batch_stats, s8.batch_stats) < rtol  # BN statistics of the global batch
    # Without cross-device BN the statistics would be per-device: shard_map's replication check refuses such a
    # step before it runs (its BN statistics cannot be replicated, as the state's out_specs say they are).
    with pytest.raises(ValueError, match="varying over {data}"):
        parallel.shard_step(step1, mesh, donate=False)(
            jax.device_put(state, parallel.replicated(mesh)), parallel.shard_batch(batch, mesh))


def test_pmap_path_equals_shard_map_path(setup):
    state, batch, _, step8 = setup
    mesh = parallel.make_mesh({"data": 8, "model": 1})
    s_sm, m_sm = parallel.shard_step(step8, mesh, donate=False)(
        jax.device_put(state, parallel.replicated(mesh)), parallel.shard_batch(batch, mesh))
    s_pm, m_pm = parallel.pmap_data_parallel(step8)(state, batch)
    # The same per-device forward (equal loss and BN statistics, bit for bit). The gradients of the replicated
    # parameters are summed in another place: under shard_map's replication types by the transpose of their
    # implicit broadcast, under pmap by an explicit pmean. One update of parameters of size O(1): a few u apart.
    assert float(m_pm["loss"]) == float(m_sm["loss"]) and _max_diff(s_pm.batch_stats, s_sm.batch_stats) == 0.0
    assert _max_diff(s_pm.params, s_sm.params) < step_rtol(batch["image"].size // 3)


def test_data_parallel_hlo_keeps_grouped_convs_local(setup):
    """No all-gather of activations: every device convolves its own slice; only reductions cross devices."""
    state, batch, _, step8 = setup
    mesh = parallel.make_mesh({"data": 8, "model": 1})
    hlo = parallel.shard_step(step8, mesh, donate=False).lower(
        jax.device_put(state, parallel.replicated(mesh)), parallel.shard_batch(batch, mesh)).compile().as_text()
    assert "all-gather" not in hlo
    assert "all-reduce" in hlo
    # The convolutions see the per-device batch of 32 / 8 = 4 images; the global (32, 16, 16, 3) batch never exists.
    assert "f32[4,16,16,3]" in hlo and "f32[32,16,16,3]" not in hlo


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
    from gconv import collectives, ops

    mesh = parallel.make_mesh({"data": 1, "model": 4})
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 64))  # 8 groups of 8 channels, 2 groups per device
    spec = jax.sharding.PartitionSpec(None, None, parallel.MODEL)
    sharded = jax.shard_map(lambda v: collectives.sharded_channel_shuffle(v, 8, parallel.MODEL, 4), mesh=mesh,
                            in_specs=spec, out_specs=spec, check_vma=False)
    np.testing.assert_array_equal(jax.jit(sharded)(x), ops.channel_shuffle(x, 8))
    with pytest.raises(ValueError, match="cannot be split over 4 devices"):
        collectives.sharded_channel_shuffle(jnp.zeros((2, 9)), 6, parallel.MODEL, 4)


@pytest.mark.parametrize("name", tiered(["resnext11_8x4d", "shufflenet_g8_w1"], fast=["resnext11_8x4d"]))
def test_group_parallel_train_step_on_a_2x4_mesh_equals_one_device(name):
    """ResNeXt blocks (column/row-parallel 1x1s around local grouped 3x3s) and ShuffleNet v1 units (local, one
    all_to_all per shuffle), groups split over model=4 and the batch over data=2: forward (loss), gradients
    (parameters after one SGD step) and BN statistics equal the unsharded model's."""
    config = base_config()
    kw = dict(num_classes=10, stage_sizes=(1, 1, 1))
    single = create_model(name, **kw)
    local = create_model(name, axis_name=parallel.DATA, group_split=GroupSplit(parallel.MODEL, 4), **kw)
    tx, schedule = train.create_optimizer(config.optim, 10, 100)
    state = train.create_train_state(single, tx, (32, 32, 3), 0)
    batch = {"image": 1.0 + jax.random.normal(jax.random.PRNGKey(1), (8, 32, 32, 3)), "label": jnp.arange(8) % 10}
    s1, m1 = jax.jit(functools.partial(train.train_step, model=single, tx=tx, schedule=schedule))(state, batch)
    mesh = parallel.make_mesh({"data": 2, "model": 4})
    specs = parallel.partition_specs(state, parallel.group_parallel_rules(single))
    step = parallel.shard_step(functools.partial(train.train_step, model=local, tx=tx, schedule=schedule,
                                                 grad_norm=parallel.split_norm(specs.params)), mesh, specs, donate=False)
    placed = parallel.shard_state(state, mesh, specs)
    s8, m8 = step(placed, parallel.shard_batch(batch, mesh))
    rtol = step_rtol(batch["image"].size // 3)  # as in the data-parallel test: sums of batch x positions
    np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=rtol)
    np.testing.assert_allclose(m8["grad_norm"], m1["grad_norm"], rtol=rtol)  # every device's shard counted
    assert _max_diff(s1.params, state.params) > 1e-3  # the step moved the parameters
    assert _max_diff(s1.params, s8.params) < rtol
    assert _max_diff(s1.batch_stats, s8.batch_stats) < rtol
    # Each device holds only its groups' weights: a grouped kernel is split 4 ways.
    kernel = s8.params["stage2"]["block0" if "resnext" in name else "unit0"]
    kernel = kernel["conv_group" if "resnext" in name else "expand_conv"]["kernel"]
    assert {s.data.shape[-1] for s in kernel.addressable_shards} == {kernel.shape[-1] // 4}
    hlo = step.lower(placed, parallel.shard_batch(batch, mesh)).compile().as_text()
    if "shufflenet" in name:
        assert "all-to-all" in hlo  # the channel shuffle
    else:
        assert "all-gather" not in hlo  # ResNeXt blocks need only reductions


def test_group_parallel_refuses_what_it_cannot_split():
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
