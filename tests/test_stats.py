"""Seeds and confidence in reports: mean ± std per point, Welch's test against the first point, the verdict in words,
the plots with seed spread and learning curves (from summaries and metrics written here, nothing trained)."""
import json

import matplotlib.image
import numpy as np
import pytest

from gconv import report, stats


def test_welch_against_its_definition(rng):
    a, b = rng.normal(2.0, 0.3, 5), rng.normal(2.4, 0.8, 7)
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    t = (a.mean() - b.mean()) / np.sqrt(va + vb)
    dof = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))  # Welch-Satterthwaite
    from scipy.special import betainc

    p = betainc(dof / 2, 0.5, dof / (dof + t**2))  # two-sided tail of Student's t with `dof` degrees of freedom
    assert stats.welch(a, b) == pytest.approx(p, rel=1e-6) == stats.welch(b, a)
    assert stats.welch([1.0, 1.0], [1.0, 1.0]) == 1.0 and stats.welch([1.0, 1.0], [2.0, 2.0]) == 0.0
    assert stats.welch([1.0], [1.0, 2.0]) is None


def test_holm_adjustment():
    assert stats.holm([0.01, None, 0.04, 0.03]) == pytest.approx([0.03, None, 0.06, 0.06])
    assert stats.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])


def _summaries(errors: dict[str, list[float]]) -> list[dict]:
    return [{"name": f"{point}_seed{k}" if len(v) > 1 else point, "point": point, "seed": k, "model": "resnext11_x",
             "family": "resnext", "fields": {"cardinality": int(point[1:])}, "field:cardinality": int(point[1:]),
             "sweep_axis": "cardinality", "final_top1_error": e, "best_top1_error": e - 0.1}
            for point, v in errors.items() for k, e in enumerate(v)]


def test_point_rows_and_the_verdict_in_words():
    rows = stats.point_rows(_summaries({"c1": [2.0, 2.5, 2.2], "c4": [2.3, 2.0, 2.6], "c8": [9.0, 9.1, 8.9]}))
    assert [r["name"] for r in rows] == ["c1", "c4", "c8"] and [r["n"] for r in rows] == [3, 3, 3]
    assert rows[0]["mean"] == pytest.approx(2.2333333) and rows[0]["std"] == pytest.approx(np.std([2.0, 2.5, 2.2],
                                                                                                   ddof=1))
    assert rows[1]["delta"] == pytest.approx(2.3 - 2.2333333) and rows[1]["p"] > 0.05 and rows[2]["p"] < 0.01
    assert rows[2]["p_holm"] == pytest.approx(2 * rows[2]["p"])  # the smaller of 2 p-values, times 2
    assert rows[1]["p_holm"] == pytest.approx(max(rows[1]["p"], rows[2]["p_holm"]))
    text = stats.noise_verdict(rows)
    assert "c4 +0.07 pp" in text and "within noise" in text and "c8 differs from c1 beyond seed-to-seed noise" in text
    assert "Holm-adjusted for the 2 comparisons" in text
    quiet = stats.noise_verdict(stats.point_rows(_summaries({"c1": [2.0, 2.5], "c4": [2.4, 2.1]})))
    assert "No point differs from c1 beyond seed-to-seed noise" in quiet
    single = stats.noise_verdict(stats.point_rows(_summaries({"c1": [2.0], "c4": [2.4]})))
    assert "One run per point" in single and "--config.seeds=3" in single


def test_report_of_a_seeded_sweep(tmp_path):
    errors = {"c1": [2.0, 2.5, 2.2], "c4": [2.3, 2.0, 2.6]}
    for s in _summaries(errors):
        run = tmp_path / s["name"]
        run.mkdir()
        (run / "summary.json").write_text(json.dumps({k: v for k, v in s.items() if not k.startswith("field:")}))
        lines = [{"step": step, "train_loss": 2.0 / step} for step in (10, 20)]
        lines += [{"step": 20, "eval_top1_error": s["final_top1_error"], "eval_top5_error": 0.0}]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    path = report.write_report(tmp_path, analyze=False)
    text = path.read_text()
    assert "| c1 | resnext11_x | 1 | 3 | 2.23 ± 0.25 | 2.13 ± 0.25 | - | - | - |" in text
    assert "| c4 | resnext11_x | 4 | 3 | 2.30 ± 0.30 | 2.20 ± 0.30 | +0.07 | 0.78 | 0.78 | within noise |" in text
    assert "Welch's t-test" in text and "## Runs" in text and "| c4_seed2 |" in text
    for name in ("error_vs_cardinality.png", "learning_curves.png", "error_vs_mmacs.png"):
        image = matplotlib.image.imread(tmp_path / name)
        assert image.shape[0] > 100 and float(image[..., :3].std()) > 0.01  # opens, and is not blank
        assert f"![{name}]({name})" in text
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
