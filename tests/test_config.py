"""Experiment configs: loading every shipped experiment, overrides, sweep expansion, unknown keys."""
import glob

import pytest

from gconv.config import apply_overrides, expand_sweep, load_experiment, parse_value
from gconv.models import model_spec


@pytest.mark.parametrize("path", sorted(glob.glob("experiments/*.py")))
@pytest.mark.parametrize("arg", ["", ":local"])
def test_every_experiment_loads_and_its_sweep_names_real_models(path, arg):
    config, sweep = load_experiment(path + arg)
    runs = expand_sweep(config, sweep, {})
    assert len(runs) == len(sweep) * config.seeds and len(sweep) >= 2
    for _, point_config in runs:
        model_spec(point_config.model.name)  # raises on a bad name


def test_default_sweep_preserves_complexity():
    config, sweep = load_experiment("experiments/default.py")
    assert [(p["model.cardinality"], p["model.base_width"]) for p in sweep] == [(1, 16), (2, 10), (4, 6), (8, 3), (16, 2)]
    assert config.data.name == "digits"


def test_overrides_are_typed_and_command_line_wins_over_the_point():
    config, sweep = load_experiment("experiments/default.py")
    runs = expand_sweep(config, sweep, {"optim.learning_rate": "0.5", "model.base_width": "7",
                                        "data.augment": "true", "optim.decay_epochs": "(10, 20)", "seeds": "1"},
                        points=["c4", "0"])
    assert [name for name, _ in runs] == ["c4", "c1"]
    c4 = runs[0][1]
    assert c4.model.cardinality == 4 and c4.model.base_width == 7  # point, then command line
    assert c4.optim.learning_rate == 0.5 and c4.data.augment is True and c4.optim.decay_epochs == (10, 20)
    assert config.optim.learning_rate != 0.5  # the base config is untouched


def test_seeds_make_one_resumable_run_each():
    config, sweep = load_experiment("experiments/default.py")
    assert config.seeds == 3
    runs = expand_sweep(config, sweep, {"seed": "5", "seeds": "2"}, points=["c4", "c1"])
    assert [name for name, _ in runs] == ["c4_seed5", "c4_seed6", "c1_seed5", "c1_seed6"]
    assert [c.seed for _, c in runs] == [5, 6, 5, 6] and {c.model.cardinality for _, c in runs[:2]} == {4}
    with pytest.raises(ValueError, match="seeds=0 must be >= 1"):
        expand_sweep(config, sweep, {"seeds": "0"})


def test_unknown_key_names_the_closest_valid_keys():
    config, _ = load_experiment("experiments/default.py")
    with pytest.raises(KeyError, match=r"unknown config key 'model.cardinalty'.*'model.cardinality'"):
        apply_overrides(config, {"model.cardinalty": "8"})
    with pytest.raises(KeyError, match=r"'optim.learning_rate'"):
        apply_overrides(config, {"optim.lr": "0.1"})


def test_bad_values_and_points_raise():
    config, sweep = load_experiment("experiments/default.py")
    with pytest.raises(ValueError, match="'eight' is not a valid int"):
        apply_overrides(config, {"model.cardinality": "eight"})
    with pytest.raises(ValueError, match="not a boolean"):
        parse_value("maybe", True)
    with pytest.raises(KeyError, match="unknown sweep point 'c3'"):
        expand_sweep(config, sweep, {}, points=["c3"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_experiment("experiments/nope.py")


def test_typo_in_a_sweep_fails_at_load(tmp_path):
    path = tmp_path / "bad.py"
    path.write_text("from gconv.config import base_config\n"
                    "def get_config(arg=None):\n    return base_config()\n"
                    "def get_sweep(arg=None):\n    return [{'name': 'a', 'model.cardinalty': 2}]\n")
    with pytest.raises(KeyError, match="unknown config key 'model.cardinalty'"):
        load_experiment(str(path))
