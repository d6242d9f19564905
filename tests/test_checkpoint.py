import os
import pickle

import numpy as np

import pytest
import torch
from official_style import OfficialStyleResNet, randomize

from cbam_deploy.errors import CbamDeployError
from cbam_deploy.models import build_model, read_checkpoint


def save_official(model: torch.nn.Module, path, **overrides):
    """What the official train_imagenet.py saves: a DataParallel state dict plus run metadata."""
    wrapped = torch.nn.DataParallel(model)
    optimizer = torch.optim.SGD(wrapped.parameters(), lr=0.1, momentum=0.9)
    wrapped(torch.randn(1, 3, 224, 224)).sum().backward()
    optimizer.step()  # gives the optimizer real momentum buffers, as a real checkpoint has
    wrapped.eval()
    state = {"epoch": -1, "arch": "resnet", "state_dict": wrapped.state_dict(), "best_prec1": torch.tensor(0.0),
             "optimizer": optimizer.state_dict()}
    state.update(overrides)
    torch.save(state, path)
    return state


@pytest.fixture(scope="module")
def official18():
    return randomize(OfficialStyleResNet(18, num_classes=12), seed=7)


def test_official_format_loads_and_matches(tmp_path, official18):
    path = tmp_path / "RESNET18_CBAM_best.pth.tar"
    saved = save_official(official18, path)
    assert all(k.startswith("module.") for k in saved["state_dict"])
    official18.eval()
    loaded = build_model("resnet18_cbam", weights=str(path))
    assert loaded.num_classes == 12  # inferred from fc.weight
    assert loaded.checkpoint.stripped_prefixes == ["module."]
    assert loaded.checkpoint.wrapper_key == "state_dict"
    assert loaded.checkpoint.metadata["epoch"] == -1
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(x), official18(x), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("prefix", ["", "module.", "_orig_mod."])
def test_bare_state_dict_with_or_without_prefix(tmp_path, official18, prefix):
    path = tmp_path / "bare.pth"
    torch.save({prefix + k: v for k, v in official18.state_dict().items()}, path)
    loaded = build_model("resnet18_cbam", weights=str(path))
    for key, value in official18.state_dict().items():
        assert torch.equal(loaded.module.state_dict()[key], value)


class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_malicious_pickle_is_refused_not_run(tmp_path):
    sentinel = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"fc.weight": torch.zeros(2, 2)}, "payload": _Evil(sentinel)}, path)
    with pytest.raises(CbamDeployError, match="refused"):
        read_checkpoint(path)
    assert not sentinel.exists()


@pytest.mark.parametrize("protocol", [0, 2, 4, pickle.HIGHEST_PROTOCOL])
def test_raw_pickle_that_would_run_code_is_refused_not_corrupt(tmp_path, protocol):
    # torch's weights-only unpickler stops at protocol 4+ framing before it sees the global, so
    # the refusal comes from our static scan of the opcodes (nothing is imported or run)
    sentinel = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"fc.weight": _Evil(sentinel)}, protocol=protocol))
    with pytest.raises(CbamDeployError) as info:
        read_checkpoint(path)
    message = str(info.value)
    assert message.startswith("refused to load checkpoint") and "system" in message and "weights_only" in message
    assert "corrupt" not in message
    assert not sentinel.exists()


@pytest.mark.parametrize("seed", range(12))
def test_random_garbage_is_one_clear_error(tmp_path, seed):
    # corrupt bytes make torch's unpickler fail in many ways (UnpicklingError, IndexError, ...)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(np.random.default_rng(seed).integers(0, 256, 2048, dtype=np.uint8).tobytes())
    with pytest.raises(CbamDeployError, match="^not a PyTorch checkpoint: ") as info:
        read_checkpoint(garbage)
    assert "Please file an issue" not in str(info.value) and "\n" not in str(info.value)


def test_legacy_and_plain_pickles_are_told_apart(tmp_path):
    legacy = tmp_path / "legacy.pth"
    torch.save({"w": torch.ones(100)}, legacy, _use_new_zipfile_serialization=False)
    assert read_checkpoint(legacy).state_dict["w"].shape == (100,)
    legacy.write_bytes(legacy.read_bytes()[:200])
    with pytest.raises(CbamDeployError, match="corrupt or truncated PyTorch file"):
        read_checkpoint(legacy)
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps([1, 2, 3], protocol=4))
    with pytest.raises(CbamDeployError, match="Python pickle that weights-only loading cannot read"):
        read_checkpoint(plain)
    image = tmp_path / "photo.pth"
    image.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    with pytest.raises(CbamDeployError, match="not a PyTorch checkpoint"):
        read_checkpoint(image)


