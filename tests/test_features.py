"""Zoo backbones with ``outputs="features"``: the stage outputs C2..C5 (a detector's or FPN's input)
instead of logits, from the same state dict and module names as the classifier, so an official
classification checkpoint loads unchanged and the ONNX node scopes (and INT8 gate detection) stay."""

from __future__ import annotations

import pytest
import torch
from official_style import randomize

from cbam_deploy.errors import CbamDeployError
from cbam_deploy.models import build_model, create_model
from cbam_deploy.models.resnet import BasicBlock, ResNet

STAGES = ["C2", "C3", "C4", "C5"]


def shapes(out: dict) -> dict:
    return {k: tuple(v.shape[1:]) for k, v in out.items()}


def test_resnet18_cbam_features_at_224():
    model = randomize(create_model("resnet18_cbam", outputs="features"), seed=3)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 224, 224))
    assert isinstance(out, dict) and list(out) == STAGES
    assert shapes(out) == {"C2": (64, 56, 56), "C3": (128, 28, 28), "C4": (256, 14, 14), "C5": (512, 7, 7)}


@pytest.mark.parametrize("name", ["resnet50_cbam", "resnet50_bam", "resnext50_32x4d_se", "resnet101"])
def test_bottleneck_features_have_4x_channels(name):
    with torch.device("meta"):  # shapes only: no arithmetic
        out = create_model(name, outputs="features")(torch.empty(2, 3, 224, 224))
    assert list(out) == STAGES
    assert shapes(out) == {"C2": (256, 56, 56), "C3": (512, 28, 28), "C4": (1024, 14, 14), "C5": (2048, 7, 7)}


def test_half_width_cifar_features_keep_strides_1_2_4_8():
    model = randomize(create_model("resnet10_half_cbam", num_classes=10, stem="cifar", outputs="features"), seed=4)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert list(out) == STAGES and all(v.shape[0] == 2 for v in out.values())
    assert shapes(out) == {"C2": (32, 32, 32), "C3": (64, 16, 16), "C4": (128, 8, 8), "C5": (256, 4, 4)}


def test_same_state_dict_keys_and_module_names_as_the_classifier():
    logits = create_model("resnet18_cbam", num_classes=10, stem="cifar")
    features = create_model("resnet18_cbam", num_classes=10, stem="cifar", outputs="features")
    assert list(features.state_dict()) == list(logits.state_dict())  # fc kept, no 'backbone.' prefix
    assert [n for n, _ in features.named_modules()] == [n for n, _ in logits.named_modules()]
    assert "layer1.0.cbam.ChannelGate" in dict(features.named_modules())
    assert features.outputs == "features" and logits.outputs == "logits"


@pytest.mark.parametrize("name", ["resnet18_cbam", "resnet18_bam"])
def test_classification_checkpoint_loads_into_the_backbone(tmp_path, name):
    logits = randomize(create_model(name, num_classes=10, stem="cifar"), seed=5)
    path = tmp_path / "classifier.pth"
    torch.save(logits.state_dict(), path)

    features = create_model(name, num_classes=10, stem="cifar", outputs="features")
    result = features.load_state_dict(torch.load(path, weights_only=True), strict=True)
    assert not result.missing_keys and not result.unexpected_keys

    loaded = build_model(name, weights=str(path), stem="cifar", outputs="features")  # the library's strict loader
    assert loaded.outputs == "features" and loaded.num_classes == 10  # inferred from the checkpoint's fc

    seen = {}
    hooks = [getattr(logits, f"layer{i}").register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(i, o))
             for i in range(1, 5)]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = logits(x)
        out, out_built = features(x), loaded.module(x)
    for hook in hooks:
        hook.remove()
    assert torch.equal(out["C5"], seen[4]) and torch.equal(out_built["C5"], seen[4])  # exactly layer4's output
    assert torch.equal(logits.fc(out["C5"].mean((2, 3))), ref)  # the head the backbone leaves out
    if name == "resnet18_bam":  # a stage's output is what the next stage consumes: after its BAM
        with torch.no_grad():
            assert torch.equal(out["C2"], logits.bam1(seen[1]))
    else:
        assert all(torch.equal(out[f"C{i + 1}"], seen[i]) for i in range(1, 4))


def test_describe_records_the_mode():
    feats = build_model("resnet10_half_cbam", num_classes=10, stem="cifar", outputs="features")
    plain = build_model("resnet10_half_cbam", num_classes=10, stem="cifar")
    assert feats.describe()["outputs_mode"] == "features" and plain.describe()["outputs_mode"] == "logits"
    assert feats.describe()["init"] == plain.describe()["init"]  # the same weights, seeded alike
    assert build_model("resnet10_half_cbam", stem="cifar", outputs=None).outputs == "logits"  # older manifests


def test_dict_order_is_the_output_order():
    from cbam_deploy.outputs import flatten_outputs

    model = create_model("resnet10_half", num_classes=10, stem="cifar", outputs="features")
    with torch.no_grad():
        out = model(torch.randn(1, 3, 32, 32))
    assert [name for name, _ in flatten_outputs(out)] == STAGES


@pytest.mark.parametrize("bad", ["feature", "Features", "C5", "", None, 1])
def test_bad_outputs_value_is_refused(bad):
    with pytest.raises(CbamDeployError, match="outputs must be one of logits, features"):
        create_model("resnet18", outputs=bad)
    if bad is not None:  # None is build_model's "default" (manifests written before --outputs)
        with pytest.raises(CbamDeployError, match="outputs must be one of logits, features"):
            build_model("resnet18", outputs=bad)
    with pytest.raises(ValueError, match="outputs must be one of"):
        ResNet(BasicBlock, [1, 1, 1, 1], outputs=bad)


def test_factory_refuses_features_but_builds_with_its_own_outputs(tmp_path):
    factory = tmp_path / "net.py"
    factory.write_text("import torch\n"
                       "def make(num_classes=3):\n    return torch.nn.Conv2d(3, num_classes, 1)\n")
    with pytest.raises(CbamDeployError, match="--outputs features is for zoo models; your factory decides its outputs"):
        build_model(f"{factory}:make", outputs="features")
    loaded = build_model(f"{factory}:make")
    assert loaded.outputs is None and loaded.describe()["outputs_mode"] is None
