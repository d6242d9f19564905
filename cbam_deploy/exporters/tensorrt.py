"""ONNX -> TensorRT engine, one code path for TensorRT 8.5 (JetPack 5), 10.x (JetPack 6/7, x86) and 11.

What differs by version is decided by ``plan_build`` (a pure function, tested without TensorRT):

* network creation: 8.5 needs the EXPLICIT_BATCH flag; 10.x creates explicit-batch networks by
  default; 11 is always strongly typed;
* precision: 8.5/10.x set BuilderFlag.FP16 for fp16 and BuilderFlag.INT8 (+FP16) for an INT8 engine
  built from the bundle's ``tensorrt`` Q/DQ ONNX (explicit quantization; implicit calibration was
  deprecated in 10.1 and is gone in 11). TensorRT 11 has no precision flags: fp16 is built from an
  FP16 ONNX (made here with onnxconverter-common, I/O kept float32), int8 from the Q/DQ ONNX.
* workspace: ``set_memory_pool_limit(MemoryPoolType.WORKSPACE, ...)`` on every supported version.

An engine is only valid for the TensorRT version and GPU that built it, so every engine gets a
sidecar ``<engine>.json`` (TensorRT version, GPU name, compute capability, profile, precision);
``check_engine_compatible`` refuses a mismatch with a message that says to rebuild.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import BackendUnavailable, CbamDeployError
from ..fsutil import atomic_path, write_bytes_atomic

PRECISIONS = ("fp32", "fp16", "int8")
MIN_VERSION = (8, 5)


def require_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise BackendUnavailable(
            "TensorRT is not installed: on x86 with an NVIDIA GPU, pip install 'cbam-deploy[tensorrt]'; on Jetson it "
            "comes with JetPack (python3-libnvinfer)"
        ) from None
    return trt


def parse_version(text: str) -> tuple[int, int]:
    parts = text.split(".")
    try:
        return int(parts[0]), int(parts[1]) if len(parts) > 1 else 0
    except ValueError:
        raise CbamDeployError(f"cannot read the TensorRT version {text!r}") from None


@dataclass
class Profile:
    """Optimisation profile for the batch axis (H and W come from the bundle's input)."""

    min_batch: int = 1
    opt_batch: int = 1
    max_batch: int = 8

    def validate(self, fixed_batch: int | None) -> None:
        if fixed_batch is not None:
            if (self.min_batch, self.opt_batch, self.max_batch) != (fixed_batch,) * 3:
                self.min_batch = self.opt_batch = self.max_batch = fixed_batch
            return
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise CbamDeployError(
                f"batch profile must satisfy 1 <= min <= opt <= max, got {self.min_batch}/{self.opt_batch}/{self.max_batch}"
            )

    def shapes(self, channels: int, height: int, width: int) -> tuple[tuple, tuple, tuple]:
        return tuple((b, channels, height, width) for b in (self.min_batch, self.opt_batch, self.max_batch))


@dataclass
class BuildPlan:
    version: tuple[int, int]
    precision: str
    onnx_variant: str  # "fp32", "fp16" (converted ONNX) or "qdq" (the tensorrt INT8 artifact)
    explicit_batch_flag: bool
    strongly_typed: bool
    builder_flags: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def plan_build(version: tuple[int, int], precision: str, dla_core: int | None = None) -> BuildPlan:
    """Which network flags, builder flags and ONNX variant a version/precision pair needs."""
    if precision not in PRECISIONS:
        raise CbamDeployError(f"TensorRT precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if version < MIN_VERSION:
        raise CbamDeployError(f"TensorRT {version[0]}.{version[1]} is too old: cbam-deploy needs 8.5 or newer (JetPack 5.1+)")
    major = version[0]
    variant = {"fp32": "fp32", "fp16": "fp16" if major >= 11 else "fp32", "int8": "qdq"}[precision]
    flags: list[str] = []
    notes: list[str] = []
    if major < 11:
        if precision == "fp16":
            flags.append("FP16")
        elif precision == "int8":
            flags += ["INT8", "FP16"]  # Q/DQ layers run INT8; the rest may use FP16
            notes.append("explicit quantization from the Q/DQ ONNX; no calibrator")
    else:
        notes.append("TensorRT 11: strongly typed, precision comes from the ONNX (no FP16/INT8 builder flags)")
    if dla_core is not None:
        if precision == "fp32":
            raise CbamDeployError("DLA runs fp16 or int8 only: pass --precision fp16 or int8 with --dla-core")
        flags.append("GPU_FALLBACK")
        notes.append(f"DLA core {dla_core} with GPU fallback for unsupported layers")
    return BuildPlan(version, precision, variant, explicit_batch_flag=version < (10, 0), strongly_typed=major >= 11,
                     builder_flags=flags, notes=notes)


def engine_metadata(trt_version: str, gpu: dict, plan: BuildPlan, profile: Profile, input_shape: list) -> dict:
    return {
        "tensorrt": trt_version,
        "gpu": gpu,
        "precision": plan.precision,
        "onnx_variant": plan.onnx_variant,
        "builder_flags": plan.builder_flags,
        "strongly_typed": plan.strongly_typed,
        "profile": asdict(profile),
        "input_shape": input_shape,
    }


def check_engine_compatible(metadata: dict, trt_version: str, gpu: dict) -> None:
    """Refuse an engine built by another TensorRT version or for another GPU."""
    built = metadata.get("tensorrt")
    if built != trt_version:
        raise CbamDeployError(
            f"this engine was built with TensorRT {built}, but TensorRT {trt_version} is installed: engines do not "
            "move between versions; rebuild it with 'cbam-deploy export --format tensorrt' on this machine"
        )
    built_gpu = metadata.get("gpu", {})
    if built_gpu.get("compute_capability") != gpu.get("compute_capability") or built_gpu.get("name") != gpu.get("name"):
        raise CbamDeployError(
            f"this engine was built for {built_gpu.get('name')} (sm {built_gpu.get('compute_capability')}), but this "
            f"machine has {gpu.get('name')} (sm {gpu.get('compute_capability')}); rebuild the engine here"
        )


def current_gpu() -> dict:
    """Name and compute capability of CUDA device 0 (via torch, else cuda-python)."""
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return {"name": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}"}
    except Exception:
        pass
    try:
        from cuda.bindings import runtime as cudart

        err, props = cudart.cudaGetDeviceProperties(0)
        if int(err) == 0:
            name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
            return {"name": name.rstrip("\x00"), "compute_capability": f"{props.major}.{props.minor}"}
    except Exception:
        pass
    raise BackendUnavailable("no CUDA GPU found: TensorRT engines need an NVIDIA GPU (or a Jetson)")


def fp16_onnx(src: Path, dst: Path) -> None:
    """An FP16 copy of the ONNX with float32 inputs/outputs (for TensorRT 11's strong typing)."""
    try:
        import onnx
        from onnxconverter_common import float16
    except ImportError:
        raise CbamDeployError("fp16 on TensorRT 11 needs onnxconverter-common: pip install 'cbam-deploy[tensorrt]'") from None
    model = float16.convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    with atomic_path(dst) as tmp:
        onnx.save(model, str(tmp))


def build_engine(onnx_path: Path, engine_path: Path, precision: str, input_shape: list, profile: Profile,
                 workspace_mb: int = 2048, timing_cache: Path | None = None, dla_core: int | None = None) -> dict:
    """Build and serialise an engine (atomically) plus its metadata sidecar; returns the metadata."""
    trt = require_tensorrt()
    gpu = current_gpu()
    plan = plan_build(parse_version(trt.__version__), precision, dla_core)
    channels, height, width = input_shape[1], input_shape[2], input_shape[3]
    if not all(isinstance(v, int) for v in (channels, height, width)):
        raise CbamDeployError("TensorRT profiles here cover the batch axis only: export with a fixed input size")
    fixed_batch = input_shape[0] if isinstance(input_shape[0], int) else None
    profile.validate(fixed_batch)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if plan.explicit_batch_flag:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise CbamDeployError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    for flag in plan.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    if dla_core is not None:
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = dla_core
    trt_profile = builder.create_optimization_profile()
    trt_profile.set_shape(network.get_input(0).name, *profile.shapes(channels, height, width))
    config.add_optimization_profile(trt_profile)
    cache_bytes = timing_cache.read_bytes() if timing_cache and timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, False)
    started = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise CbamDeployError("TensorRT failed to build the engine (see the TensorRT log above)")
    write_bytes_atomic(engine_path, bytes(serialized))
    if timing_cache:
        timing_cache.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(timing_cache, bytes(config.get_timing_cache().serialize()))
    metadata = engine_metadata(trt.__version__, gpu, plan, profile, input_shape)
    metadata["build_seconds"] = round(time.perf_counter() - started, 1)
    metadata["notes"] = plan.notes
    write_bytes_atomic(sidecar(engine_path), (json.dumps(metadata, indent=2) + "\n").encode())
    return metadata


def default_timing_cache() -> Path:
    """The per-user TensorRT timing cache (beside the calibration cache; TensorRT itself rejects a cache
    from another GPU or version, and the file name keeps versions apart)."""
    from ..calib.recipes import default_cache_dir

    trt = require_tensorrt()
    return default_cache_dir().parent / "tensorrt" / f"timing-{trt.__version__}.cache"


def sidecar(engine_path: Path) -> Path:
    return Path(engine_path).with_suffix(Path(engine_path).suffix + ".json")
