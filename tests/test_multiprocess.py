"""Several processes on this machine joined by `jax.distributed` (gloo collectives, coordinator on localhost):
2 processes x 4 devices train the default experiment's `:local` point as 1 process x 8 devices does, and finish
together."""
import json
import socket

import numpy as np
import pytest

from gconv.train import read_metrics
from launcher import launch, start

RUN = ["--config", "experiments/default.py:local", "--point", "c2", "--config.mesh.data=-1", "--config.num_steps=6",
       "--config.log_every_steps=2"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_as_one_and_exit_together(tmp_path):
    port = _free_port()
    four = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    first = start(*RUN, "--workdir", str(tmp_path / "two"), f"--coordinator_address=localhost:{port}",
                  "--num_processes=2", "--process_id=0", env=four)
    second = start(*RUN, "--workdir", str(tmp_path / "two"), "--multiprocess",  # the same, from the environment
                   env={**four, "JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": "2",
                        "JAX_PROCESS_ID": "1"})
    outs = [proc.communicate(timeout=400)[0] for proc in (first, second)]
    for i, (proc, out) in enumerate(zip((first, second), outs)):
        assert proc.returncode == 0, f"process {i}:\n{out}"
        assert "error" not in out.lower().replace("top-1 error", ""), f"process {i}:\n{out}"
    assert "wrote" in outs[0] and (tmp_path / "two" / "report.md").exists()
    launch(*RUN, "--workdir", str(tmp_path / "one"))  # 1 process x 8 devices (the suite's XLA_FLAGS)
    one, two = (read_metrics(tmp_path / w / "c2" / "metrics.jsonl") for w in ("one", "two"))
    assert [r["step"] for r in one] == [r["step"] for r in two] == [2, 4, 6, 6]
    for a, b in zip(one, two):  # the same global batches; gloo's all-reduce sums in another order
        for key in a.keys() - {"img_per_sec", "wall_time"}:
            np.testing.assert_allclose(b[key], a[key], rtol=1e-5, err_msg=key)
    summaries = [json.loads((tmp_path / w / "c2" / "summary.json").read_text()) for w in ("one", "two")]
    assert summaries[0]["final_top1_error"] == summaries[1]["final_top1_error"]


@pytest.mark.parametrize("args,env,message", [
    (["--num_processes=2"], {}, "coordinator_address, process_id not given"),
    (["--multiprocess"], {"JAX_COORDINATOR_ADDRESS": "localhost:1", "JAX_PROCESS_ID": "0"}, "num_processes not given"),
    (["--coordinator_address=localhost", "--num_processes=2", "--process_id=0"], {}, "is not HOST:PORT"),
    (["--coordinator_address=localhost:1", "--num_processes=2", "--process_id=2"], {}, "0 <= process_id"),
    (["--coordinator_address=localhost:1", "--num_processes=two", "--process_id=0"], {}, "must be integers"),
])
def test_bad_multiprocess_settings_stop_in_one_line(cli, monkeypatch, capsys, tmp_path, args, env, message):
    for key in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert cli(*RUN, "--workdir", str(tmp_path / "w"), *args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "w").exists()
