"""PyTorch module -> ncnn ``.param`` + ``.bin`` through pnnx, then the rewrites and the INT8 writer
that work on ncnn's own files.

* ``convert``: ``pnnx.export`` (``torch.jit.trace`` and the pnnx binary) in a temporary folder; only
  ``model.ncnn.param`` / ``.bin`` leave it. pnnx ignores its binary's exit code and a partial
  conversion shows up as a SyntaxError importing the Python file it generated, or as a missing
  file: both are one error line here. Weights are kept in fp32 (``fp16=False``).
* ``rewrite_pools`` (rewrite ``ncnn-pools``, exact): pnnx maps every CBAM pool (``mean``/``amax``
  over H,W or over C) to ncnn's generic ``Reduction`` layer, which has no packed (SIMD) kernel. A
  reduction over H,W becomes a global ``Pooling`` (+ a ``Reshape`` back to C x 1 x 1 where it kept its
  dims); a reduction over C becomes ``Permute`` (C to the H axis), a ``Pooling`` with a (C, 1) kernel
  and ``Permute`` back. Found by the layer and its axes, never by a name: it works on any code.
  Weights are not touched (the .bin stays as it is).
* ``quantize_int8``: ncnn's own INT8 scheme, written as ``ncnn2int8`` writes it: for each quantized
  Convolution / ConvolutionDepthWise / InnerProduct, ``int8_scale_term`` (param 8), the weights as
  int8 (tag 0x000D4B38), then the per-output-channel weight scales and the input blob's scale after
  the bias. A layer left out of the table stays fp32: that is how the gate policy keeps gates float.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import struct
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ...bundle import Bundle
from ...errors import BackendUnavailable, CbamDeployError
from ...formats import Extra
from ...fsutil import atomic_path
from ...outputs import flatten_outputs

MAGIC = 7767517
INSTALL = "pip install 'cbam-deploy[ncnn]'"
# ncnn's Reduction operation codes (src/layer/reduction.h) this rewrite maps to a pooling type
_REDUCTION_POOL = {3: ("avg", 1), 4: ("max", 0)}  # 3 = mean, 4 = max; Pooling 0=pooling_type: 0 max, 1 avg
# layers that do no compute (graph plumbing), never counted as a generic fallback
_PLUMBING = {"Input", "MemoryData"}
# fp32 arrays each weight-holding layer reads from the .bin, in order: (param id or fixed size, tagged)
_NO_WEIGHTS = {"Input", "Split", "Pooling", "Permute", "Concat", "Reshape", "Flatten", "BinaryOp", "Sigmoid", "ReLU",
               "Eltwise", "Reduction", "Crop", "Slice", "UnaryOp", "Clip", "Softmax", "Padding", "Interp", "Dropout",
               "Noop", "Swish", "HardSigmoid", "HardSwish", "TanH", "ELU", "GELU", "Mish", "ShuffleChannel",
               "Squeeze", "ExpandDims", "Tile", "Pooling1D", "Pooling3D", "Sigmoid", "Exp", "Log", "Power"}


NCNN = Extra("ncnn", ("ncnn",), f"install the ncnn extra: {INSTALL}")
PNNX = Extra("pnnx", ("pnnx",), INSTALL)  # pnnx converts PyTorch to ncnn


def require_ncnn():
    """The ``ncnn`` module (the optional ncnn extra), or BackendUnavailable in one line."""
    return NCNN.require()


def require_pnnx():
    """The ``pnnx`` module with its converter binary, or BackendUnavailable in one line."""
    pnnx = PNNX.require()
    if not os.access(getattr(pnnx, "EXEC_PATH", ""), os.X_OK):
        raise BackendUnavailable(f"the pnnx converter binary is missing or not executable: {INSTALL}")
    return pnnx


def probe() -> str | None:
    """None when ncnn and pnnx can build here, else the one line why not (nothing imported)."""
    return NCNN.probe() or PNNX.probe()


# ------------------------------------------------------------------------------------- the .param

@dataclass
class Layer:
    type: str
    name: str
    inputs: list
    outputs: list
    params: dict = field(default_factory=dict)  # param id (str) -> raw text, in file order

    def get(self, key: int, default=None):
        value = self.params.get(str(key))
        return default if value is None else value

    def int(self, key: int, default: int = 0) -> int:
        value = self.get(key)
        return default if value is None else int(float(value))

    def line(self) -> str:
        parts = [f"{self.type:<24}", f"{self.name:<24}", str(len(self.inputs)), str(len(self.outputs)),
                 *self.inputs, *self.outputs, *(f"{k}={v}" for k, v in self.params.items())]
        return " ".join(parts)


@dataclass
class NcnnParam:
    layers: list

    @classmethod
    def parse(cls, text: str, where: str = ".param") -> NcnnParam:
        lines = [ln for ln in text.splitlines() if ln.strip()]
        try:
            if int(lines[0]) != MAGIC:
                raise ValueError
            count, _ = (int(v) for v in lines[1].split())
        except (ValueError, IndexError):
            raise CbamDeployError(f"{where} is not an ncnn .param file (no magic {MAGIC} and layer counts)") from None
        layers = []
        for number, line in enumerate(lines[2:], start=3):
            tokens = line.split()
            try:
                n_in, n_out = int(tokens[2]), int(tokens[3])
                inputs, outputs = tokens[4:4 + n_in], tokens[4 + n_in:4 + n_in + n_out]
                if len(outputs) != n_out:
                    raise ValueError
                params = {}
                for item in tokens[4 + n_in + n_out:]:
                    key, _, value = item.partition("=")
                    params[key] = value
            except (ValueError, IndexError):
                raise CbamDeployError(f"{where}: line {number} is not an ncnn layer line") from None
            layers.append(Layer(tokens[0], tokens[1], inputs, outputs, params))
        if len(layers) != count:
            raise CbamDeployError(f"{where}: {len(layers)} layers where its header says {count} (truncated?)")
        return cls(layers)

    @classmethod
    def read(cls, path: Path) -> NcnnParam:
        try:
            return cls.parse(Path(path).read_text(), str(path))
        except (OSError, UnicodeDecodeError) as exc:
            raise CbamDeployError(f"cannot read ncnn param file {path}: {exc}") from None

    def text(self) -> str:
        blobs = {b for layer in self.layers for b in (*layer.inputs, *layer.outputs)}
        return "\n".join([str(MAGIC), f"{len(self.layers)} {len(blobs)}", *(layer.line() for layer in self.layers)]) + "\n"

    def counts(self) -> dict[str, int]:
        return dict(Counter(layer.type for layer in self.layers))

    def producer(self) -> dict:
        return {b: layer for layer in self.layers for b in layer.outputs}

    def consumers(self) -> dict:
        found: dict = {}
        for layer in self.layers:
            for b in layer.inputs:
                found.setdefault(b, []).append(layer)
        return found

    def blob_names(self) -> tuple[list[str], list[str]]:
        """(input blobs, output blobs): the Input layers' blobs, and the blobs nothing consumes."""
        consumed = {b for layer in self.layers for b in layer.inputs}
        inputs = [b for layer in self.layers if layer.type == "Input" for b in layer.outputs]
        outputs = [b for layer in self.layers for b in layer.outputs if b not in consumed]
        return inputs, outputs


