import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

# two threads for a run on its own; one per worker when pytest-xdist runs two workers (make test), so the
# workers do not fight over the two cores
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)

# the files that take longest (a network exported to every format): started first, so that with two workers
# (``--dist loadfile`` hands out whole files in this order) neither is left with a long file at the end
LONGEST_FIRST = ("test_yolo.py", "test_executorch.py", "test_peers.py", "test_crafted_bundles.py",
                 "test_bundle_faults.py", "test_cbam_opt.py", "test_int8.py", "test_engines.py", "test_one_open.py")


def pytest_collection_modifyitems(items):
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(Path(str(item.fspath)).name, len(rank)))


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
