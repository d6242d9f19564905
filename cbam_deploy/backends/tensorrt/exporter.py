"""ONNX -> TensorRT engine, one code path for TensorRT 8.5/8.6, 10.x (x86, JetPack 6/7) and 11.

What differs by version is decided by ``plan_build`` (a pure function, tested without TensorRT):

* network creation: 8.x needs the EXPLICIT_BATCH flag; 10.x creates explicit-batch networks by
  default; 11 is always strongly typed;
* precision: 8.x/10.x set BuilderFlag.FP16 for fp16 and BuilderFlag.INT8 (+FP16) for an INT8 engine
  built from the bundle's ``tensorrt`` Q/DQ ONNX (explicit quantization; implicit calibration was
  deprecated in 10.1 and is gone in 11). TensorRT 11 has no precision flags: fp16 is built from an
  FP16 ONNX (made here with onnxconverter-common, I/O kept float32), int8 from the Q/DQ ONNX.
  BuilderFlag.TF32 is on by default in every version (NvInfer.h: "Enabled by default"); an fp32
  engine clears it, or on Ampere and newer (every Orin) it computes convolutions with 10-bit
  mantissas and is not fp32.
* the Q/DQ form: TensorRT 10 and 11 take int8 weight initializers behind DequantizeLinear (an INT8
  IConstantLayer's output type is its weights' type). On 8.x an IConstantLayer of non-INT32 weights
  outputs "real values", and a DequantizeLinear on int8 weights fails to parse ("only activation
  types allowed as input to this layer", onnxruntime#14229, TensorRT#3360): for 8.x the weights are
  put back in float behind a QuantizeLinear -> DequantizeLinear pair, each pair dedicated to one
  consumer (what Optimum's TensorRT preset asks of onnxruntime with AddQDQPairToWeight and
  DedicatedQDQPair). ``qdq_form_for_tensorrt`` does that rewrite; it changes no value.
* DLA (Jetson): fp16/int8 only, a static profile (DLA has no dynamic dimensions), the core checked
  against ``builder.num_DLA_cores`` (0 where the installed TensorRT has no DLA), GPU fallback on,
  and the layers that cannot run on DLA recorded in the engine's metadata.
* workspace: ``set_memory_pool_limit(MemoryPoolType.WORKSPACE, ...)`` on every supported version.

An engine is only valid for the TensorRT version and GPU that built it, so every engine gets a
sidecar ``<engine>.json`` (TensorRT version, GPU name, compute capability, profile, precision);
``check_engine_compatible`` refuses a mismatch with a message that says to rebuild. The timing
cache is per TensorRT version and GPU and lives outside the bundle (bundles move between
machines; the cache would not).

Callers that run an engine ask its row for its batch bounds (``cbam_deploy.batching``); the
runner itself splits and pads batches to stay inside the profile (``profile_chunks``).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from ...devices import cuda_devices, image_stack
from ...errors import BackendUnavailable, CbamDeployError
from ...formats import Extra
from ...fsutil import atomic_path, cache_root, write_bytes_atomic
from ...manifest import fixed_batch

PRECISIONS = ("fp32", "fp16", "int8")
MIN_VERSION = (8, 5)
QDQ_INT8_WEIGHTS = "int8-weights"  # DequantizeLinear on int8 initializers (TensorRT 10, 11)
QDQ_FLOAT_WEIGHT_PAIRS = "float-weights-qdq-pairs"  # float weights -> Q -> DQ, dedicated pairs (TensorRT 8.x)


TENSORRT = Extra("TensorRT", ("tensorrt",), "on x86 with an NVIDIA GPU use the 'cuda' Docker image (or pip install "
                 "'cbam-deploy[tensorrt]' matching your CUDA); on Jetson it comes with JetPack 6 (python3-libnvinfer)")
NO_GPU = "no CUDA GPU found: TensorRT engines need an NVIDIA GPU (or a Jetson)"


def probe() -> str | None:
    """None when TensorRT and a GPU for it are here, else the one line why not (nothing imported)."""
    missing = TENSORRT.probe()
    if missing:
        return missing
    return NO_GPU if cuda_devices() == 0 else None


def require_tensorrt():
    """The ``tensorrt`` module (the optional tensorrt extra; JetPack brings its own), or
    BackendUnavailable in one line."""
    return TENSORRT.require()


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

    @property
    def is_static(self) -> bool:
        return self.min_batch == self.opt_batch == self.max_batch


def dla_profile(profile: Profile) -> Profile:
    """DLA has no dynamic dimensions: one batch size, the profile's opt (a layer with a dynamic shape
    would silently fall back to the GPU)."""
    return Profile(profile.opt_batch, profile.opt_batch, profile.opt_batch)


@dataclass
class BuildPlan:
    version: tuple[int, int]
    precision: str
    onnx_variant: str  # "fp32", "fp16" (converted ONNX) or "qdq" (the tensorrt INT8 artifact)
    explicit_batch_flag: bool
    strongly_typed: bool
    builder_flags: list[str] = field(default_factory=list)
    cleared_flags: list[str] = field(default_factory=list)
    qdq_form: str | None = None  # for int8: QDQ_INT8_WEIGHTS or QDQ_FLOAT_WEIGHT_PAIRS
    dla_core: int | None = None
    notes: list[str] = field(default_factory=list)


def plan_build(version: tuple[int, int], precision: str, dla_core: int | None = None) -> BuildPlan:
    """Which network flags, builder flags, ONNX variant and Q/DQ form a version/precision pair needs."""
    if precision not in PRECISIONS:
        raise CbamDeployError(f"TensorRT precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if version < MIN_VERSION:
        raise CbamDeployError(f"TensorRT {version[0]}.{version[1]} is too old: cbam-deploy needs 8.5 or newer")
    major = version[0]
    variant = {"fp32": "fp32", "fp16": "fp16" if major >= 11 else "fp32", "int8": "qdq"}[precision]
    flags: list[str] = []
    cleared: list[str] = []
    notes: list[str] = []
    qdq_form = None
    if precision == "fp32":
        cleared.append("TF32")  # on by default; an fp32 engine must compute in fp32
        notes.append("TF32 cleared: fp32 means fp32 on Ampere and newer")
    if major < 11:
        if precision == "fp16":
            flags.append("FP16")
        elif precision == "int8":
            flags += ["INT8", "FP16"]  # Q/DQ layers run INT8; the rest may use FP16
            notes.append("explicit quantization from the Q/DQ ONNX; no calibrator")
    else:
        notes.append("TensorRT 11: strongly typed, precision comes from the ONNX (no FP16/INT8 builder flags)")
    if precision == "int8":
        qdq_form = qdq_form_for_version(version)
        if qdq_form == QDQ_FLOAT_WEIGHT_PAIRS:
            notes.append("TensorRT 8.x: weights as float behind dedicated QuantizeLinear/DequantizeLinear pairs")
    if dla_core is not None:
        if precision == "fp32":
            raise CbamDeployError("DLA runs fp16 or int8 only: pass --precision fp16 or int8 with --dla-core")
        if dla_core < 0:
            raise CbamDeployError(f"--dla-core must be >= 0, got {dla_core}")
        flags.append("GPU_FALLBACK")
        notes.append(f"DLA core {dla_core}, static batch profile, GPU fallback for layers DLA cannot run")
    return BuildPlan(version, precision, variant, explicit_batch_flag=version < (10, 0), strongly_typed=major >= 11,
                     builder_flags=flags, cleared_flags=cleared, qdq_form=qdq_form, dla_core=dla_core, notes=notes)


def qdq_form_for_version(version: tuple[int, int]) -> str:
    """The Q/DQ weight form a TensorRT version parses (see the module docstring for the evidence)."""
    return QDQ_FLOAT_WEIGHT_PAIRS if version[0] < 10 else QDQ_INT8_WEIGHTS


# ---------------------------------------------------------------------------------------------- Q/DQ

def qdq_form_for_tensorrt(model, form: str):
    """The Q/DQ ONNX in the form ``form`` (an ``onnx.ModelProto``, changed in place and returned).
    QDQ_INT8_WEIGHTS leaves it as onnxruntime wrote it. QDQ_FLOAT_WEIGHT_PAIRS turns every
    DequantizeLinear on an int8/uint8 initializer into float weights -> QuantizeLinear ->
    DequantizeLinear (same scale and zero point, so the same values), folds a DequantizeLinear on an
    int32 initializer (a quantized bias) into a float initializer, and gives every Q/DQ pair a single
    consumer."""
    if form == QDQ_INT8_WEIGHTS:
        return model
    if form != QDQ_FLOAT_WEIGHT_PAIRS:
        raise CbamDeployError(f"unknown Q/DQ form {form!r}")
    _weights_as_float_qdq_pairs(model)
    _dedicated_qdq_pairs(model)
    return model


def _weights_as_float_qdq_pairs(model) -> None:
    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    names = set(inits) | {n.name for n in graph.node} | {o for n in graph.node for o in n.output}
    consumers_of = _consumers(graph)
    new_nodes = []
    for node in graph.node:
        source = node.input[0] if node.op_type == "DequantizeLinear" and node.input else None
        params = [name for name in node.input[1:] if name]
        if source not in inits or not all(name in inits for name in params):  # an activation, or computed scales
            new_nodes.append(node)
            continue
        quantized = numpy_helper.to_array(inits[source])
        scale = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        zero = (numpy_helper.to_array(inits[node.input[2]]) if len(node.input) > 2 and node.input[2]
                else np.zeros_like(scale, dtype=quantized.dtype))
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        shape = [1] * quantized.ndim
        if scale.ndim and scale.size > 1:
            shape[axis % quantized.ndim] = scale.size
        values = ((quantized.astype(np.float32) - zero.astype(np.float32).reshape(shape)) * scale.reshape(shape)).astype(np.float32)
        float_name = _unique(source + "_float", names)
        inits[float_name] = numpy_helper.from_array(values, float_name)
        graph.initializer.append(inits[float_name])
        if quantized.dtype == np.int32:  # a quantized bias: TensorRT has no int32 Q/DQ; keep it float
            for consumer in consumers_of.get(node.output[0], []):
                for i, name in enumerate(consumer.input):
                    if name == node.output[0]:
                        consumer.input[i] = float_name
            for output in graph.output:
                if output.name == node.output[0]:
                    output.name = float_name
            continue
        requant = _unique(source + "_requant", names)
        attrs = [a for a in node.attribute if a.name == "axis"]
        q = helper.make_node("QuantizeLinear", [float_name, *node.input[1:]], [requant],
                             name=_unique((node.name or source) + "_weight_q", names))
        q.attribute.extend(attrs)
        node.input[0] = requant
        new_nodes += [q, node]
    del graph.node[:]
    graph.node.extend(new_nodes)
    used = {name for n in graph.node for name in n.input} | {o.name for o in graph.output}
    kept = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def _dedicated_qdq_pairs(model) -> None:
    """Every QuantizeLinear feeds one DequantizeLinear and every such DequantizeLinear one consumer:
    a shared pair is cloned per consumer (same inputs, same values)."""
    graph = model.graph
    names = {n.name for n in graph.node} | {i.name for i in graph.initializer} | {o for n in graph.node for o in n.output}

    def clone(node, inputs, suffix):
        out = _unique(node.output[0] + suffix, names)
        copy = helper.make_node(node.op_type, inputs, [out], name=_unique((node.name or node.op_type) + suffix, names))
        copy.attribute.extend(node.attribute)
        return copy

    # 1. a QuantizeLinear read by several DequantizeLinear nodes: each DQ after the first gets its own Q
    consumers = _consumers(graph)
    producers = {out: node for node in graph.node for out in node.output}
    result = []
    for node in graph.node:
        q = producers.get(node.input[0]) if node.op_type == "DequantizeLinear" and node.input else None
        if q is not None and q.op_type == "QuantizeLinear":
            readers = consumers.get(q.output[0], [])
            if len(readers) > 1 and readers[0] is not node:
                own = clone(q, list(q.input), "_own")
                result.append(own)
                node.input[0] = own.output[0]
        result.append(node)
    del graph.node[:]
    graph.node.extend(result)

    # 2. a Q->DQ pair whose DQ output has several consumers: clone the pair for every consumer after the first
    consumers = _consumers(graph)
    producers = {out: node for node in graph.node for out in node.output}
    graph_outputs = {o.name for o in graph.output}
    result = []
    for node in graph.node:
        result.append(node)
        q = producers.get(node.input[0]) if node.op_type == "DequantizeLinear" and node.input else None
        if q is None or q.op_type != "QuantizeLinear":
            continue
        users = consumers.get(node.output[0], [])
        for consumer in (users if node.output[0] in graph_outputs else users[1:]):
            q_copy = clone(q, list(q.input), "_pair")
            dq_copy = clone(node, [q_copy.output[0], *node.input[1:]], "_pair")
            result += [q_copy, dq_copy]
            for i, name in enumerate(consumer.input):
                if name == node.output[0]:
                    consumer.input[i] = dq_copy.output[0]
    del graph.node[:]
    graph.node.extend(result)


def _consumers(graph) -> dict[str, list]:
    """tensor name -> the nodes that read it, each once, in graph order."""
    out: dict[str, list] = {}
    for node in graph.node:
        for name in dict.fromkeys(n for n in node.input if n):
            out.setdefault(name, []).append(node)
    return out


def _unique(base: str, taken: set) -> str:
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    taken.add(name)
    return name


# ------------------------------------------------------------------------------ profile enforcement

def engine_profile(artifact: dict) -> Profile:
    """The batch profile a TensorRT artifact was built with (from its manifest entry)."""
    profile = (artifact.get("export") or {}).get("profile")
    if not profile:
        raise CbamDeployError(f"artifact {artifact.get('name')} records no TensorRT profile; rebuild it with cbam-deploy")
    return Profile(int(profile["min_batch"]), int(profile["opt_batch"]), int(profile["max_batch"]))


def profile_chunks(total: int, min_batch: int, max_batch: int) -> list[tuple[int, int, int]]:
    """How a runner covers ``total`` samples with calls inside [min_batch, max_batch]: (start, stop,
    run_size) per call; run_size > stop - start means the call is padded (rows repeated, outputs cut)."""
    if total < 1:
        return []
    if not 1 <= min_batch <= max_batch:
        raise CbamDeployError(f"bad batch profile {min_batch}..{max_batch}")
    chunks = []
    for start in range(0, total, max_batch):
        stop = min(start + max_batch, total)
        chunks.append((start, stop, max(stop - start, min_batch)))
    return chunks


# ------------------------------------------------------------------------------ metadata and checks

def engine_metadata(trt_version: str, gpu: dict, plan: BuildPlan, profile: Profile, input_shape: list) -> dict:
    stack = image_stack()
    return {
        "tensorrt": trt_version,
        "gpu": gpu,
        "precision": plan.precision,
        "onnx_variant": plan.onnx_variant,
        "builder_flags": plan.builder_flags,
        "cleared_flags": plan.cleared_flags,
        "tf32": "TF32" not in plan.cleared_flags,
        "strongly_typed": plan.strongly_typed,
        "qdq_form": plan.qdq_form,
        "dla_core": plan.dla_core,
        "profile": asdict(profile),
        "input_shape": input_shape,
        # the Triton release whose tritonserver loads this plan, when built in a cbam-deploy image
        "triton_release": (stack or {}).get("triton_release"),
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


def check_dla(num_dla_cores: int, dla_core: int, trt_version: str) -> None:
    """Refuse a DLA build where the installed TensorRT sees no DLA, or that core does not exist."""
    if num_dla_cores <= 0:
        raise CbamDeployError(f"--dla-core {dla_core}: TensorRT {trt_version} sees no DLA on this machine (x86 GPUs "
                              "have none; on Jetson the installed TensorRT must support DLA); build without --dla-core")
    if not 0 <= dla_core < num_dla_cores:
        raise CbamDeployError(f"--dla-core {dla_core}: this machine has DLA cores 0..{num_dla_cores - 1}")


def current_gpu() -> dict:
    """Name and compute capability of CUDA device 0 (via torch, else cuda-python)."""
    try:
        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return {"name": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}"}
    except Exception:
        pass
    try:
        from cuda.bindings import runtime as cudart  # lazy: cuda-python is optional (a machine with TensorRT but no torch CUDA)

        err, props = cudart.cudaGetDeviceProperties(0)
        if int(err) == 0:
            name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
            return {"name": name.rstrip("\x00"), "compute_capability": f"{props.major}.{props.minor}"}
    except Exception:
        pass
    raise BackendUnavailable("no CUDA GPU found: TensorRT engines need an NVIDIA GPU (or a Jetson)")


# ------------------------------------------------------------------------------------- timing cache

def timing_cache_name(trt_version: str, gpu: dict) -> str:
    """One timing cache per TensorRT version and GPU (TensorRT rejects a cache from another device;
    keeping them apart also keeps a shared cache folder usable by several machines)."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", str(gpu.get("name", "gpu"))).strip("-").lower() or "gpu"
    return f"timing-trt{trt_version}-{slug}-sm{gpu.get('compute_capability', 'x')}.cache"