def generic_layers(param: NcnnParam) -> dict[str, int]:
    """Layers ncnn runs with its generic (reference) implementation only: no packed-layout kernel on
    this CPU (``support_packing`` False in the arch-optimised build), compute layers only."""
    ncnn = require_ncnn()
    generic: dict[str, int] = {}
    for kind, count in param.counts().items():
        if kind in _PLUMBING:
            continue
        layer = ncnn.create_layer(kind)
        if layer is None or not layer.support_packing:
            generic[kind] = count
    return generic


# ------------------------------------------------------------------------------------- conversion

def convert(module, example, param_path: Path, bin_path: Path, fp16_weights: bool = False) -> dict:
    """Trace ``module`` on ``example`` (a torch tensor, batch 1) with pnnx and write the ncnn pair
    (``.bin`` first, ``.param`` last, each atomically). Everything else pnnx writes stays in a
    temporary folder that is removed."""
    pnnx = require_pnnx()
    with tempfile.TemporaryDirectory(prefix="cbam-pnnx-") as tmp:
        pt = Path(tmp) / "model.pt"
        failure = None
        try:
            with _quiet(Path(tmp) / "pnnx.log"):  # the pnnx binary prints its passes on the process's stdout
                pnnx.export(module.eval(), str(pt), inputs=example, fp16=fp16_weights)
        except SyntaxError as exc:  # pnnx left ops it could not convert in the Python file it generated
            failure = f"an op pnnx could not convert ({(exc.text or '').strip()[:120]})"
        except Exception as exc:  # torch.jit.trace refusing the model, the binary failing
            failure = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        produced_param, produced_bin = Path(tmp) / "model.ncnn.param", Path(tmp) / "model.ncnn.bin"
        if failure is None and not (produced_param.is_file() and produced_bin.is_file()):
            failure = "pnnx wrote no model.ncnn.param/.bin"
        if failure is None:
            unconverted = sorted({layer.type for layer in NcnnParam.read(produced_param).layers
                                  if "::" in layer.type or layer.type.startswith("pnnx.")})
            if unconverted:
                failure = f"ops pnnx could not convert to ncnn layers: {', '.join(unconverted)}"
        if failure:
            raise CbamDeployError(f"pnnx could not convert the model to ncnn: {failure}")
        for src, dst in ((produced_bin, bin_path), (produced_param, param_path)):
            with atomic_path(Path(dst)) as target:
                shutil.copyfile(src, target)
    return {"converter": "pnnx", "pnnx": getattr(pnnx, "__version__", None) or _version("pnnx"),
            "ncnn": _version("ncnn"), "weights_precision": "fp16" if fp16_weights else "fp32",
            "traced_input_shape": list(example.shape)}


