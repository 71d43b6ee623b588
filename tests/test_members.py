"""Members: runs that build the same shapes trained as one program (gconv.members), each equal to its run alone."""
import json
import shutil
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

from gconv import members, ops, parallel, train
from gconv.config import base_config, expand_sweep
from gconv.metrics_log import read_metrics
from gconv.models import create_model
from gconv.ops import choice
from gconv.ops.lowerings import LOWERINGS
from conftest import checkpoint_steps, strip_timing
from tolerance import U32, assert_within, conv_terms, linear_bound, sin_loss_gradient_bound

K = 3
EVAL_EXAMPLES = 360  # digits' evaluation split: one example is 100 / 360 % of top-1 error

# Four runs of one program: two learning rates x two seeds; 6 steps, a log line every 2.
EXPERIMENT = '''
from gconv.config import base_config

VARIANTS = ()


def get_config(arg=None):
    config = base_config()
    config.model.name, config.model.cardinality, config.model.base_width = "resnext11", 2, 10
    config.data.name, config.data.augment, config.data.batch_size = "digits", False, 32
    config.optim.warmup_epochs = 0.0
    config.num_steps, config.log_every_steps, config.eval_every_steps, config.checkpoint_every_steps = 6, 2, 6, 2
    config.keep_checkpoints, config.seeds = 3, 2
    config.mesh.data = 1
    config.members = "on"  # also on the CPU
    return config


def get_sweep(arg=None):
    return [{"name": "lr05", "optim.learning_rate": 0.05}, {"name": "lr02", "optim.learning_rate": 0.02,
                                                              "optim.weight_decay": 1e-4, "optim.momentum": 0.8}]
'''
NAMES = ["lr05_seed0", "lr05_seed1", "lr02_seed0", "lr02_seed1"]


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    path = tmp_path_factory.mktemp("experiment") / "lrs.py"
    path.write_text(EXPERIMENT)
    return str(path)


@pytest.fixture(scope="module")
def sequential(experiment, tmp_path_factory):
    """The four runs, each on its own (`members=off`): the reference the joined runs must equal."""
    from conftest import launch_here

    workdir = tmp_path_factory.mktemp("sequential")
    launch_here("--config", experiment, "--workdir", str(workdir), "--skip_analysis", "--config.members=off")
    return workdir


def _runs(sweep_overrides=(), **overrides):
    config = base_config()
    config.members = "on"
    config.lock()
    sweep = [{"name": "a"}, {"name": "b", "optim.learning_rate": 0.3, "optim.label_smoothing": 0.1},
             {"name": "c", "model.cardinality": 2}, *sweep_overrides]
    return expand_sweep(config, sweep, {k: str(v) for k, v in overrides.items()})


def test_runs_that_differ_only_in_joinable_values_join():
    names = lambda groups: [[n for n, _ in g] for g in groups]  # noqa: E731
    assert names(members.group_runs(_runs(seeds=2))) == [["a_seed0", "a_seed1", "b_seed0", "b_seed1"],
                                                         ["c_seed0", "c_seed1"]]
    assert names(members.group_runs(_runs(seeds=2, members="off"))) == [[n] for n in
                                                                        names(members.group_runs(_runs(seeds=2)))[0]
                                                                        + ["c_seed0", "c_seed1"]]
    assert names(members.group_runs(_runs(seeds=3, members=2)))[:3] == [["a_seed0", "a_seed1"],
                                                                        ["a_seed2", "b_seed0"], ["b_seed1", "b_seed2"]]
    assert names(members.group_runs(_runs(precise_bn_images=64))) == [["a"], ["b"], ["c"]]  # a pass of its own
    with pytest.raises(ValueError, match="mesh.member=2 .* group of 1"):
        members.group_runs(_runs(**{"mesh.member": 2}))
    with pytest.raises(ValueError, match="members='many' is not known"):
        members.group_runs(_runs(members="many"))


def _stacked(rng, shape):
    return jnp.asarray(rng.standard_normal((K,) + shape), jnp.float32)