def default_timing_cache(gpu: dict | None = None) -> Path:
    """The per-user TensorRT timing cache for this TensorRT version and GPU (beside the calibration
    cache, outside every bundle)."""
    trt = require_tensorrt()
    return cache_root() / "tensorrt" / timing_cache_name(trt.__version__, gpu or current_gpu())


def check_timing_cache_location(cache: Path, bundle_dir: Path | None) -> None:
    """A timing cache inside a bundle would travel with it to machines it does not fit: refuse."""
    if bundle_dir is None:
        return
    cache, bundle_dir = Path(cache).resolve(), Path(bundle_dir).resolve()
    if cache == bundle_dir or bundle_dir in cache.parents:
        raise CbamDeployError(f"--timing-cache {cache} is inside the bundle {bundle_dir}: bundles move between machines "
                              "and a timing cache belongs to one TensorRT version and GPU; put it elsewhere")


def _timing_cache(config, cache_path: Path | None, notes: list[str]):
    """Create the builder's timing cache from ``cache_path`` (when readable and accepted), checking
    every return value: a cache TensorRT rejects is replaced by an empty one, with a note."""
    blob = b""
    if cache_path and cache_path.is_file():
        try:
            blob = cache_path.read_bytes()
        except OSError as exc:
            notes.append(f"timing cache {cache_path} unreadable ({exc.strerror}); started empty")
    cache = config.create_timing_cache(blob)
    if cache is None and blob:
        notes.append(f"timing cache {cache_path} rejected by TensorRT; started empty")
        blob, cache = b"", config.create_timing_cache(b"")
    if cache is None:
        raise CbamDeployError("TensorRT could not create a timing cache")
    if not config.set_timing_cache(cache, False):
        if not blob:
            raise CbamDeployError("TensorRT refused an empty timing cache")
        notes.append(f"timing cache {cache_path} is for another GPU or TensorRT; started empty")
        cache = config.create_timing_cache(b"")
        if cache is None or not config.set_timing_cache(cache, False):
            raise CbamDeployError("TensorRT refused an empty timing cache")
    return cache


