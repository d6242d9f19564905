import pytest
import torch
from official_style import OfficialStyleResNet, randomize

from cbam_deploy.errors import CbamDeployError
from cbam_deploy.models import count_gmacs, count_parameters, create_model, list_models, zoo_table
from cbam_deploy.models.layers import CBAM

OFFICIAL_PARAMS = {
    "resnet18_cbam": 11_779_392,
    "resnet34_cbam": 21_960_468,
    "resnet50_cbam": 28_089_624,
    "resnet101_cbam": 49_330_172,
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnext50_32x4d": 25_028_904,  # torchvision's count
}


@pytest.mark.parametrize("name,expected", sorted(OFFICIAL_PARAMS.items()))
def test_parameter_counts_match_official(name, expected):
    with torch.device("meta"):
        model = create_model(name)
    assert count_parameters(model) == expected


def test_zoo_has_required_names():
    names = set(list_models())
    for depth in (18, 34, 50, 101):
        assert {f"resnet{depth}", f"resnet{depth}_se", f"resnet{depth}_cbam", f"resnet{depth}_bam"} <= names
    assert {"resnext50_32x4d", "resnext50_32x4d_cbam"} <= names


def test_resnet50_cbam_key_layout_is_official():
    with torch.device("meta"):
        ours = create_model("resnet50_cbam").state_dict()
        official = OfficialStyleResNet(50).state_dict()
    assert len(ours) == 480
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in official.items()}
    for key in ("layer1.0.cbam.ChannelGate.mlp.1.weight", "layer1.0.cbam.ChannelGate.mlp.3.bias",
                "layer1.0.cbam.SpatialGate.spatial.conv.weight", "layer1.0.cbam.SpatialGate.spatial.bn.running_var"):
        assert key in ours


def test_rewrite_matches_official_forward_at_224():
    official = randomize(OfficialStyleResNet(18), seed=3)
    ours = create_model("resnet18_cbam")
    ours.load_state_dict(official.state_dict())
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, got = official(x), ours(x)
    assert ref.abs().max() > 1e-2  # the comparison is not between two zero tensors
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-5)


def test_cbam_gates_follow_the_paper():
    torch.manual_seed(0)
    cbam = randomize(CBAM(32), seed=5)
    x = torch.randn(3, 32, 9, 11)
    with torch.no_grad():
        mlp = cbam.ChannelGate.mlp
        channel = torch.sigmoid(mlp(x.mean((2, 3))) + mlp(x.amax((2, 3))))[:, :, None, None]
        y = x * channel
        pooled = torch.cat([y.max(1, keepdim=True).values, y.mean(1, keepdim=True)], 1)  # [max, mean]
        spatial = torch.sigmoid(cbam.SpatialGate.spatial.bn(cbam.SpatialGate.spatial.conv(pooled)))
        torch.testing.assert_close(cbam(x), y * spatial)
        assert cbam.SpatialGate.spatial.conv.bias is None and cbam.ChannelGate.mlp[1].bias is not None


def test_cbam_sits_before_the_residual_add():
    model = randomize(create_model("resnet18_cbam"), seed=2)
    block = model.layer1[0]
    seen = {}
    block.cbam.register_forward_hook(lambda m, i, o: seen.update(out=o.clone()))
    x = torch.randn(1, 64, 16, 16)
    with torch.no_grad():
        y = block(x)
        torch.testing.assert_close(y, torch.relu(seen["out"] + x))


def test_official_init_zeroes_spatial_gate_bn():
    model = create_model("resnet18_cbam")
    assert model.layer1[0].cbam.SpatialGate.spatial.bn.weight.abs().sum() == 0
    assert torch.all(model.layer1[0].bn1.weight == 1)


@pytest.mark.parametrize("name", ["resnet18_se", "resnet18_bam", "resnext50_32x4d_cbam", "resnet34_cbam"])
def test_variants_run_at_two_sizes(name):
    model = randomize(create_model(name, num_classes=7, stem="cifar"))
    with torch.no_grad():
        for size in (32, 48):
            assert model(torch.randn(2, 3, size, size)).shape == (2, 7)


def test_global_head_averages_the_whole_map_beyond_224():
    model = randomize(create_model("resnet18_cbam", num_classes=5))
    x = torch.randn(1, 3, 320, 320)
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape[-2:] == (10, 10)
        torch.testing.assert_close(model(x), model.fc(features.mean((2, 3))))
        corner_only = model.fc(torch.nn.AvgPool2d(7)(features).flatten(1))  # the official fixed head
        assert not torch.allclose(corner_only, model(x), atol=1e-4)


def test_unknown_model_suggests_close_names():
    with pytest.raises(CbamDeployError, match="resnet50_cbam"):
        create_model("resnet50cbam")


def test_bad_num_classes_and_stem():
    with pytest.raises(CbamDeployError, match="num_classes"):
        create_model("resnet18", num_classes=0)
    with pytest.raises(CbamDeployError, match="stem"):
        create_model("resnet18", stem="mnist")


def test_flops_are_computed_and_cbam_overhead_is_small():
    with torch.device("meta"):
        plain, cbam = create_model("resnet50"), create_model("resnet50_cbam")
    base, attn = count_gmacs(plain), count_gmacs(cbam)
    assert 4.0 < base < 4.2  # ResNet-50: 4.1 GMACs at 224
    assert 0 < attn - base < 0.02 * base  # "negligible overhead"
    rows = {r["name"]: r for r in zoo_table()}
    assert rows["resnet50_cbam"]["parameters"] == 28_089_624
