"""Design spaces: AnyNet/RegNet counted exactly as pycls counts them, samplers inside a complexity regime, the
statistics that compare spaces (EDF, bootstrap) against closed forms, and the `:local` experiment's report."""
import json
import math

import numpy as np
import pytest

from gconv import designspace
from gconv.complexity import counts
from gconv.models import anynet, create_model
from gconv.models.resnext import root_groups

# pycls's dev/model_complexity.json (configs/dds_baselines): params, flops (MACs with the classifier's biases), acts
PYCLS = {
    "regnetx_200mf": (2_684_792, 199_040_872, 2_164_056), "regnetx_400mf": (5_157_512, 397_678_568, 3_143_272),
    "regnetx_600mf": (6_196_040, 600_891_112, 3_975_096), "regnetx_800mf": (7_259_656, 799_700_712, 5_148_744),
    "regnetx_1_6gf": (9_190_136, 1_602_850_792, 7_933_512), "regnetx_3_2gf": (15_296_552, 3_176_622_952, 11_367_432),
    "regnetx_4_0gf": (22_118_248, 3_964_499_816, 12_201_608), "regnetx_6_4gf": (26_209_256, 6_460_292_264, 16_369_744),
    "regnetx_8_0gf": (39_572_648, 7_995_133_416, 14_059_688), "regnetx_12gf": (46_106_056, 12_086_679_016, 21_366_568),
    "regnetx_16gf": (54_278_536, 15_940_756_456, 25_515_496), "regnetx_32gf": (107_811_560, 31_735_930_792, 36_302_160),
    "resnext50_32x4d": (25_028_904, 4_230_480_872, 14_602_216), "resnext50_1x64d": (25_557_032, 4_089_185_256, 11_315_688),
}
IMAGENET = (224, 224, 3)


def _resnet50_as_anynet(bottleneck: float, group_widths) -> dict:
    return dict(depths=(3, 4, 6, 3), widths=(256, 512, 1024, 2048), strides=(1, 2, 2, 2), bottleneck=(bottleneck,) * 4,
                group_widths=tuple(group_widths), stem="resnet", stem_width=64)


@pytest.mark.parametrize("name", list(PYCLS))
def test_counts_equal_pycls(name):
    model = create_model(name)
    got = counts(model, IMAGENET, convention="pycls")
    assert (got.params, got.macs, got.acts) == PYCLS[name]
    if name.startswith("regnetx"):  # and the closed form the sampler uses
        assert anynet.complexity(anynet.parse_name(name)) == dict(zip(("params", "macs", "acts"), PYCLS[name]))
        assert anynet.FAMILY.name_of(model) == name