def _save_timing_cache(config, cache_path: Path, notes: list[str]) -> None:
    cache = config.get_timing_cache()
    if cache is None:
        notes.append("TensorRT returned no timing cache; nothing saved")
        return
    data = cache.serialize()
    if data is None:
        notes.append("TensorRT could not serialise the timing cache; nothing saved")
        return
    try:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(cache_path, bytes(data))
    except OSError as exc:
        notes.append(f"timing cache not saved to {cache_path}: {exc.strerror or exc}")


# -------------------------------------------------------------------------------------------- build

def fp16_onnx(src: Path, dst: Path) -> None:
    """An FP16 copy of the ONNX with float32 inputs/outputs (for TensorRT 11's strong typing)."""
    try:
        from onnxconverter_common import float16  # lazy: the optional tensorrt extra
    except ImportError:
        raise CbamDeployError("fp16 on TensorRT 11 needs onnxconverter-common: pip install 'cbam-deploy[tensorrt]'") from None
    model = float16.convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    with atomic_path(dst) as tmp:
        onnx.save(model, str(tmp))


def _onnx_bytes(onnx_path: Path, plan: BuildPlan) -> bytes:
    if plan.qdq_form in (None, QDQ_INT8_WEIGHTS):
        return Path(onnx_path).read_bytes()
    model = qdq_form_for_tensorrt(onnx.load(str(onnx_path)), plan.qdq_form)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def build_engine(onnx_path: Path, engine_path: Path, precision: str, input_shape: list, profile: Profile,
                 workspace_mb: int = 2048, timing_cache: Path | None = None, dla_core: int | None = None,
                 bundle_dir: Path | None = None) -> dict:
    """Build and serialise an engine (atomically) plus its metadata sidecar; returns the metadata."""
    trt = require_tensorrt()
    gpu = current_gpu()
    plan = plan_build(parse_version(trt.__version__), precision, dla_core)
    channels, height, width = input_shape[1], input_shape[2], input_shape[3]
    if not all(isinstance(v, int) for v in (channels, height, width)):
        raise CbamDeployError("TensorRT profiles here cover the batch axis only: export with a fixed input size")
    profile.validate(fixed_batch(input_shape))
    if timing_cache is not None:
        check_timing_cache_location(timing_cache, bundle_dir)
    notes = list(plan.notes)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    if dla_core is not None:
        check_dla(builder.num_DLA_cores, dla_core, trt.__version__)
        profile = dla_profile(profile)
    flags = 0
    if plan.explicit_batch_flag:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(_onnx_bytes(onnx_path, plan)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise CbamDeployError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    for flag in plan.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    for flag in plan.cleared_flags:
        config.clear_flag(getattr(trt.BuilderFlag, flag))
    gpu_layers: list[str] = []
    if dla_core is not None:
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = dla_core
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            if not config.can_run_on_DLA(layer):
                gpu_layers.append(layer.name)
        notes.append(f"{len(gpu_layers)} of {network.num_layers} layers cannot run on DLA and fall back to the GPU")
    trt_profile = builder.create_optimization_profile()
    trt_profile.set_shape(network.get_input(0).name, *profile.shapes(channels, height, width))
    if config.add_optimization_profile(trt_profile) < 0:
        raise CbamDeployError(f"TensorRT refused the batch profile {profile.min_batch}/{profile.opt_batch}/{profile.max_batch}")
    cache = _timing_cache(config, timing_cache, notes) if timing_cache else None
    started = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise CbamDeployError("TensorRT failed to build the engine (see the TensorRT log above)")
    write_bytes_atomic(engine_path, bytes(serialized))
    if cache is not None:
        _save_timing_cache(config, timing_cache, notes)
    metadata = engine_metadata(trt.__version__, gpu, plan, profile, input_shape)
    metadata["build_seconds"] = round(time.perf_counter() - started, 1)
    metadata["timing_cache"] = str(timing_cache) if timing_cache else None
    if dla_core is not None:
        metadata["dla_gpu_fallback_layers"] = gpu_layers
    metadata["notes"] = notes
    write_bytes_atomic(sidecar(engine_path), (json.dumps(metadata, indent=2) + "\n").encode())
    return metadata


def sidecar(engine_path: Path) -> Path:
    return Path(engine_path).with_suffix(Path(engine_path).suffix + ".json")
