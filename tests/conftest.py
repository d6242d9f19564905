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
