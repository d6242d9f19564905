"""Write a Triton Inference Server model repository from a bundle.

``REPO/<model>/config.pbtxt`` and ``REPO/<model>/1/<file>`` for the onnxruntime backend (ONNX FP32
or INT8 Q/DQ), the TensorRT backend (engine, as ``model.plan``) and the OpenVINO backend (IR, as
``model.xml`` + ``model.bin``). Names, datatypes and dims come from the manifest. Each model folder
is staged beside the repository and swapped in with renames, so Triton never sees half a model.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from ..bundle import artifact_path, fixed_batch, read_manifest
from ..errors import CbamDeployError

_BACKENDS = {
    # format: (config lines naming the backend, model file name(s) in the version folder, instance kind)
    "onnx": ('platform: "onnxruntime_onnx"', ["model.onnx"], "KIND_CPU"),
    "tensorrt": ('platform: "tensorrt_plan"', ["model.plan"], "KIND_GPU"),
    "openvino": ('backend: "openvino"', ["model.xml", "model.bin"], "KIND_CPU"),
}


def _dims(shape: list) -> str:
    return "[ " + ", ".join(str(d if isinstance(d, int) else -1) for d in shape) + " ]"


def model_config(manifest: dict, artifact: dict, name: str, max_batch: int, instances: int, delay_us: int,
                 kind: str | None = None) -> str:
    """config.pbtxt text for one artifact."""
    platform, _, default_kind = _BACKENDS[artifact["format"]]
    shape = manifest["input"]["shape"]
    batched = fixed_batch(manifest) is None
    if artifact["format"] == "tensorrt":
        profile = (artifact.get("export") or {}).get("profile") or {}
        if profile.get("max_batch") and max_batch > profile["max_batch"]:
            raise CbamDeployError(f"--max-batch {max_batch} exceeds the engine's profile (max {profile['max_batch']}); "
                                  "rebuild the engine with a larger --max-batch")
    lines = [f'name: "{name}"', platform, f"max_batch_size: {max_batch if batched else 0}"]
    in_dims = shape[1:] if batched else shape
    lines += [
        "input [", "  {", f'    name: "{manifest["input"]["name"]}"', "    data_type: TYPE_FP32",
        f"    dims: {_dims(in_dims)}", "  }", "]", "output [",
    ]
    for index, output in enumerate(manifest["outputs"]):  # every output, in the model's order
        out_dims = output["shape"][1:] if batched else output["shape"]
        lines += ["  {", f'    name: "{output["name"]}"', "    data_type: TYPE_FP32", f"    dims: {_dims(out_dims)}",
                  "  }" + ("," if index < len(manifest["outputs"]) - 1 else "")]
    lines.append("]")
    if batched:
        preferred = [b for b in (2, 4, 8, 16, 32) if b <= max_batch]
        lines += ["dynamic_batching {"]
        if preferred:
            lines.append(f"  preferred_batch_size: [ {', '.join(map(str, preferred))} ]")
        lines += [f"  max_queue_delay_microseconds: {delay_us}", "}"]
    lines += ["instance_group [", "  {", f"    count: {instances}", f"    kind: {kind or default_kind}", "  }", "]"]
    if artifact["format"] == "openvino":
        hint = "f32" if artifact["precision"] in ("fp32", "int8") else "f16"
        lines += _parameters({"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": hint})
    lines.append(f'# made by cbam-deploy from artifact "{artifact["name"]}" ({artifact["format"]}, {artifact["precision"]}, '
                 f'sha256 {artifact["sha256"][:16]}...)')
    return "\n".join(lines) + "\n"


def _parameters(values: dict[str, str]) -> list[str]:
    out = []
    for key, value in values.items():
        out += ["parameters {", f'  key: "{key}"', f'  value: {{ string_value: "{value}" }}', "}"]
    return out


def write_repository(bundle_dir: str | Path, repo: str | Path, artifacts: list[str] | None = None, name: str | None = None,
                     max_batch: int = 8, instances: int = 1, delay_us: int = 5000, kind: str | None = None) -> list[dict]:
    bundle_dir, repo = Path(bundle_dir), Path(repo)
    manifest = read_manifest(bundle_dir)
    if max_batch < 1 or instances < 1 or delay_us < 0:
        raise CbamDeployError("--max-batch and --instances must be >= 1 and --delay-us >= 0")
    if kind not in (None, "KIND_CPU", "KIND_GPU"):
        raise CbamDeployError(f"--kind must be KIND_CPU or KIND_GPU, got {kind}")
    chosen = artifacts or ["onnx-fp32"]
    base = name or manifest["model"]["name"].replace(":", "_").replace("/", "_").replace(".py", "")
    try:
        repo.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CbamDeployError(f"cannot create the repository folder {repo}: {exc.strerror or exc}") from None
    written = []
    for artifact_name in chosen:
        artifact, path = artifact_path(bundle_dir, manifest, artifact_name)
        if artifact["format"] not in _BACKENDS:
            raise CbamDeployError(f"artifact {artifact_name} ({artifact['format']}) has no Triton backend here")
        model_name = base if len(chosen) == 1 else f"{base}-{artifact_name}"
        _, files, _ = _BACKENDS[artifact["format"]]
        config = model_config(manifest, artifact, model_name, max_batch, instances, delay_us, kind)
        with tempfile.TemporaryDirectory(prefix=".cbam-triton-", dir=repo) as staging:
            staged = Path(staging) / model_name
            (staged / "1").mkdir(parents=True)
            sources = [path] if len(files) == 1 else [path, path.with_suffix(".bin")]
            for source, target in zip(sources, files):
                shutil.copyfile(source, staged / "1" / target)
            (staged / "config.pbtxt").write_text(config)
            final = repo / model_name
            old = Path(staging) / "previous"
            if final.exists():
                final.rename(old)
            staged.rename(final)
        written.append({"model": model_name, "artifact": artifact_name, "format": artifact["format"],
                        "path": str(final), "config": str(final / "config.pbtxt")})
    return written