@pytest.mark.parametrize("impl", list(LOWERINGS) + ["auto"])
@pytest.mark.parametrize("per_member", [False, True], ids=["batching_rule", "per_member"])
def test_every_lowering_stays_correct_over_members(impl, per_member, monkeypatch, rng):
    """K members' convs under `vmap` (each its own input and kernel): through JAX's batching rule (one conv of K x
    the groups) and through gconv's per-member rule, forward and both gradients equal each member's reference."""
    monkeypatch.setattr(choice, "member_loop", lambda: per_member)
    window, groups, c_in = ((1, 1), 4, 8) if impl == "dot" else ((3, 3), 8 if impl == "shift" else 4, 8)
    x, k = _stacked(rng, (2, 6, 6, c_in)), _stacked(rng, window + (c_in // groups, 8))
    kw = dict(strides=2 if impl != "dot" else 1, precision=lax.Precision.HIGHEST)
    conv = lambda a, b: ops.grouped_conv(a, b, groups, impl=impl, **kw)  # noqa: E731
    reference = lambda a, b: ops.grouped_conv_reference(a, b, groups, **kw)  # noqa: E731

    over_members = lambda f: jax.jit(jax.vmap(f, axis_name=choice.MEMBERS))  # noqa: E731

    loss = lambda f: lambda a, b: jnp.sum(jnp.sin(f(a, b)))  # noqa: E731
    got, grads = over_members(conv)(x, k), over_members(jax.grad(loss(conv), argnums=(0, 1)))(x, k)
    for i in range(K):
        assert_within(got[i], reference(x[i], k[i]), linear_bound(reference, x[i], k[i],
                                                                  terms=conv_terms(k.shape[1:], c_in)), impl)
        want = jax.grad(loss(reference), argnums=(0, 1))(x[i], k[i])
        for g, w, bound in zip((grads[0][i], grads[1][i]), want, sin_loss_gradient_bound(reference, x[i], k[i])):
            assert_within(g, w, bound, f"{impl} gradient of member {i}")


def test_measured_choice_for_members_is_keyed_by_their_count(monkeypatch):
    """Batched members (an accelerator's form) are measured afresh, with K in the key; per-member convs (the
    CPU's) take the choice of one run."""
    from gconv import autotune

    monkeypatch.setenv("GCONV_AUTOTUNE", "1")
    monkeypatch.setenv("GCONV_AUTOTUNE_MIN_MACS", "0")
    monkeypatch.delenv("GCONV_AUTOTUNE_CACHE", raising=False)
    autotune.clear()
    x, k = jnp.ones((K, 2, 6, 6, 8)), jnp.ones((K, 3, 3, 2, 8))
    for per_member in (True, False):
        monkeypatch.setattr(choice, "member_loop", lambda: per_member)
        jax.eval_shape(jax.vmap(lambda a, b: ops.grouped_conv(a, b, 4), axis_name=choice.MEMBERS), x, k)
    keys = autotune.measurements()
    assert len(keys) == 4 and sum('{"members": 3}' in key for key in keys) == 2, keys
    autotune.clear()


def test_members_state_starts_as_each_seed_alone_and_is_created_placed():
    model = create_model("resnext11_2x10d", num_classes=10)
    tx, _ = train.create_optimizer(base_config().optim, 10, 100)
    seeds = [3, 4, 5, 6]
    mesh = parallel.make_mesh({"member": 2, "data": 4, "model": 1})
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(parallel.MEMBER))
    stacked = train.create_train_state(model, tx, (8, 8, 1), seeds, shardings=sharding)
    kernel = jax.tree.leaves(stacked.params)[0]
    assert {s.data.shape[0] for s in kernel.addressable_shards} == {2}  # each device: its 2 members only
    for i, seed in enumerate(seeds):
        alone = train.create_train_state(model, tx, (8, 8, 1), seed)
        assert all(np.array_equal(a, b[i]) for a, b in zip(jax.tree.leaves(alone), jax.tree.leaves(stacked)))


def _assert_equal_to_sequential(joined, sequential, names=NAMES):
    """The first logged losses to fp32 rounding (the runs compute the same sums in another order), the final
    evaluation to within one example."""
    for name in names:
        a, b = read_metrics(joined / name / "metrics.jsonl"), read_metrics(sequential / name / "metrics.jsonl")
        assert [r["step"] for r in a] == [r["step"] for r in b]
        # Relative model: a step's sums (the longest: BN over 32 x 64 positions) reorder, ~sqrt(n) u each; the
        # first log line averages two steps of a 3-stage network; 1e-5 is that bound with margin for 2 steps.
        np.testing.assert_allclose(a[0]["train_loss"], b[0]["train_loss"], rtol=1e-5)
        ea, eb = (next(r for r in reversed(x) if "eval_top1_error" in r)["eval_top1_error"] for x in (a, b))
        assert abs(ea - eb) <= 100 / EVAL_EXAMPLES + 1e-9, (name, ea, eb)


@pytest.mark.slow
def test_members_equal_their_sequential_runs_and_keep_their_own_directories(cli, capsys, experiment, sequential,
                                                                            tmp_path):
    assert cli("--config", experiment, "--workdir", str(tmp_path), "--skip_analysis") == 0
    out = capsys.readouterr().out
    assert "one program, 4 members" in out, out
    _assert_equal_to_sequential(tmp_path, sequential)
    losses = {n: read_metrics(tmp_path / n / "metrics.jsonl")[0]["train_loss"] for n in NAMES}
    assert len(set(losses.values())) == 4  # seeds and learning rates differ, and so do their runs
    for name in NAMES:  # each member's directory is a run's directory
        run = tmp_path / name
        config = json.loads((run / "config.json").read_text())
        assert config["seed"] == int(name[-1]) and config["optim"]["learning_rate"] == (0.05 if "05" in name else 0.02)
        assert checkpoint_steps(run) == [2, 4, 6] and (run / "summary.json").exists()
        assert any((run / "tensorboard").iterdir())
    summary = json.loads((tmp_path / "lr02_seed1" / "summary.json").read_text())
    assert cli("eval", str(tmp_path / "lr02_seed1")) == 0  # `eval` reads a member's checkpoint unchanged
    assert f"top-1 error {summary['final_top1_error']:.2f}%" in capsys.readouterr().out
    assert cli("report", str(tmp_path), "--skip_analysis") == 0
    assert "lr05" in capsys.readouterr().out


GROUP = ["--skip_analysis", "--point", "lr05"]  # lr05_seed0 and lr05_seed1, one program


@pytest.fixture(scope="module")
def straight_group(experiment, tmp_path_factory):
    """lr05's two seeds trained as one program, uninterrupted: what a stopped and resumed group must equal."""
    from conftest import launch_here

    workdir = tmp_path_factory.mktemp("straight_group")
    launch_here("--config", experiment, *GROUP, "--workdir", str(workdir))
    return workdir


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["save_cut_short", "unreadable"])
def test_a_group_resumes_at_the_newest_step_every_member_has_exactly(cli, capsys, experiment, straight_group,
                                                                     tmp_path, damage):
    """A stop in the middle of a group's saves leaves one member a checkpoint behind; an unreadable checkpoint is
    set aside. Either way the relaunch resumes every member at the newest step all of them can restore, removes
    the newer ones, and ends with the metrics of the uninterrupted group, exactly."""
    shutil.copytree(straight_group, tmp_path, dirs_exist_ok=True)
    for name in ("lr05_seed0", "lr05_seed1"):
        (tmp_path / name / "summary.json").unlink()
    if damage == "save_cut_short":
        shutil.rmtree(tmp_path / "lr05_seed1" / "checkpoints" / "6")
    else:
        for f in (tmp_path / "lr05_seed1" / "checkpoints" / "6").rglob("*"):
            if f.is_file() and "manifest" in f.name:
                f.write_bytes(b"damaged")
    assert cli("--config", experiment, *GROUP, "--workdir", str(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "checkpoints [6] are past the step its group resumes at (4)" in out and "resuming at step 4" in out, out
    if damage == "unreadable":
        assert "checkpoint step 6" in out and "unreadable" in out
        assert (tmp_path / "lr05_seed1" / "checkpoints_unreadable" / "6").exists()
    for name in ("lr05_seed0", "lr05_seed1"):
        assert strip_timing(read_metrics(tmp_path / name / "metrics.jsonl")) == \
            strip_timing(read_metrics(straight_group / name / "metrics.jsonl"))
        assert checkpoint_steps(tmp_path / name) == [2, 4, 6]
    assert cli("--config", experiment, *GROUP, "--workdir", str(tmp_path)) == 0
    assert capsys.readouterr().out.count("already trained") == 2


def test_a_group_with_a_busy_member_is_refused_before_anything_is_written(cli, capsys, experiment, tmp_path):
    import os
    import socket

    busy = tmp_path / "lr05_seed1"
    busy.mkdir(parents=True)
    (busy / "lock.json").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getppid(), "token": "other",
                                                "started": "now", "heartbeat": 0}))
    assert cli("--config", experiment, *GROUP, "--workdir", str(tmp_path)) == 2
    err = capsys.readouterr().err
    assert f"lr05_seed1 is in use by pid {os.getppid()}" in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["lock.json", "lr05_seed0", "lr05_seed1"]


