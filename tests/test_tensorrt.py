"""TensorRT: version gating, builder flag plans (TF32, precision, DLA), the Q/DQ form per version,
profiles and their enforcement, timing-cache keys and engine metadata are tested here without
TensorRT, on the pure functions and on real ONNX/onnxruntime models. Building and running engines
needs the library and a GPU: those tests are marked ``tensorrt`` and skip with the reason where they
are absent. Nothing here pretends to be TensorRT."""

import importlib.util
import json

import numpy as np
import pytest
from helpers import qdq_weight_forms

from cbam_deploy.batching import batch_limit as profile_batch_limit
from cbam_deploy.batching import check_batch_fits as check_batch_against_profile
from cbam_deploy.batching import fit_batch as fit_batch_to_profile
from cbam_deploy.devices import image_stack
from cbam_deploy.backends.tensorrt.exporter import (
    QDQ_FLOAT_WEIGHT_PAIRS,
    QDQ_INT8_WEIGHTS,
    BuildPlan,
    Profile,
    check_dla,
    check_engine_compatible,
    check_timing_cache_location,
    dla_profile,
    engine_metadata,
    parse_version,
    plan_build,
    profile_chunks,
    qdq_form_for_tensorrt,
    qdq_form_for_version,
    require_tensorrt,
    timing_cache_name,
)
from cbam_deploy.errors import CbamDeployError

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None
NO_TRT = ("TensorRT cannot be installed on these machines (its wheels fetch libraries from outside the package "
          "registries); runs where TensorRT and a GPU are")


@pytest.mark.parametrize("version,precision,variant,flags,cleared,explicit,strong,qdq", [
    ((8, 5), "fp32", "fp32", [], ["TF32"], True, False, None),
    ((8, 5), "fp16", "fp32", ["FP16"], [], True, False, None),
    ((8, 5), "int8", "qdq", ["INT8", "FP16"], [], True, False, QDQ_FLOAT_WEIGHT_PAIRS),
    ((8, 6), "int8", "qdq", ["INT8", "FP16"], [], True, False, QDQ_FLOAT_WEIGHT_PAIRS),
    ((10, 3), "fp32", "fp32", [], ["TF32"], False, False, None),
    ((10, 3), "fp16", "fp32", ["FP16"], [], False, False, None),
    ((10, 13), "int8", "qdq", ["INT8", "FP16"], [], False, False, QDQ_INT8_WEIGHTS),
    ((11, 0), "fp32", "fp32", [], ["TF32"], False, True, None),
    ((11, 0), "fp16", "fp16", [], [], False, True, None),
    ((11, 4), "int8", "qdq", [], [], False, True, QDQ_INT8_WEIGHTS),
])
def test_plan_by_version(version, precision, variant, flags, cleared, explicit, strong, qdq):
    plan = plan_build(version, precision)
    assert isinstance(plan, BuildPlan)
    assert (plan.onnx_variant, plan.builder_flags, plan.cleared_flags, plan.explicit_batch_flag, plan.strongly_typed,
            plan.qdq_form) == (variant, flags, cleared, explicit, strong, qdq)


def test_fp32_engines_never_keep_tf32_and_metadata_says_so():
    for version in [(8, 5), (8, 6), (10, 0), (10, 3), (10, 16), (11, 0), (11, 4)]:
        assert "TF32" in plan_build(version, "fp32").cleared_flags
        assert "TF32" not in plan_build(version, "fp16").cleared_flags  # fp16 bounds cover TF32
    meta = engine_metadata("10.3.0", {"name": "Orin", "compute_capability": "8.7"}, plan_build((10, 3), "fp32"),
                           Profile(), ["batch", 3, 224, 224])
    assert meta["tf32"] is False and meta["cleared_flags"] == ["TF32"]


def test_plan_rejects_old_versions_and_bad_dla():
    with pytest.raises(CbamDeployError, match="8.5 or newer"):
        plan_build((8, 4), "fp32")
    with pytest.raises(CbamDeployError, match="DLA runs fp16 or int8"):
        plan_build((10, 3), "fp32", dla_core=0)
    with pytest.raises(CbamDeployError, match="--dla-core must be >= 0"):
        plan_build((10, 3), "fp16", dla_core=-1)
    plan = plan_build((10, 3), "int8", dla_core=1)
    assert "GPU_FALLBACK" in plan.builder_flags and plan.dla_core == 1
    with pytest.raises(CbamDeployError, match="precision"):
        plan_build((10, 3), "fp8")


