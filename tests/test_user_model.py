"""A user's own Flax module (`tests/user_nets.py`: `GroupedConv`, `nn.Dense`, `nn.BatchNorm`, no parallel code),
trained by `launch.py` through its import path on 8 simulated devices: data parallel, group parallel by rules in
the config, and FSDP, each equal to one device."""
import json

import numpy as np

from conftest import ROOT, launch_here
from gconv.metrics_log import read_metrics
from tolerance import step_rtol

CONFIG = str(ROOT / "tests" / "user_config.py")
SETUPS = {  # name: (config variant, overrides)
    "one device": ("", ["--config.mesh.data=1"]),
    "data=8": ("", ["--config.mesh.data=8"]),
    "data=4 x model=2": (":group", ["--config.mesh.data=4", "--config.mesh.model=2"]),
    "fsdp over data=8": ("", ["--config.mesh.data=8", "--config.sharding.strategy=fsdp"]),
}


def test_a_users_module_trains_on_8_devices_as_on_one(tmp_path):
    """One test for all setups, so that one process launches each once (a module fixture runs once per worker)."""
    runs = {}
    for name, (variant, overrides) in SETUPS.items():
        launch_here("--config", CONFIG + variant, "--workdir", str(tmp_path / str(len(runs))), "--skip_analysis",
                    *overrides)
        runs[name] = tmp_path / str(len(runs)) / "run"
    one = read_metrics(runs["one device"] / "metrics.jsonl")
    losses = [(r["step"], r["train_loss"]) for r in one if "train_loss" in r]
    assert [s for s, _ in losses] == [1, 2, 3]
    for setup in [s for s in SETUPS if s != "one device"]:
        many = read_metrics(runs[setup] / "metrics.jsonl")
        # Each step's sums in another order: step_rtol per step (BN's sums over batch 16 x 32 x 32 positions), the
        # differences of earlier steps carried into later ones through the parameters (at most once per step).
        for (step, want), got in zip(losses, [r["train_loss"] for r in many if "train_loss" in r]):
            np.testing.assert_allclose(got, want, rtol=step * step_rtol(16 * 32 * 32), err_msg=f"{setup}, step {step}")
        summary = json.loads((runs[setup] / "summary.json").read_text())
        assert summary["model"] == "user_nets:TinyResNeXt" and summary["fields"]["cardinality"] == 4, setup
