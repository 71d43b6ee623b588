"""Precise BatchNorm: after it, each BatchNorm's statistics are the exact mean and variance of its input over the
chosen training images, and a run with it on evaluates with them."""
import jax
import numpy as np
import pytest
from flax import traverse_util

from gconv.models import create_model
from gconv.precise_bn import precise_batch_stats
from tolerance import assert_within, gamma

FIELDS = dict(depths=(1, 2), widths=(16, 32), strides=(2, 2), bottleneck=(1.0, 1.0), group_widths=(4, 8),
              stem="cifar", stem_width=8)


def test_statistics_are_the_exact_moments_over_the_images(rng):
    """The stem's BatchNorm sees the stem conv's outputs, whatever the batches: its statistics must equal their
    mean and variance over all 48 images, computed here in float64. Every deeper BatchNorm's input depends on its
    batch (training mode normalises by batch statistics), so its statistics must equal the pooled moments of the
    three batches, sum n_b (m_b, v_b + m_b^2) / N, computed here in float64 from each batch alone.

    Error model: flax sums the n = 16 x 16 x 16 = 4096 values of a channel per batch in float32 (mean and mean of
    squares, gamma(n) relative to the sums of |x| and x^2), and the pooling adds 3 terms more; the variance
    E[x^2] - E[x]^2 carries both errors: bound 2 gamma(n + 3) (E|x| for the mean, E[x^2] + E[x]^2 for the
    variance), per channel; for a deeper layer E|x| <= max_b |m_b| + max_b sqrt(v_b)."""
    model = create_model("anynet", **FIELDS, num_classes=10)
    images = rng.standard_normal((48, 16, 16, 3)).astype(np.float32)
    variables = model.init(jax.random.PRNGKey(int(rng.integers(2**31))), images[:1])
    batches = [{"image": images[i:i + 16]} for i in (0, 16, 32)]
    stats = traverse_util.flatten_dict(precise_batch_stats(model, variables["params"], variables["batch_stats"],
                                                           batches))
    bound = lambda values: 2 * gamma(16 * 16 * 16 + 3) * values  # noqa: E731

    _, captured = model.apply(variables, images, train=True, mutable=["batch_stats", "intermediates"],
                              capture_intermediates=lambda module, _: module.name == "stem_conv")
    stem = np.asarray(captured["intermediates"]["stem_conv"]["__call__"][0], np.float64).reshape(-1, 8)
    assert_within(stats[("stem_bn", "mean")], stem.mean(0), bound(np.abs(stem).mean(0)), "stem mean")
    assert_within(stats[("stem_bn", "var")], stem.var(0), bound((stem**2).mean(0) + stem.mean(0)**2), "stem var")

    still = model.clone(bn_momentum=0.0)  # momentum 0: the running statistics are the batch's own
    per_batch = [traverse_util.flatten_dict(still.apply(variables, b["image"], train=True,
                                                        mutable=["batch_stats"])[1]["batch_stats"]) for b in batches]
    layers = {path[:-1] for path in stats}
    assert len(layers) == 1 + 3 * 3 + 2  # the stem, 3 per block, 2 projections
    for layer in layers:
        m = np.array([np.asarray(p[layer + ("mean",)], np.float64) for p in per_batch])
        v = np.array([np.asarray(p[layer + ("var",)], np.float64) for p in per_batch])
        mean, second = m.mean(0), (v + m**2).mean(0)
        assert_within(stats[layer + ("mean",)], mean, bound(np.abs(m).max(0) + np.sqrt(v).max(0)), f"{layer} mean")
        assert_within(stats[layer + ("var",)], second - mean**2, bound(2 * second), f"{layer} var")


@pytest.mark.slow
def test_a_run_with_precise_bn_evaluates_with_it(cli, tmp_path):
    """`precise_bn_images` changes what an evaluation sees (the statistics), not what training computes."""
    base = ["--config", "experiments/design_space.py:local", "--point", "free_00", "--skip_analysis",
            "--config.mesh.data=1", "--config.num_steps=6", "--config.eval_every_steps=6", "--config.log_every_steps=3"]
    assert cli(*base, "--workdir", str(tmp_path / "plain")) == 0
    assert cli(*base, "--config.precise_bn_images=128", "--workdir", str(tmp_path / "precise")) == 0
    from gconv.metrics_log import read_metrics

    plain, precise = (read_metrics(tmp_path / w / "free_00" / "metrics.jsonl") for w in ("plain", "precise"))
    train = lambda records: [{k: v for k, v in r.items() if k.startswith("train_")} for r in records  # noqa: E731
                             if "train_loss" in r]
    assert train(plain) == train(precise)  # the same training, step for step
    assert plain[-1]["eval_loss"] != precise[-1]["eval_loss"]  # evaluated with other statistics