def test_dla_needs_a_static_profile_and_an_existing_core():
    assert dla_profile(Profile(1, 4, 16)) == Profile(4, 4, 4) and dla_profile(Profile(1, 4, 16)).is_static
    with pytest.raises(CbamDeployError, match="sees no DLA"):
        check_dla(0, 0, "10.3.0")  # x86 GPUs, or a TensorRT without DLA support
    with pytest.raises(CbamDeployError, match="DLA cores 0..1"):
        check_dla(2, 2, "10.3.0")
    check_dla(2, 1, "10.3.0")


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


# ------------------------------------------------------------------------------ profile enforcement

DYNAMIC = {"input": {"name": "input", "shape": ["batch", 3, 32, 32]}}
ENGINE = {"name": "tensorrt-fp16", "format": "tensorrt", "precision": "fp16",
          "export": {"profile": {"min_batch": 2, "opt_batch": 4, "max_batch": 8}}}


def test_profile_limits_for_callers():
    onnx_artifact = {"name": "onnx-fp32", "format": "onnx"}
    assert profile_batch_limit(DYNAMIC, ENGINE) == (2, 8)
    assert profile_batch_limit(DYNAMIC, onnx_artifact) is None
    assert profile_batch_limit({"input": {"shape": [4, 3, 32, 32]}}, onnx_artifact) == (4, 4)
    check_batch_against_profile(DYNAMIC, ENGINE, 8)
    check_batch_against_profile(DYNAMIC, onnx_artifact, 32)
    with pytest.raises(CbamDeployError, match=r"--batch 32 is outside its TensorRT profile for tensorrt-fp16 \(2..8\)"):
        check_batch_against_profile(DYNAMIC, ENGINE, 32)  # eval's default batch against the default profile
    with pytest.raises(CbamDeployError, match=r"--max-batch 1 is outside"):
        check_batch_against_profile(DYNAMIC, ENGINE, 1, "--max-batch")
    assert fit_batch_to_profile(DYNAMIC, ENGINE, 32) == 8 and fit_batch_to_profile(DYNAMIC, ENGINE, 1) == 2
    assert fit_batch_to_profile(DYNAMIC, onnx_artifact, 32) == 32
    with pytest.raises(CbamDeployError, match="records no TensorRT profile"):
        profile_batch_limit(DYNAMIC, {"name": "tensorrt-fp32", "format": "tensorrt", "export": {}})


@pytest.mark.parametrize("total,low,high,expected", [
    (8, 1, 8, [(0, 8, 8)]),
    (32, 1, 8, [(0, 8, 8), (8, 16, 8), (16, 24, 8), (24, 32, 8)]),  # eval's batch 32, default profile
    (9, 2, 8, [(0, 8, 8), (8, 9, 2)]),  # --min-batch 2: the last chunk is padded, not refused
    (1, 2, 8, [(0, 1, 2)]),
    (4, 4, 4, [(0, 4, 4)]),  # static (DLA, fixed batch)
    (0, 1, 8, []),
])
def test_profile_chunks_cover_every_sample_inside_the_profile(total, low, high, expected):
    chunks = profile_chunks(total, low, high)
    assert chunks == expected
    assert sum(stop - start for start, stop, _ in chunks) == total
    assert all(low <= size <= high and size >= stop - start for start, stop, size in chunks)


# ---------------------------------------------------------------------------------------- Q/DQ form

