"""gconv.convert against real torchvision / imgclsmob models: the committed fixtures (tests/fixtures/) hold their
state dicts and their logits on a fixed input; converted gconv models must reproduce the logits."""
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from gconv.convert import load_torch_weights, read_state_dict
from gconv.models import create_model
from tolerance import U32

FIXTURES = Path(__file__).parent / "fixtures"
CASES = {  # fixture -> (gconv name, overrides)
    "tv_resnext_c8x4d_tiny": ("resnext50_8x4d", dict(stage_sizes=(1, 1, 1, 1))),
    "tv_shufflenet_v2_x0_5": ("shufflenet_v2_x0_5", {}),
    "imgclsmob_shufflenet_g3_wd4": ("shufflenet_g3_wd4", {}),
    "imgclsmob_igcv3_wd4": ("igcv3_wd4", {}),
    "imgclsmob_condensenet74_tiny": ("condensenet74_c4_g4", dict(growth_rates=(4, 4, 8, 8, 16), condensed=True)),
}


def _io(fixture):
    io = load_file(str(FIXTURES / f"{fixture}_io.safetensors"))
    return io["input"].transpose(0, 2, 3, 1), io["logits"]  # NCHW -> NHWC


@pytest.mark.parametrize("fixture", sorted(CASES))
def test_converted_logits_equal_pytorch(fixture):
    name, overrides = CASES[fixture]
    variables = load_torch_weights(name, FIXTURES / f"{fixture}.safetensors", **overrides)
    x, want = _io(fixture)
    model = create_model(name, num_classes=want.shape[-1], **overrides)
    got = np.asarray(jax.jit(model.apply)(variables, jnp.asarray(x)))
    rel = np.abs(got - want).max() / np.abs(want).max()
    # Error model: PyTorch and XLA sum each layer's K = fan-in products in their own orders; rounding errors grow
    # like sqrt(K) u per layer (tests/tolerance.py) and add over the L layers, x4 for the BN, ReLU and pooling
    # between them.
    fan_ins = [int(np.prod(leaf.shape[:-1])) for path, leaf in jax.tree_util.tree_leaves_with_path(variables["params"])
               if "kernel" in str(path[-1])]
    assert rel < 4 * len(fan_ins) * np.sqrt(max(fan_ins)) * U32, rel
    assert np.abs(want).max() > 0.1  # a real comparison, not of near-zero logits