@pytest.mark.slow
def test_sigterm_saves_every_member_and_the_relaunch_equals_the_uninterrupted_group(cli, capsys, experiment,
                                                                                    straight_group, tmp_path,
                                                                                    monkeypatch):
    """SIGTERM (here sent by the process to itself after step 3, through the loop's own handler) saves every
    member's checkpoint at that step, exits 143, and the relaunch ends with the uninterrupted group's metrics."""
    import os

    from gconv import preemption

    poll = preemption.StopFlag.poll

    def signalled_at_step_3(self, step):
        if step == 3 and self.signum is None:
            os.kill(os.getpid(), signal.SIGTERM)
        return poll(self, step)

    monkeypatch.setattr(preemption.StopFlag, "poll", signalled_at_step_3)
    assert cli("--config", experiment, *GROUP, "--workdir", str(tmp_path)) == 143
    out = capsys.readouterr().out
    assert "SIGTERM: saved checkpoint at step 3" in out and "and its 1 other member(s)" in out, out
    for name in ("lr05_seed0", "lr05_seed1"):
        assert checkpoint_steps(tmp_path / name) == [2, 3] and not (tmp_path / name / "summary.json").exists()
    monkeypatch.setattr(preemption.StopFlag, "poll", poll)
    assert cli("--config", experiment, *GROUP, "--workdir", str(tmp_path)) == 0
    for name in ("lr05_seed0", "lr05_seed1"):
        assert strip_timing(read_metrics(tmp_path / name / "metrics.jsonl")) == \
            strip_timing(read_metrics(straight_group / name / "metrics.jsonl"))