def test_plain_pickle_and_garbage_are_clear_errors(tmp_path):
    truncated = tmp_path / "truncated.pth"
    torch.save({"w": torch.ones(1000)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    with pytest.raises(CbamDeployError, match="cannot read checkpoint"):
        read_checkpoint(truncated)
    with pytest.raises(CbamDeployError, match="does not exist"):
        read_checkpoint(tmp_path / "nope.pth")
    listy = tmp_path / "list.pth"
    with open(listy, "wb") as fh:
        pickle.dump([1, 2, 3], fh)
    with pytest.raises(CbamDeployError):
        read_checkpoint(listy)


def test_missing_and_unexpected_keys_are_listed(tmp_path, official18):
    path = tmp_path / "official.pth"
    save_official(official18, path)
    with pytest.raises(CbamDeployError) as info:
        build_model("resnet18", weights=str(path))  # plain model, CBAM checkpoint
    message = str(info.value)
    assert "unexpected" in message and "layer1.0.cbam.ChannelGate.mlp.1.weight" in message
    assert "in all" in message and "*_cbam" in message
    with pytest.raises(CbamDeployError, match="missing .*depth"):
        build_model("resnet34_cbam", weights=str(path))


def test_shape_mismatch_names_key_and_shapes(tmp_path, official18):
    path = tmp_path / "official.pth"
    save_official(official18, path)
    with pytest.raises(CbamDeployError) as info:
        build_model("resnet18_cbam", weights=str(path), num_classes=1000)
    message = str(info.value)
    assert "fc.weight: checkpoint (12, 512) vs model (1000, 512)" in message and "--num-classes" in message


def test_nan_weights_are_refused(tmp_path, official18):
    state = dict(official18.state_dict())
    state["fc.bias"] = torch.full_like(state["fc.bias"], float("nan"))
    path = tmp_path / "nan.pth"
    torch.save(state, path)
    with pytest.raises(CbamDeployError, match="NaN"):
        read_checkpoint(path)


def test_factory_model_and_its_errors(tmp_path):
    good = tmp_path / "mynet.py"
    good.write_text(
        "from cbam_deploy.models import create_model\n"
        "def make(num_classes=3):\n    return create_model('resnet18_cbam', num_classes=num_classes, stem='cifar')\n"
        "def broken():\n    raise RuntimeError('no GPU here')\n"
        "def not_a_model():\n    return 42\n"
    )
    loaded = build_model(f"{good}:make", num_classes=4)
    assert loaded.source == "factory" and loaded.module.fc.out_features == 4
    with pytest.raises(CbamDeployError, match="raised RuntimeError: no GPU here"):
        build_model(f"{good}:broken")
    with pytest.raises(CbamDeployError, match="not a torch.nn.Module"):
        build_model(f"{good}:not_a_model")
    with pytest.raises(CbamDeployError, match="no callable"):
        build_model(f"{good}:missing")
    bad_import = tmp_path / "bad.py"
    bad_import.write_text("import not_a_real_module_xyz\n")
    with pytest.raises(CbamDeployError, match="importing"):
        build_model(f"{bad_import}:make")


@pytest.mark.parametrize("body,needle", [
    ("def make():\n    import sys\n    sys.exit(0)\n", r"quits.py:make called sys.exit\(0\) while building the model"),
    ("def make():\n    raise SystemExit\n", r"called sys.exit\(\) while building the model"),
    ("import sys\nsys.exit(1)\ndef make():\n    pass\n", r"importing .*quits.py called sys.exit\(1\) \(line 2\)"),
    ("class Stop(BaseException):\n    pass\ndef make():\n    raise Stop('x')\n", r"make\(\) raised Stop: x"),
])
def test_factory_that_exits_is_an_error_not_a_silent_exit(tmp_path, body, needle):
    factory = tmp_path / "quits.py"
    factory.write_text(body)
    with pytest.raises(CbamDeployError, match=needle):
        build_model(f"{factory}:make")
