import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

torch.set_num_threads(2)


@pytest.fixture
def tiny_cbam():
    """resnet18_cbam with the CIFAR stem, 10 classes, randomised BN: small and every gate live."""
    from official_style import randomize

    from cbam_deploy.models import create_model

    return randomize(create_model("resnet18_cbam", num_classes=10, stem="cifar"), seed=1)


@pytest.fixture(scope="session")
def digits_bundle(tmp_path_factory):
    """The trained reference digits model exported once per test session (no parity run): a small
    classifier with real attention, for tests that need a bundle but not its making."""
    from cbam_deploy.export_job import ExportOptions, export_bundle
    from reference.digits import CHECKPOINT, MODEL_NAME, STEM

    out = tmp_path_factory.mktemp("digits-bundle") / "digits"
    export_bundle(ExportOptions(model=MODEL_NAME, stem=STEM, weights=str(CHECKPOINT), output=str(out), parity=False))
    return out


@pytest.fixture(scope="session")
def digits_int8(tmp_path_factory):
    """The reference digits model with its image folders and INT8 artifacts (ort-cpu, openvino),
    built once per session: real attention maps for the attention-parity and explain tests.
    Returns (bundle, train folder, test folder)."""
    from cbam_deploy.export_job import ExportOptions, export_bundle
    from cbam_deploy.quantize import quantize_bundle
    from reference.digits import CHECKPOINT, MODEL_NAME, STEM, write_image_folder

    root = tmp_path_factory.mktemp("digits-int8")
    train = write_image_folder(root / "train", "train")
    test = write_image_folder(root / "test", "test")
    bundle = root / "bundle"
    export_bundle(ExportOptions(model=MODEL_NAME, stem=STEM, weights=str(CHECKPOINT), output=str(bundle), parity=False))
    quantize_bundle(bundle, ["ort-cpu", "openvino"], str(train), calib_size=64, check_samples=16, use_cache=False)
    return bundle, train, test