@pytest.fixture(scope="module")
def qdq_models(tmp_path_factory):
    """A small CBAM-like network (residual, sigmoid gate) quantized the way the tensorrt recipe does
    (symmetric int8, per-channel weights), once with float biases and once with int32 biases."""
    import torch
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 5)

        def forward(self, x):
            y = torch.relu(self.c1(x))
            z = self.c2(y) + y
            z = z * torch.sigmoid(z.mean((2, 3), keepdim=True))
            return self.fc(z.mean((2, 3)))

    class Reader(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(0)
            self.batches = iter([{"input": rng.standard_normal((2, 3, 16, 16), dtype=np.float32)} for _ in range(4)])

        def get_next(self):
            return next(self.batches, None)

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("qdq")
    fp32 = out / "model.onnx"
    torch.onnx.export(Net().eval(), torch.randn(1, 3, 16, 16), str(fp32), input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}}, opset_version=17, dynamo=False)
    paths = {}
    for bias in (False, True):
        paths[bias] = out / f"qdq-bias-{bias}.onnx"
        quantize_static(str(fp32), str(paths[bias]), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": bias})
    return paths


def _run(model_or_path, x):
    import onnxruntime as ort

    source = model_or_path.SerializeToString() if hasattr(model_or_path, "SerializeToString") else str(model_or_path)
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


def test_qdq_form_follows_the_version():
    assert qdq_form_for_version((8, 5)) == qdq_form_for_version((8, 6)) == QDQ_FLOAT_WEIGHT_PAIRS
    assert qdq_form_for_version((10, 0)) == qdq_form_for_version((10, 16)) == qdq_form_for_version((11, 4)) == QDQ_INT8_WEIGHTS


@pytest.mark.parametrize("quantized_bias", [False, True])
def test_tensorrt8_form_has_no_int8_weight_initializers_and_the_same_values(qdq_models, quantized_bias):
    import onnx

    path = qdq_models[quantized_bias]
    before = qdq_weight_forms(onnx.load(str(path)))
    assert before["int8_initializer"] >= 3 and before["shared"] >= 1  # what onnxruntime writes (TensorRT 10/11 form)
    assert qdq_form_for_tensorrt(onnx.load(str(path)), QDQ_INT8_WEIGHTS) == onnx.load(str(path))
    converted = qdq_form_for_tensorrt(onnx.load(str(path)), QDQ_FLOAT_WEIGHT_PAIRS)
    onnx.checker.check_model(converted, full_check=True)
    after = qdq_weight_forms(converted)
    assert after["int8_initializer"] == 0 and after["other"] == 0  # every DQ reads a Q: "activation types" only
    assert after["shared"] == 0  # dedicated pairs
    int8_inits = [i.name for i in converted.graph.initializer if i.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.INT32)
                  and len(i.dims) > 1]
    assert int8_inits == []  # no quantized weight tensor left (zero points are scalars or vectors)
    x = np.random.default_rng(1).standard_normal((3, 3, 16, 16), dtype=np.float32)
    np.testing.assert_allclose(_run(converted, x), _run(path, x), rtol=0, atol=1e-6)


def test_unknown_qdq_form_is_refused(qdq_models):
    import onnx

    with pytest.raises(CbamDeployError, match="unknown Q/DQ form"):
        qdq_form_for_tensorrt(onnx.load(str(qdq_models[False])), "int4")


# ------------------------------------------------------------------------- timing cache and image pins

