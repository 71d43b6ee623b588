"""Storage that cannot hang a run: an operation that gets no answer ends the process in one line (exit 75) within
the limit, and a `gs://` workdir without credentials is refused at the start, in one line, before anything is
written."""
import os
import subprocess
import sys
import time

from conftest import ROOT, TINY


def test_a_stalled_storage_operation_ends_the_process_in_one_line(tmp_path):
    code = ("import time; from gconv import watchdog; watchdog.set_limit(1.0)\n"
            "with watchdog.watch('write', 'gs://bucket/run/metrics.jsonl'):\n"
            "    time.sleep(60)  # a request that never returns\n")
    log = tmp_path / "out.txt"
    started = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.run([sys.executable, "-c", code], stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                              timeout=120)
    waited = time.monotonic() - started
    lines = log.read_text().strip().splitlines()
    assert proc.returncode == 75, lines
    assert lines == [lines[0]] and lines[0].startswith(
        "error: storage stalled: write gs://bucket/run/metrics.jsonl got no answer in 1 s (storage_timeout_s=1)")
    assert waited < 60  # the limit, the watchdog's 1 s tick and the interpreter's start, far below the sleep


def test_gs_workdir_without_credentials_is_refused_in_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS")}
    env.update(CLOUDSDK_CONFIG=str(tmp_path / "gcloud"), NO_GCE_CHECK="true")  # no gcloud login, not a Cloud VM
    result = subprocess.run([sys.executable, "launch.py", *TINY, "--workdir", "gs://gconv-no-such-bucket/run"],
                            cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    err = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stdout + result.stderr
    assert len(err) == 1 and err[0].startswith("error: a gs:// workdir needs Google Cloud credentials"), err
    assert "GOOGLE_APPLICATION_CREDENTIALS" in err[0] and "gcloud auth application-default login" in err[0]
    assert "gcsfs" not in result.stdout + result.stderr