@pytest.mark.parametrize("name,fields", [
    ("resnext50_1x64d", _resnet50_as_anynet(0.25, (64, 128, 256, 512))),
    ("resnext50_32x4d", _resnet50_as_anynet(0.5, (4, 8, 16, 32))),
    *[(f"resnet50_root{n}", _resnet50_as_anynet(0.25, [64 * 2**i // g for i, g in enumerate(root_groups(n))]))
      for n in (2, 8, 64)],
])
def test_resnet_resnext_and_roots_are_anynet_instances(name, fields):
    """The same parameters, MACs and activations as the family that defines them, in every convention."""
    for convention in ("torchvision", "pycls"):
        assert counts(create_model("anynet", **fields), IMAGENET, convention=convention) == counts(
            create_model(name), IMAGENET, convention=convention)
    cx = anynet.complexity(fields)
    assert (cx["params"], cx["macs"], cx["acts"]) == tuple(vars(counts(create_model(name), IMAGENET, "pycls")).values())


def test_regnet_widths_follow_the_quantized_linear_rule():
    """RegNetX-200MF's stages, by the rule written out: u_j = w0 + wa j, k_j = round(log(u_j/w0)/log wm)."""
    w0, wa, wm, depth, _ = anynet.REGNETX["200mf"]
    per_block = [round(w0 * wm ** round(math.log((w0 + wa * j) / w0) / math.log(wm)) / 8) * 8 for j in range(depth)]
    widths, depths = anynet.regnet_widths(w0, wa, wm, depth)
    assert widths == sorted(set(per_block)) and depths == [per_block.count(w) for w in widths]
    assert widths == [24, 56, 152, 368] and depths == [1, 1, 4, 7]  # pycls's RegNetX-200MF
    assert all(w % 8 == 0 for w in widths)


def test_compatibility_makes_group_width_divide_the_bottleneck(rng):
    for _ in range(200):
        widths = list(rng.integers(8, 1024, size=4))
        bottleneck = [float(rng.choice([0.25, 0.5, 1.0, 2.0, 4.0])) for _ in widths]
        groups = list(rng.integers(1, 256, size=4))
        new_widths, new_groups = anynet.compatible(widths, bottleneck, groups)
        for w, b, g, g0 in zip(new_widths, bottleneck, new_groups, groups):
            assert g <= g0 and (w * b) % g == 0 and w * b >= g
    with pytest.raises(ValueError, match="not a multiple of group width 24"):
        create_model("anynet", **dict(_resnet50_as_anynet(0.25, (24, 128, 256, 512)))).stage_shapes()


def test_closed_form_complexity_equals_the_built_models_counts(rng):
    space = designspace.DesignSpace("any", depth=(2, 8), w0=(8, 48), wa=(4, 32), group_widths=(0, 1, 4, 8),
                                    bottlenecks=(1.0, 0.5))
    for _ in range(4):
        _, fields = designspace.draw(space, rng)
        got = counts(create_model("anynet", **fields, num_classes=10), (32, 32, 3), convention="pycls")
        assert anynet.complexity(fields, (32, 32, 3), 10) == {"params": got.params, "macs": got.macs, "acts": got.acts}


def test_samples_are_seeded_inside_the_regime_with_their_acceptance_rate():
    space = designspace.DesignSpace("free", depth=(2, 6), w0=(8, 24), wa=(4, 16), group_widths=(1, 2, 4, 8))
    regime = designspace.Regime(macs=(0.5e6, 2e6), params=(5e3, 5e5))
    samples, rate = designspace.sample(space, 6, regime, seed=3)
    again, rate_again = designspace.sample(space, 6, regime, seed=3)
    assert [s.fields for s in samples] == [s.fields for s in again] and rate == rate_again
    assert 0 < rate < 1
    for s in samples:
        assert regime.holds(s.complexity) and s.complexity == anynet.complexity(s.fields, (32, 32, 3), 10)
        create_model("anynet", **s.fields).stage_shapes()  # compatible: builds
    # The rate is the share of draws inside the regime: drawing as the sampler does gives the same count.
    rng, draws, inside = np.random.default_rng(3), 0, 0
    while inside < 6:
        _, fields = designspace.draw(space, rng)
        draws += 1
        inside += len(fields["widths"]) <= space.max_stages and regime.holds(anynet.complexity(fields, (32, 32, 3), 10))
    assert rate == 6 / draws
    with pytest.raises(ValueError, match="widen the regime"):
        designspace.sample(space, 1, designspace.Regime(macs=(1, 2)), max_draws=50)


def test_edf_against_its_closed_form(rng):
    """At the sorted sample points the EDF is i/n; for uniform(0, 1) samples it stays within the DKW bound
    sqrt(log(2/alpha) / 2n) of F(x) = x (alpha = 1e-6: fails once in a million runs)."""
    values = rng.uniform(size=2000)
    np.testing.assert_array_equal(designspace.edf(values, np.sort(values)), np.arange(1, 2001) / 2000)
    grid = np.linspace(0, 1, 501)
    assert np.max(np.abs(designspace.edf(values, grid) - grid)) <= math.sqrt(math.log(2 / 1e-6) / (2 * 2000))
    assert designspace.edf([3.0, 1.0, 2.0, 2.0], [0.5, 1.0, 2.0, 2.5, 3.0]).tolist() == [0, 0.25, 0.75, 0.75, 1.0]


def test_bootstrap_interval_against_the_normal_closed_form(rng):
    """For normal errors the bootstrap interval of mean(b) - mean(a) is delta +- 1.96 sqrt(s_a^2/n_a + s_b^2/n_b).
    Error model of the bound: both use the same sample's variances, so what separates them is the Monte Carlo
    error of the 2.5%/97.5% quantiles of 10,000 resamples, sqrt(p (1-p) / R) / phi(1.96) = 0.027 standard errors
    each, and the normal approximation to the mean of 400 normal draws (exact up to the n vs n-1 of the variance,
    0.1%): 0.15 standard errors is 5.5 times the Monte Carlo error."""
    a, b = rng.normal(10.0, 2.0, size=400), rng.normal(10.5, 3.0, size=400)
    delta, low, high = designspace.bootstrap_difference(a, b)
    assert delta == pytest.approx(b.mean() - a.mean(), abs=1e-12)
    se = math.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
    assert abs(low - (delta - 1.96 * se)) <= 0.15 * se and abs(high - (delta + 1.96 * se)) <= 0.15 * se
    with pytest.raises(ValueError, match="at least 2 models"):
        designspace.bootstrap_difference([1.0], [2.0, 3.0])


@pytest.mark.slow
def test_local_design_space_experiment_reports_edfs_and_a_bootstrap_verdict(cli, tmp_path):
    """`experiments/design_space.py:local` (two of the four models of each space, a few steps each here): every
    sampled model trains as a sweep point of its design space, and the report compares the spaces."""
    workdir = tmp_path / "spaces"
    points = [arg for name in ("free_00", "free_01", "no_groups_00", "no_groups_01") for arg in ("--point", name)]
    assert cli("--config", "experiments/design_space.py:local", "--workdir", str(workdir), "--skip_analysis", *points,
               "--config.mesh.data=1", "--config.num_steps=4", "--config.eval_every_steps=4",
               "--config.log_every_steps=2") == 0
    summaries = [json.loads(p.read_text()) for p in sorted(workdir.glob("*/summary.json"))]
    assert sorted({s["design_space"] for s in summaries}) == ["free", "no_groups"] and len(summaries) == 4
    for s in summaries:  # each run's counts are its sampled fields' (digits: 8x8x1 images)
        fields = {k: tuple(v) if isinstance(v, list) else v
                  for k, v in json.loads((workdir / s["name"] / "config.json").read_text())["model"].items()
                  if k in anynet.ANYNET_FIELDS}
        cx = anynet.complexity(fields, (8, 8, 1), 10)
        assert s["acts"] == cx["acts"] and s["params"] == cx["params"]
    report = (workdir / "report.md").read_text()
    assert "## Design spaces" in report and "| free | 2 |" in report and "| no_groups | 2 |" in report
    verdict = [line for line in report.splitlines() if line.startswith("| no_groups |")][0]
    assert verdict.endswith("| within noise |") or verdict.endswith("| differs |"), verdict
    for png in ("error_edf_by_design_space.png", "error_vs_mmacs_by_design_space.png"):
        assert (workdir / png).read_bytes()[:4] == b"\x89PNG"
