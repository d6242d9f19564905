"""TensorRT: version gating, profiles and engine metadata are tested here without TensorRT; building
and running engines needs the library and a GPU and is skipped, with the reason, where they are absent."""

import importlib.util

import numpy as np
import pytest

from cbam_deploy.errors import CbamDeployError
from cbam_deploy.exporters.tensorrt import (BuildPlan, Profile, check_engine_compatible, engine_metadata,
                                            parse_version, plan_build, require_tensorrt)

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None


@pytest.mark.parametrize("version,precision,variant,flags,explicit,strong", [
    ((8, 5), "fp32", "fp32", [], True, False),
    ((8, 5), "fp16", "fp32", ["FP16"], True, False),
    ((8, 5), "int8", "qdq", ["INT8", "FP16"], True, False),
    ((10, 3), "fp16", "fp32", ["FP16"], False, False),
    ((10, 13), "int8", "qdq", ["INT8", "FP16"], False, False),
    ((11, 0), "fp16", "fp16", [], False, True),
    ((11, 4), "int8", "qdq", [], False, True),
])
def test_plan_by_version(version, precision, variant, flags, explicit, strong):
    plan = plan_build(version, precision)
    assert isinstance(plan, BuildPlan)
    assert (plan.onnx_variant, plan.builder_flags, plan.explicit_batch_flag, plan.strongly_typed) == (variant, flags, explicit, strong)


def test_plan_rejects_old_versions_and_bad_dla():
    with pytest.raises(CbamDeployError, match="8.5 or newer"):
        plan_build((8, 4), "fp32")
    with pytest.raises(CbamDeployError, match="DLA runs fp16 or int8"):
        plan_build((10, 3), "fp32", dla_core=0)
    assert "GPU_FALLBACK" in plan_build((8, 5), "fp16", dla_core=1).builder_flags
    with pytest.raises(CbamDeployError, match="precision"):
        plan_build((10, 3), "fp8")


def test_versions_parse():
    assert parse_version("8.5.2.2") == (8, 5) and parse_version("10.3.0") == (10, 3) and parse_version("11") == (11, 0)
    with pytest.raises(CbamDeployError):
        parse_version("x.y")


def test_profiles():
    profile = Profile(1, 4, 16)
    profile.validate(None)
    assert profile.shapes(3, 224, 224) == ((1, 3, 224, 224), (4, 3, 224, 224), (16, 3, 224, 224))
    with pytest.raises(CbamDeployError, match="min <= opt <= max"):
        Profile(4, 2, 8).validate(None)
    fixed = Profile(1, 1, 8)
    fixed.validate(2)  # a fixed-batch model has exactly one shape
    assert (fixed.min_batch, fixed.opt_batch, fixed.max_batch) == (2, 2, 2)


def test_engine_metadata_guards_version_and_gpu():
    gpu = {"name": "Orin", "compute_capability": "8.7"}
    meta = engine_metadata("10.3.0", gpu, plan_build((10, 3), "fp16"), Profile(), ["batch", 3, 224, 224])
    check_engine_compatible(meta, "10.3.0", gpu)
    with pytest.raises(CbamDeployError, match="built with TensorRT 10.3.0.*rebuild"):
        check_engine_compatible(meta, "10.13.2", gpu)
    with pytest.raises(CbamDeployError, match="built for Orin.*rebuild"):
        check_engine_compatible(meta, "10.3.0", {"name": "NVIDIA H100", "compute_capability": "9.0"})


@pytest.mark.skipif(HAVE_TRT, reason="TensorRT is installed here")
def test_missing_tensorrt_names_the_extra():
    with pytest.raises(CbamDeployError, match=r"cbam-deploy\[tensorrt\]"):
        require_tensorrt()


@pytest.mark.tensorrt
@pytest.mark.skipif(not HAVE_TRT, reason="TensorRT cannot be installed on these machines (its wheels fetch libraries "
                                         "from outside the package registries); runs where TensorRT and a GPU are")
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_engine_builds_and_matches(tmp_path, precision):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("TensorRT engines need a CUDA GPU")
    from cbam_deploy.build import TensorRTOptions, build_artifacts
    from cbam_deploy.pipeline import ExportRequest, export_bundle
    from cbam_deploy.verify import verify_bundle

    export_bundle(ExportRequest(model="resnet10_half_cbam", stem="cifar", num_classes=10, output=str(tmp_path)))
    outcomes = build_artifacts(tmp_path, "tensorrt", precision, trt=TensorRTOptions(1, 2, 4))
    assert outcomes[0].name == f"tensorrt-{precision}", outcomes
    result = verify_bundle(tmp_path, artifacts=[f"tensorrt-{precision}"])
    assert result["passed"], result
    assert np.isfinite(result["results"][0]["max_abs_err"])
