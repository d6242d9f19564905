"""The TensorRT format's row: engines for this machine's NVIDIA GPU (or Jetson, DLA included), built from
the bundle's FP32 ONNX (fp32, fp16) or from the ``tensorrt`` Q/DQ ONNX (int8), each with its metadata
sidecar; batch bounds from the engine's optimisation profile; served by Triton's TensorRT backend."""

from __future__ import annotations

from pathlib import Path

from ...errors import CbamDeployError
from ...formats import Format, Runtime, TritonFragment
from ..base import TensorRTOptions
from .exporter import (Profile, build_engine, default_timing_cache, engine_profile, fp16_onnx, parse_version, plan_build,
                       probe, require_tensorrt)
from .runner import TensorRTRunner


def _open(path: Path, precision: str, threads: int | None):
    return TensorRTRunner(path, precision=precision)


class TensorRTFormat(Format):
    name = "tensorrt"
    title = "TensorRT engine"
    extension = "engine"
    precisions = ("fp32", "fp16", "int8")
    int8_recipe = "tensorrt"               # the Q/DQ ONNX the onnx format's recipe writes
    int8_from_recipe_artifact = True       # the INT8 engine is built from it
    runtimes = (Runtime("tensorrt", ("tensorrt",), "TensorRT runtime (engines built by cbam-deploy)", probe, _open),)
    preferred_runtimes = ("tensorrt",)
    triton = TritonFragment('platform: "tensorrt_plan"', ("model.plan",), "KIND_GPU", ("KIND_GPU",))
    needs_gpu = True
    bounds_name = "its TensorRT profile"

    def probe(self) -> str | None:
        return probe()

    def companions(self, path: Path) -> tuple[str, ...]:
        return (Path(path).name + ".json",)  # the metadata sidecar

    def make(self, job) -> dict:
        options = job.options.trt or TensorRTOptions()
        trt = require_tensorrt()
        plan = plan_build(parse_version(trt.__version__), job.precision, options.dla_core)
        source = job.source_path
        if plan.onnx_variant == "fp16":
            converted = job.update.path(".source.fp16.onnx")  # an intermediate: never committed, never in the bundle
            fp16_onnx(source, converted)
            source = converted
        timing_cache = Path(options.timing_cache) if options.timing_cache else default_timing_cache()
        return build_engine(source, job.out_path, job.precision, job.bundle.input.shape,
                            Profile(options.min_batch, options.opt_batch, options.max_batch), options.workspace_mb,
                            timing_cache, options.dla_core, bundle_dir=job.bundle.directory)

    def batch_bounds(self, artifact: dict) -> tuple[int, int]:
        profile = engine_profile(artifact)
        return profile.min_batch, profile.max_batch

    def triton_check(self, bundle, artifact, batched: bool, max_batch: int, triton_release: str | None) -> list[str]:
        """Refuse what Triton's TensorRT backend would refuse at load or at the first small request;
        return warnings for what cannot be checked here."""
        export = artifact.get("export") or {}
        profile = export.get("profile") or {}
        warnings = []
        if batched and profile:
            if profile.get("max_batch") and max_batch > profile["max_batch"]:
                raise CbamDeployError(f"--max-batch {max_batch} exceeds the engine's profile (max "
                                      f"{profile['max_batch']}); rebuild the engine with a larger --max-batch")
            if profile.get("min_batch", 1) > 1:
                raise CbamDeployError(f"{artifact['name']} was built with --min-batch {profile['min_batch']}, but Triton "
                                      "sends batches from 1 up; rebuild it with --min-batch 1 for Triton")
        built_for, trt_version = export.get("triton_release"), export.get("tensorrt")
        if triton_release and built_for and triton_release != built_for:
            raise CbamDeployError(f"{artifact['name']} was built with TensorRT {trt_version} in the image for Triton "
                                  f"{built_for}; tritonserver {triton_release} cannot load it. Rebuild it in the cuda "
                                  f"image built with --build-arg TRITON_RELEASE={triton_release}")
        if not built_for:
            warnings.append(f"{artifact['name']}: built with TensorRT {trt_version} outside a cbam-deploy image, so the "
                            "Triton release cannot be checked: use a tritonserver whose TensorRT is exactly that version")
        elif not triton_release:
            warnings.append(f"{artifact['name']}: built for Triton {built_for} (TensorRT {trt_version}); use "
                            f"nvcr.io/nvidia/tritonserver:{built_for}-py3")
        return warnings

    def triton_sources(self, artifact) -> list[tuple[str, str]]:
        return [(artifact.path, "model.plan")]  # the sidecar is cbam-deploy's, not Triton's


FORMAT = TensorRTFormat()
