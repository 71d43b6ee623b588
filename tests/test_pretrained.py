"""Published weights on demand (`gconv.convert.load_pretrained`), against a local HTTP server serving a committed
fixture: download once into the cache, hash check, conversion, `init_from=TAG`, and what happens without a network."""
import functools
import hashlib
import http.server
import shutil
import threading
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest

from conftest import free_port
from gconv import convert

FIXTURE = Path(__file__).parent / "fixtures" / "tv_shufflenet_v2_x0_5.safetensors"


@pytest.fixture
def server(tmp_path, monkeypatch):
    """Serves `tmp_path/www` on a free port; registers the fixture there as ("shufflenet_v2_x0_5", "test"), named
    like torchvision's files with the start of its SHA-256; weights are cached in `tmp_path/cache`."""
    www = tmp_path / "www"
    www.mkdir()
    digest = hashlib.sha256(FIXTURE.read_bytes()).hexdigest()
    name = f"shufflenetv2_tiny-{digest[:10]}.safetensors"
    shutil.copy(FIXTURE, www / name)
    port = free_port()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    monkeypatch.setenv("GCONV_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(convert.PRETRAINED, ("shufflenet_v2_x0_5", "test"), f"http://127.0.0.1:{port}/{name}")
    yield httpd, www / name
    httpd.shutdown()
    httpd.server_close()


def test_downloads_once_checks_the_hash_and_converts(server, tmp_path):
    httpd, served = server
    variables = convert.load_pretrained("shufflenet_v2_x0_5", "test")
    want = convert.load_torch_weights("shufflenet_v2_x0_5", FIXTURE)
    for got, expected in zip(jax.tree.leaves(variables), jax.tree.leaves(want)):
        np.testing.assert_array_equal(got, expected)
    assert (tmp_path / "cache" / "weights" / served.name).read_bytes() == FIXTURE.read_bytes()
    httpd.shutdown()  # from now on only the cache can answer
    again = convert.load_pretrained("shufflenet_v2_x0_5", "test", num_classes=3)
    assert again["params"]["head"]["kernel"].shape == (1024, 3)  # a fresh head for other classes
    # A config naming the family and its fields finds the tag through the model it builds.
    config = ml_collections.ConfigDict(dict(model=dict(name="shufflenet_v2", width_multiplier=0.5, dtype="float32"),
                                            init_from="test", seed=0))
    assert convert.init_from_path(config) == tmp_path / "cache" / "weights" / served.name


def test_a_damaged_download_is_refused_and_not_kept(server, tmp_path):
    _, served = server
    served.write_bytes(served.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(ValueError, match="does not start with .* as its name says"):
        convert.load_pretrained("shufflenet_v2_x0_5", "test")
    assert not any((tmp_path / "cache" / "weights").iterdir())


def test_no_network_and_unknown_tags_say_what_to_do(server, tmp_path):
    httpd, _ = server
    httpd.shutdown()
    httpd.server_close()
    with pytest.raises(FileNotFoundError, match=r"not cached and could not be downloaded .*\(no network\?"):
        convert.load_pretrained("shufflenet_v2_x0_5", "test")
    with pytest.raises(ValueError, match=r"no published weights 'imagenet' for resnext50_32x4d: known tags "
                                         r"\['tv2_in1k', 'tv_in1k'\]"):
        convert.pretrained_file("resnext50_32x4d", "imagenet")


def test_imgclsmob_releases_unzip_and_check_the_sha1(server, tmp_path, monkeypatch):
    """imgclsmob's (pytorchcv's) weights come zipped, named with the start of the SHA-1 of the file inside."""
    import zipfile

    httpd, served = server
    fixture = FIXTURE.with_name("imgclsmob_igcv3_wd4.safetensors")
    inner = f"igcv3_wd4-2871-{hashlib.sha1(fixture.read_bytes()).hexdigest()[:8]}.safetensors"
    with zipfile.ZipFile(served.parent / f"{inner}.zip", "w") as z:
        z.write(fixture, inner)
    port = httpd.server_address[1]
    monkeypatch.setitem(convert.PRETRAINED, ("igcv3_wd4", "test"), f"http://127.0.0.1:{port}/{inner}.zip")
    variables = convert.load_pretrained("igcv3_wd4", "test")
    for got, expected in zip(jax.tree.leaves(variables), jax.tree.leaves(convert.load_torch_weights("igcv3_wd4",
                                                                                                    fixture))):
        np.testing.assert_array_equal(got, expected)
    assert (tmp_path / "cache" / "weights" / inner).read_bytes() == fixture.read_bytes()
    # a zip whose file does not have the hash its name says is refused, and nothing is kept
    bad = inner.replace("igcv3_wd4-2871-", "igcv3_wd2-1732-")
    with zipfile.ZipFile(served.parent / f"{bad}.zip", "w") as z:
        z.writestr(bad, b"not the weights")
    monkeypatch.setitem(convert.PRETRAINED, ("igcv3_wd2", "test"), f"http://127.0.0.1:{port}/{bad}.zip")
    with pytest.raises(ValueError, match="SHA-1 .* does not start with"):
        convert.pretrained_file("igcv3_wd2", "test")
    assert sorted(p.name for p in (tmp_path / "cache" / "weights").iterdir()) == [inner]
    # CondenseNet's published weights are the condensed network's: load_pretrained builds that one
    tiny = FIXTURE.with_name("imgclsmob_condensenet74_tiny.safetensors")
    name = f"condensenet74_c4_g4-0828-{hashlib.sha1(tiny.read_bytes()).hexdigest()[:8]}.safetensors"
    with zipfile.ZipFile(served.parent / f"{name}.zip", "w") as z:
        z.write(tiny, name)
    monkeypatch.setitem(convert.PRETRAINED, ("condensenet74_c4_g4", "test"), f"http://127.0.0.1:{port}/{name}.zip")
    growth = dict(growth_rates=(4, 4, 8, 8, 16))  # the fixture's small widths
    got = convert.load_pretrained("condensenet74_c4_g4", "test", **growth)
    want = convert.load_torch_weights("condensenet74_c4_g4", tiny, condensed=True, **growth)
    assert jax.tree.structure(got) == jax.tree.structure(want) and "condense" in got


def test_init_from_a_tag_on_the_command_line(server, cli, tmp_path, capsys):
    code = cli("--config", "experiments/shufflenet_groups.py:local", "--point", "g3_wd4", "--workdir",
               str(tmp_path / "run"), "--config.num_steps=1", "--config.mesh.data=1", "--config.init_from=tv_in1k")
    assert code == 2
    assert "no published weights 'tv_in1k' for shufflenet_g3_wd4" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before anything was written