@pytest.mark.slow
def test_a_members_nan_stops_that_member_and_the_others_finish(cli, capsys, experiment, tmp_path):
    experiment_nan = tmp_path / "nan.py"
    experiment_nan.write_text(open(experiment).read().replace('"optim.learning_rate": 0.02', '"optim.learning_rate": 1e30'))
    code = cli("--config", str(experiment_nan), "--workdir", str(tmp_path / "w"), "--skip_analysis",
               "--config.seeds=1")
    captured = capsys.readouterr()
    assert code == 2
    assert "warning: member lr02: non-finite training metrics" in captured.out, captured.out
    assert captured.err.startswith("error: lr02: non-finite") and "1 other member(s) of its group finished" in \
        captured.err, captured.err
    assert (tmp_path / "w" / "lr05" / "summary.json").exists() and not (tmp_path / "w" / "lr02" / "summary.json").exists()
    assert checkpoint_steps(tmp_path / "w" / "lr05") == [2, 4, 6]


@pytest.mark.slow
def test_members_spread_over_devices_equal_members_on_one(cli, experiment, sequential, tmp_path):
    """`mesh.member=2` on 8 devices: each block of 4 devices holds one of lr05's 2 members (data parallel inside)."""
    assert cli("--config", experiment, "--workdir", str(tmp_path), *GROUP, "--config.mesh.member=2",
               "--config.mesh.data=4") == 0
    _assert_equal_to_sequential(tmp_path, sequential, names=["lr05_seed0", "lr05_seed1"])


def test_grad_norm_is_exact_under_group_parallel(rng):
    """The global norm of a gradient split over `model` as the group rules say: every device's shard counted."""
    model = create_model("resnext11_8x4d", num_classes=10, stage_sizes=(1, 1, 1))
    mesh = parallel.make_mesh({"data": 1, "model": 4})
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))["params"])
    specs = parallel.partition_specs(shapes, parallel.group_parallel_rules(model), mesh)
    grads = jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape), jnp.float32), shapes)
    placed = parallel.shard_state(grads, mesh, specs)
    assert any(len(x.sharding.device_set) == 4 and x.addressable_shards[0].data.size < x.size
               for x in jax.tree.leaves(placed))
    norm = parallel.MeshStep(jax.jit(optax.tree.norm), mesh)(placed)
    n = sum(x.size for x in jax.tree.leaves(grads))
    np.testing.assert_allclose(norm, np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64))) for x in
                                                 jax.tree.leaves(grads))), rtol=2 * n * U32)  # a sum of n squares