def test_timing_cache_is_keyed_by_version_and_gpu_and_kept_out_of_bundles(tmp_path):
    orin, h100 = {"name": "Orin (nvgpu)", "compute_capability": "8.7"}, {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
    names = {timing_cache_name(v, g) for v in ("10.3.0", "10.8.0.43") for g in (orin, h100)}
    assert len(names) == 4 and all("/" not in n and " " not in n for n in names)
    assert timing_cache_name("10.3.0", orin) == "timing-trt10.3.0-orin-nvgpu-sm8.7.cache"
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    with pytest.raises(CbamDeployError, match="inside the bundle"):
        check_timing_cache_location(bundle / "timing.cache", bundle)
    check_timing_cache_location(tmp_path / "cache" / "timing.cache", bundle)
    check_timing_cache_location(bundle / "timing.cache", None)


def test_image_stack_is_read_from_the_image_and_recorded_in_engine_metadata(tmp_path, monkeypatch):
    stack = {"image": "cuda", "triton_release": "25.01", "tensorrt": "10.8.0.43", "cuda": "12.8"}
    path = tmp_path / "stack.json"
    path.write_text(json.dumps(stack))
    monkeypatch.setenv("CBAM_DEPLOY_STACK_FILE", str(path))
    assert image_stack() == stack
    meta = engine_metadata("10.8.0.43", {"name": "L4", "compute_capability": "8.9"}, plan_build((10, 8), "int8"),
                           Profile(), ["batch", 3, 224, 224])
    assert meta["triton_release"] == "25.01" and meta["qdq_form"] == QDQ_INT8_WEIGHTS
    monkeypatch.setenv("CBAM_DEPLOY_STACK_FILE", str(tmp_path / "absent.json"))
    assert image_stack() is None


@pytest.mark.skipif(HAVE_TRT, reason="TensorRT is installed here")
def test_missing_tensorrt_names_the_way_to_get_it():
    with pytest.raises(CbamDeployError, match=r"cuda' Docker image"):
        require_tensorrt()


# ------------------------------------------------------------------- with TensorRT and a GPU only

def _gpu_or_skip():
    import torch

    if not torch.cuda.is_available():
        pytest.skip("TensorRT engines need a CUDA GPU")


@pytest.fixture(scope="module")
def small_bundle(tmp_path_factory):
    from cbam_deploy.export_job import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("trt") / "b"
    export_bundle(ExportOptions(model="resnet10_half_cbam", stem="cifar", num_classes=10, output=str(out)))
    return out


@pytest.mark.tensorrt
@pytest.mark.skipif(not HAVE_TRT, reason=NO_TRT)
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_engine_builds_and_matches(small_bundle, precision):
    _gpu_or_skip()
    from cbam_deploy.build import TensorRTOptions, build_artifacts
    from cbam_deploy.bundle import read_manifest
    from cbam_deploy.verify import verify_bundle

    outcomes = build_artifacts(small_bundle, "tensorrt", precision, calib_data="synthetic", calib_size=16,
                               trt=TensorRTOptions(1, 2, 4))
    name = f"tensorrt-{precision}"
    assert any(o.name == name for o in outcomes), outcomes
    export = next(a for a in read_manifest(small_bundle)["artifacts"] if a["name"] == name)["export"]
    assert export["tf32"] is (precision != "fp32")
    result = verify_bundle(small_bundle, artifacts=[name])
    assert result["passed"], result


@pytest.mark.tensorrt
@pytest.mark.skipif(not HAVE_TRT, reason=NO_TRT)
def test_runner_splits_and_pads_to_its_profile(small_bundle):
    _gpu_or_skip()
    from cbam_deploy.build import TensorRTOptions, build_artifacts
    from cbam_deploy.bundle import read_manifest
    from cbam_deploy.loaders import open_artifact

    build_artifacts(small_bundle, "tensorrt", "fp32", trt=TensorRTOptions(2, 2, 4))
    manifest = read_manifest(small_bundle)
    engine, reference = open_artifact(small_bundle, manifest, "tensorrt-fp32"), open_artifact(small_bundle, manifest, "onnx-fp32")
    x = np.random.default_rng(0).standard_normal((9, 3, 32, 32), dtype=np.float32)
    for rows in (1, 4, 9):  # below min (padded), inside, above max (split, last chunk padded)
        np.testing.assert_allclose(engine.run(x[:rows]), reference.run(x[:rows]), rtol=1e-3, atol=1e-4)
    with pytest.raises(CbamDeployError, match="outside this engine's profile"):
        engine.run_timed(x[:1])


@pytest.mark.tensorrt
@pytest.mark.skipif(not HAVE_TRT, reason=NO_TRT)
def test_dla_is_refused_where_tensorrt_sees_none(small_bundle):
    _gpu_or_skip()
    import tensorrt as trt

    from cbam_deploy.build import TensorRTOptions, build_artifacts

    if trt.Builder(trt.Logger(trt.Logger.ERROR)).num_DLA_cores > 0:
        pytest.skip("this machine has DLA cores")
    with pytest.raises(CbamDeployError, match="sees no DLA"):
        build_artifacts(small_bundle, "tensorrt", "fp16", trt=TensorRTOptions(1, 1, 1, dla_core=0))