def test_in_memory_mapping_and_new_classifier():
    name, overrides = CASES["tv_resnext_c8x4d_tiny"]
    state = read_state_dict(FIXTURES / "tv_resnext_c8x4d_tiny.safetensors")
    variables = load_torch_weights(name, dict(state), num_classes=3, **overrides)
    assert variables["params"]["head"]["kernel"].shape == (2048, 3)  # 4 * 512 features into a fresh 3-class head
    np.testing.assert_array_equal(variables["params"]["stem_conv"]["kernel"], state["conv1.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(variables["batch_stats"]["stem_bn"]["var"], state["bn1.running_var"])
    # grouped kernels keep their per-group layout: (O, I/g, kh, kw) -> (kh, kw, I/g, O)
    assert variables["params"]["stage1"]["block0"]["conv_group"]["kernel"].shape == (3, 3, 4, 32)


def test_bad_checkpoints_raise_listing_the_keys(tmp_path):
    name, overrides = CASES["tv_resnext_c8x4d_tiny"]
    state = read_state_dict(FIXTURES / "tv_resnext_c8x4d_tiny.safetensors")
    broken = dict(state)
    del broken["layer2.0.conv2.weight"]
    broken["layer9.0.conv1.weight"] = np.zeros((1,))
    with pytest.raises(ValueError, match=r"missing keys \['layer2.0.conv2.weight'\].*unexpected keys "
                                         r"\['layer9.0.conv1.weight'\]"):
        load_torch_weights(name, broken, **overrides)
    with pytest.raises(ValueError, match=r"wrong shapes \['layer1.0.conv2.weight: checkpoint \(32, 4, 3, 3\)"):
        load_torch_weights("resnext50_4x8d", state, **overrides)  # other cardinality: grouped kernels differ
    with pytest.raises(ValueError, match="has no classifier 'fc.weight'"):
        load_torch_weights(name, {"conv1.weight": state["conv1.weight"]}, **overrides)
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_torch_weights(name, FIXTURES / "nope.pth")
    (tmp_path / "x.npz").touch()
    with pytest.raises(ValueError, match="unknown checkpoint format '.npz'"):
        load_torch_weights(name, tmp_path / "x.npz")


def test_pth_is_read_without_unpickling_code(tmp_path):
    torch = pytest.importorskip("torch")  # optional: CI has no torch; the .safetensors path above needs none
    state = read_state_dict(FIXTURES / "tv_shufflenet_v2_x0_5.safetensors")
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, tmp_path / "w.pth")
    variables = load_torch_weights("shufflenet_v2_x0_5", tmp_path / "w.pth")
    assert variables["params"]["head"]["kernel"].shape == (1024, 10)

    class Evil:
        def __reduce__(self):
            return (print, ("pickled code ran",))

    torch.save({"x": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported"):
        read_state_dict(tmp_path / "evil.pth")


@pytest.mark.slow
def test_training_starts_from_converted_weights(cli, capsys, tmp_path):
    import ml_collections

    from gconv.convert import load_torch_weights_for

    fixture = FIXTURES / "imgclsmob_shufflenet_g3_wd4.safetensors"
    # A config names the family and its fields; the converter builds the same network as the full name.
    config = ml_collections.ConfigDict(dict(model=dict(name="shufflenet_v1", groups=3, width_multiplier=0.25,
                                                       dtype="float32"), init_from=str(fixture), seed=0))
    started = load_torch_weights_for(config, 10)
    np.testing.assert_array_equal(started["params"]["head"]["kernel"],
                                  load_torch_weights("shufflenet_g3_wd4", fixture)["params"]["head"]["kernel"])
    # Through launch.py: --config.init_from reaches the converter (a v2 checkpoint is refused for a v1 model).
    assert cli("--config", "experiments/shufflenet_groups.py:local", "--point", "g3_wd4", "--workdir",
               str(tmp_path), "--config.num_steps=1", "--config.mesh.data=1",
               f"--config.init_from={FIXTURES / 'tv_shufflenet_v2_x0_5.safetensors'}") == 2
    assert "has no classifier 'output.weight'" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_command_scores_a_weights_file_on_a_dataset(cli, capsys):
    """`launch.py eval FILE --model NAME`: the converted model on the experiment's data (TFDS mock imagenette at
    64x64), scored against a plain loop over the same batches."""
    import ml_collections
    import tensorflow_datasets as tfds

    from gconv import data

    fixture = FIXTURES / "tv_shufflenet_v2_x0_5.safetensors"
    with tfds.testing.mock_data(num_examples=20):
        code = cli("eval", str(fixture), "--model", "shufflenet_v2_x0_5", "--config",
                   "experiments/shufflenet_groups.py:imagenette", "--config.data.image_size=64",
                   "--config.data.eval_batch_size=8")
        out = capsys.readouterr().out
        assert code == 0, out
        config = ml_collections.ConfigDict(dict(name="imagenette", data_dir="", image_size=64, augment=False))
        source, info = data.get_source(config, "eval")
        variables = load_torch_weights("shufflenet_v2_x0_5", fixture)
        model = create_model("shufflenet_v2_x0_5", num_classes=10)
        correct = count = 0
        for batch in map(jax.jit(data.standardize(info)), data.eval_batches(source, info, 8)):
            predicted = np.argmax(np.asarray(model.apply(variables, batch["image"])), -1)
            correct += int(np.sum((predicted == batch["label"]) & batch["mask"]))
            count += int(np.sum(batch["mask"]))
    assert f"on the eval split ({count} images): top-1 error {100 * (1 - correct / count):.2f}%" in out
    assert cli("eval", "nope.pth", "--model", "shufflenet_v2_x0_5") == 2
    assert "no weights file at 'nope.pth'" in capsys.readouterr().err