@contextlib.contextmanager
def _quiet(log: Path):
    """stdout and stderr (the file descriptors: a subprocess's output too) into ``log``."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log, "wb") as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                yield
        finally:
            sys.stdout.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def _version(dist: str) -> str | None:
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


# --------------------------------------------------------------------------- rewrite ncnn-pools

def _reduction_axes(layer: Layer) -> tuple[int, ...] | None:
    """The axes (of a C,H,W blob: 0 = C, 1 = H, 2 = W) a Reduction reduces; None when it reduces all
    or the form is not the new-axes one (5=1)."""
    if layer.int(1) != 0 or layer.int(5) != 1:
        return None
    raw = layer.get(-23303)
    if raw is None:
        return None
    values = [int(v) for v in raw.split(",")]
    return tuple(sorted(values[1:1 + values[0]]))


def rewrite_pools(param: NcnnParam, blob_shapes: dict[str, tuple[int, ...]]) -> tuple[NcnnParam, dict]:
    """Rewrite ``ncnn-pools``: every mean/max Reduction over (H, W) or over C of a 3-D blob into
    Pooling (+ Permute/Reshape). ``blob_shapes``: (c, h, w) of each Reduction's input blob at the
    traced size (the channel count sizes the (C, 1) kernel; C does not change with H, W). Returns the
    new param and the record: how many of each were rewritten, and every Reduction left, with why."""
    layers, hw, channel, left = [], 0, 0, []
    consumers = param.consumers()
    for layer in param.layers:
        if layer.type != "Reduction":
            layers.append(layer)
            continue
        op = layer.int(0)
        axes = _reduction_axes(layer)
        shape = blob_shapes.get(layer.inputs[0])
        keep = layer.int(4)
        if op not in _REDUCTION_POOL or axes is None or shape is None or len(shape) != 3:
            left.append({"layer": layer.name, "why": "not a mean/max over H,W or C of a C,H,W map"})
            layers.append(layer)
            continue
        pool_type = _REDUCTION_POOL[op][1]
        if axes == (1, 2):
            out = layer.outputs[0]
            needs_shape = keep and any(c.type not in ("Flatten", "InnerProduct") for c in consumers.get(out, []))
            pooled = f"{out}_gp" if needs_shape else out
            layers.append(Layer("Pooling", f"{layer.name}_gpool", list(layer.inputs), [pooled],
                                {"0": str(pool_type), "4": "1"}))
            if needs_shape:  # the global pool gives C; the graph expects C x 1 x 1
                layers.append(Layer("Reshape", f"{layer.name}_c11", [pooled], [out], {"0": "1", "1": "1", "2": "-1"}))
            hw += 1
        elif axes == (0,) and keep:
            c = shape[0]
            a, b, out = f"{layer.outputs[0]}_hcw", f"{layer.outputs[0]}_h1w", layer.outputs[0]
            layers.append(Layer("Permute", f"{layer.name}_p0", list(layer.inputs), [a], {"0": "2"}))
            params = {"0": str(pool_type), "1": "1", "11": str(c), "2": "1", "12": str(c), "3": "0", "13": "0", "5": "1"}
            if pool_type == 1:
                params["6"] = "1"
            layers.append(Layer("Pooling", f"{layer.name}_cpool", [a], [b], params))
            layers.append(Layer("Permute", f"{layer.name}_p1", [b], [out], {"0": "2"}))
            channel += 1
        else:
            left.append({"layer": layer.name, "why": f"reduces axes {axes} (keepdims={keep}): no pooling form"})
            layers.append(layer)
    record = {"name": "ncnn-pools", "exact": True, "stage": "ncnn-param",
              "description": "Reduction mean/max over H,W -> global Pooling; over C -> Permute + (C,1) Pooling + Permute",
              "hw_pools": hw, "channel_pools": channel, "reductions_left": left}
    return NcnnParam(layers), record


# ----------------------------------------------------------------------------------- the .bin walk

@dataclass
class WeightArray:
    layer: str
    role: str
    size: int
    tagged: bool
    offset: int  # where its data begins (after the tag)
    nbytes: int  # data bytes as stored (aligned)
    dtype: str   # "fp32", "fp16", "int8"


def _arrays(layer: Layer) -> list[tuple[str, int, bool]]:
    """(role, element count, tagged) of every array ``layer`` reads from the .bin, in order."""
    t = layer.type
    if t in _NO_WEIGHTS:
        return []
    if t in ("Convolution", "ConvolutionDepthWise", "Convolution1D", "Deconvolution", "DeconvolutionDepthWise",
             "InnerProduct"):
        if t != "InnerProduct" and layer.int(19):  # dynamic weight: read from a blob
            return []
        size_key, bias_key = (2, 1) if t == "InnerProduct" else (6, 5)
        arrays = [("weight", layer.int(size_key), True)]
        if layer.int(bias_key):
            arrays.append(("bias", layer.int(0), False))
        term = layer.int(8)
        if term and t in ("Convolution", "InnerProduct"):
            arrays += [("weight_scales", layer.int(0), False), ("bottom_scale", 1, False)]
            if term > 100:
                arrays.append(("top_scale", 1, False))
        elif term and t == "ConvolutionDepthWise":
            group = layer.int(7, 1)
            arrays += [("weight_scales", group if term in (1, 101) else 1, False), ("bottom_scale", 1, False)]
            if term > 100:
                arrays.append(("top_scale", 1, False))
        elif term:
            raise CbamDeployError(f"ncnn layer {layer.name} ({t}) has int8 scales this reader does not know")
        return arrays
    if t == "BatchNorm":
        return [(r, layer.int(0), False) for r in ("slope", "mean", "var", "bias")]
    if t == "Scale":
        size = layer.int(0)
        if size == -233:
            return []
        return [("scale", size, False)] + ([("bias", size, False)] if layer.int(1) else [])
    if t == "PReLU":
        return [("slope", layer.int(0), False)]
    if t == "MemoryData":
        dims = [max(1, layer.int(k)) for k in (0, 1, 11, 2)]
        return [("data", int(np.prod(dims)), False)]
    raise CbamDeployError(f"ncnn layer type {t} ({layer.name}): its weights' layout is not known to cbam-deploy")


def walk_bin(param: NcnnParam, data: bytes) -> list[WeightArray]:
    """Every weight array of ``data`` (a .bin) in the order ``param``'s layers read them; the file
    must be read exactly to its end."""
    pos, arrays = 0, []
    for layer in param.layers:
        for role, size, tagged in _arrays(layer):
            dtype, start = "fp32", pos
            if tagged:
                if pos + 4 > len(data):
                    raise CbamDeployError(f"ncnn .bin ends inside layer {layer.name} (truncated)")
                tag = struct.unpack_from("<I", data, pos)[0]
                start = pos + 4
                if tag == 0x01306B47:
                    dtype, nbytes = "fp16", (size * 2 + 3) // 4 * 4
                elif tag == 0x000D4B38:
                    dtype, nbytes = "int8", (size + 3) // 4 * 4
                elif tag in (0, 0x0002C056):
                    nbytes = size * 4
                else:
                    raise CbamDeployError(f"ncnn .bin: weights of layer {layer.name} are stored in a form "
                                          "(quantization table) cbam-deploy does not read")
            else:
                nbytes = size * 4
            if start + nbytes > len(data):
                raise CbamDeployError(f"ncnn .bin ends inside layer {layer.name} (truncated)")
            arrays.append(WeightArray(layer.name, role, size, tagged, start, nbytes, dtype))
            pos = start + nbytes
    if pos != len(data):
        raise CbamDeployError(f"ncnn .bin holds {len(data) - pos} bytes more than its .param reads")
    return arrays


def _read_array(data: bytes, array: WeightArray) -> np.ndarray:
    if array.dtype == "fp16":
        return np.frombuffer(data, np.float16, array.size, array.offset).astype(np.float32)
    if array.dtype == "int8":
        raise CbamDeployError(f"layer {array.layer} is already int8")
    return np.frombuffer(data, np.float32, array.size, array.offset)


QUANTIZABLE = ("Convolution", "ConvolutionDepthWise", "InnerProduct")


def quantize_int8(param: NcnnParam, data: bytes, table: dict[str, float]) -> tuple[NcnnParam, bytes, dict]:
    """ncnn2int8 in Python: the layers named in ``table`` (layer name -> input blob scale) get int8
    weights with per-output-channel scales (per group for a depthwise conv) and ``int8_scale_term``;
    every other layer is written back unchanged. Returns (param, .bin bytes, per-layer record)."""
    arrays = walk_bin(param, data)
    by_layer: dict[str, list[WeightArray]] = {}
    for array in arrays:
        by_layer.setdefault(array.layer, []).append(array)
    out = bytearray()
    layers, quantized = [], []
    for layer in param.layers:
        mine = by_layer.get(layer.name, [])
        if layer.name not in table:
            for array in mine:
                if array.tagged:
                    out += data[array.offset - 4:array.offset + array.nbytes]
                else:
                    out += data[array.offset:array.offset + array.nbytes]
            layers.append(layer)
            continue
        if layer.type not in QUANTIZABLE or layer.int(8):
            raise CbamDeployError(f"ncnn layer {layer.name} ({layer.type}) cannot be quantized to int8 here")
        weight = _read_array(data, mine[0])
        num_output = layer.int(0)
        rows = layer.int(7, 1) if layer.type == "ConvolutionDepthWise" else num_output
        w = weight.reshape(rows, -1)
        absmax = np.abs(w).max(axis=1)
        scales = np.where(absmax > 0, 127.0 / np.maximum(absmax, 1e-30), 1.0).astype(np.float32)
        q = np.clip(np.round(w * scales[:, None]), -127, 127).astype(np.int8).ravel()
        out += struct.pack("<I", 0x000D4B38) + q.tobytes() + b"\0" * ((-len(q)) % 4)
        for array in mine[1:]:  # the bias, as it was
            out += data[array.offset:array.offset + array.nbytes]
        out += scales.tobytes() + np.float32(table[layer.name]).tobytes()
        params = dict(layer.params)
        params["8"] = "1" if layer.type == "ConvolutionDepthWise" else "2"
        layers.append(Layer(layer.type, layer.name, layer.inputs, layer.outputs, params))
        quantized.append(layer.name)
    return NcnnParam(layers), bytes(out), {"quantized_layers": quantized}


def write_pair(param: NcnnParam, data: bytes, param_path: Path, bin_path: Path) -> None:
    """Write a .param/.bin pair, the .bin first, each atomically."""
    with atomic_path(Path(bin_path)) as target:
        Path(target).write_bytes(data)
    with atomic_path(Path(param_path)) as target:
        Path(target).write_text(param.text())


# ------------------------------------------------------------------------------------ running ncnn

PINNED = {"use_fp16_packed": False, "use_fp16_storage": False, "use_fp16_arithmetic": False,
          "use_bf16_storage": False}
_CPU_PROBES = ("cpu_support_x86_avx", "cpu_support_x86_avx2", "cpu_support_x86_avx512", "cpu_support_x86_avx512_vnni",
               "cpu_support_x86_avx512_bf16", "cpu_support_x86_f16c", "cpu_support_arm_neon", "cpu_support_arm_vfpv4",
               "cpu_support_arm_asimdhp", "cpu_support_arm_asimddp", "cpu_support_arm_bf16", "cpu_support_arm_i8mm")


def open_net(param_path: Path, bin_path: Path, threads: int | None = None, pinned: bool = True):
    """An ``ncnn.Net`` over a .param/.bin pair. ``pinned``: fp16/bf16 storage and arithmetic off,
    set BEFORE loading (ncnn picks them by itself where the CPU has them, and a model claimed fp32
    would run in fp16); INT8 layers run in int8 either way (``use_int8_inference``). A file ncnn
    cannot read is one error line (ncnn returns -1 and prints to stderr; it raises nothing)."""
    ncnn = require_ncnn()
    net = ncnn.Net()
    if pinned:
        for key, value in PINNED.items():
            setattr(net.opt, key, value)
    net.opt.num_threads = int(threads) if threads else ncnn.get_physical_big_cpu_count() or ncnn.get_cpu_count()
    for path in (param_path, bin_path):
        if not Path(path).is_file():
            raise CbamDeployError(f"ncnn file {path} is missing")
    # our own checks first: a truncated or foreign .param, a .bin of the wrong size (ncnn reads a
    # longer .bin silently, and a damaged one with a line on stderr only)
    param = NcnnParam.read(Path(param_path))
    try:
        walk_bin(param, Path(bin_path).read_bytes())
    except CbamDeployError as exc:
        raise CbamDeployError(f"ncnn .bin {bin_path} does not match its .param: {exc}") from None
    for label, path, load in (("param", param_path, net.load_param), ("bin", bin_path, net.load_model)):
        if load(str(path)) != 0:
            raise CbamDeployError(f"ncnn cannot load {path}: not a whole, matching ncnn .{label} file")
    return net


def net_options(net) -> dict:
    """What ncnn runs with: its options and what this CPU supports."""
    ncnn = require_ncnn()
    opt = {k: bool(getattr(net.opt, k)) for k in ("use_fp16_packed", "use_fp16_storage", "use_fp16_arithmetic",
                                                  "use_bf16_storage", "use_int8_inference", "use_packing_layout")}
    cpu = {p.replace("cpu_support_", ""): bool(getattr(ncnn, p)()) for p in _CPU_PROBES if hasattr(ncnn, p)}
    return {"options": opt, "num_threads": int(net.opt.num_threads), "cpu_support": cpu}


def run_blobs(net, chw: np.ndarray, input_blob: str, blobs: list[str]) -> dict[str, np.ndarray]:
    """Run one C,H,W image and read ``blobs`` (copied out of ncnn's memory)."""
    ncnn = require_ncnn()
    arr = np.ascontiguousarray(chw, dtype=np.float32)  # kept alive: ncnn.Mat wraps it without a copy
    ex = net.create_extractor()
    ex.set_light_mode(len(blobs) < 2)  # light mode frees blobs once consumed: a later extract of one fails
    mat = ncnn.Mat(arr)
    if ex.input(input_blob, mat) != 0:
        raise CbamDeployError(f"ncnn refused the input blob {input_blob}")
    found = {}
    for blob in blobs:
        rc, out = ex.extract(blob)
        if rc != 0:
            raise CbamDeployError(f"ncnn could not compute blob {blob} for a {'x'.join(map(str, arr.shape))} input")
        found[blob] = np.array(out, dtype=np.float32, copy=True)
    del mat
    return found


# --------------------------------------------------------------------------- the whole conversion

_SAFE_NAME = re.compile(r"[A-Za-z0-9_.\-]+$")
FP32_ATOL = 1e-4  # max |Δ| against PyTorch (relative to the output's scale) for the fp32 pair to count as exact


def _max_rel_error(reference: list, candidate: list) -> float:
    worst = 0.0
    for ref, got in zip(reference, candidate):
        ref = np.asarray(ref, dtype=np.float32)
        got = np.asarray(got, dtype=np.float32)
        if got.size != ref.size:  # a Reshape with the traced size baked in
            raise CbamDeployError(f"ncnn gives an output of {got.size} values where PyTorch gives {ref.size}")
        got = got.reshape(ref.shape)
        worst = max(worst, float(np.abs(ref - got).max() / max(1.0, float(np.abs(ref).max()))))
    return worst


def example_input(bundle: Bundle) -> tuple[np.ndarray, tuple[int, int] | None]:
    """(the 1 x C x H x W input pnnx traces with, a second H, W for the shape check, or None where the
    bundle's own input is fixed)."""
    shape = bundle.input.shape
    h = shape[2] if isinstance(shape[2], int) else bundle.input.side
    w = shape[3] if isinstance(shape[3], int) else bundle.input.side
    x = np.random.default_rng(0).standard_normal((1, bundle.input.channels, h, w)).astype(np.float32)
    return x, ((h + 32, w + 32) if bundle.input.dynamic_hw else None)


def ncnn_pair(module, example: np.ndarray, output_names: list[str], folder: Path, stem: str = "model",
              second_size: tuple[int, int] | None = None, rewrite: bool = True, fp16_weights: bool = False,
              check: bool = True) -> dict:
    """The ncnn pair for ``module`` in ``folder`` (``<stem>.param``, ``<stem>.bin``): converted by
    pnnx on ``example`` (1 x C x H x W), the ``ncnn-pools`` rewrite applied (``rewrite``), output blobs
    named ``out<i>_<name>``, checked against PyTorch at the traced size and, for the input-shape policy,
    at ``second_size`` (H, W): where ncnn is exact there too the model takes any H, W; otherwise its
    size is fixed in the Input layer (the runner then refuses other sizes). Returns the manifest's record."""
    folder = Path(folder)
    param_path, bin_path = folder / f"{stem}.param", folder / f"{stem}.bin"
    model = _Flat(module.eval())
    x = torch.from_numpy(np.ascontiguousarray(example, dtype=np.float32))
    info = convert(model, x, param_path, bin_path, fp16_weights)
    param = NcnnParam.read(param_path)
    info["pnnx_layers"] = param.counts()
    inputs, outputs = param.blob_names()
    if len(inputs) != 1:
        raise CbamDeployError(f"the ncnn conversion has {len(inputs)} inputs; cbam-deploy converts one-image models")
    names = {}
    for blob in outputs:
        match = re.match(r"out(\d+)$", blob)
        if match and int(match.group(1)) < len(output_names) and _SAFE_NAME.match(output_names[int(match.group(1))]):
            names[blob] = f"{blob}_{output_names[int(match.group(1))]}"
    for layer in param.layers:
        layer.inputs = [names.get(b, b) for b in layer.inputs]
        layer.outputs = [names.get(b, b) for b in layer.outputs]
    record = None
    if rewrite:
        net = open_net(param_path, bin_path, 1)
        reductions = [layer.inputs[0] for layer in param.layers if layer.type == "Reduction"]
        renamed = {v: k for k, v in names.items()}
        shapes = {b: v.shape for b, v in run_blobs(net, example[0], inputs[0],
                                                   [renamed.get(b, b) for b in reductions]).items()}
        shapes = {names.get(b, b): s for b, s in shapes.items()}
        param, record = rewrite_pools(param, shapes)
    with atomic_path(param_path) as target:
        Path(target).write_text(param.text())
    info["layers"] = param.counts()
    info["generic_layers"] = generic_layers(param)
    if record is not None:
        info["rewrite"] = record
    if not check:
        return info

    def compare(h: int, w: int, seed: int) -> float:
        sample = np.random.default_rng(seed).standard_normal((1, example.shape[1], h, w)).astype(np.float32)
        with torch.inference_mode():
            reference = [t.float().numpy()[0] for _, t in flatten_outputs(module(torch.from_numpy(sample)))]
        net = open_net(param_path, bin_path, 1)
        _, outs = param.blob_names()
        ordered = sorted(outs, key=lambda b: int(re.match(r"out(\d+)", b).group(1)) if re.match(r"out(\d+)", b) else 1 << 30)
        got = run_blobs(net, sample[0], inputs[0], ordered[:len(reference)])
        return _max_rel_error(reference, [got[b] for b in ordered[:len(reference)]])

    h, w = example.shape[2], example.shape[3]
    error = compare(h, w, 0)
    info["parity_at_build"] = {"input": [1, example.shape[1], h, w], "max_rel_error": error}
    if error > FP32_ATOL:
        raise CbamDeployError(f"the ncnn conversion does not match PyTorch (max |Δ| {error:.3g} of the output scale "
                              f"at {h}x{w}); not written")
    policy = {"batch": "any (the runner loops over the batch: ncnn has no batch axis)"}
    second_error, why = None, None
    if second_size is not None:
        try:
            second_error = compare(*second_size, 1)
        except CbamDeployError as exc:
            why = str(exc)
        else:
            if second_error > FP32_ATOL:
                why = f"max |Δ| {second_error:.3g} against PyTorch at {second_size[0]}x{second_size[1]}"
    if second_size is None or why:
        input_layer = next(layer for layer in param.layers if layer.type == "Input")
        input_layer.params.update({"0": str(w), "1": str(h), "2": str(example.shape[1])})
        with atomic_path(param_path) as target:
            Path(target).write_text(param.text())
        policy["hw"] = f"fixed {h}x{w}" + (f" (at another size: {why})" if why else " (the bundle's input is fixed)")
    else:
        policy["hw"] = f"any H, W (checked exact at {h}x{w} and {second_size[0]}x{second_size[1]})"
        policy["checked_at"] = [[h, w], list(second_size)]
    info["input_shape_policy"] = policy
    return info


class _Flat(nn.Module):
    """The model with its outputs as one flat tuple (pnnx traces tensors and tuples only)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return tuple(t for _, t in flatten_outputs(self.inner(x)))
