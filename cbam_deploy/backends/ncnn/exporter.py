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
import math
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
from ...checks import shorten
from ...errors import BackendUnavailable, CbamDeployError
from ...formats import Extra
from ...fsutil import FileTooLarge, UnsafePath, atomic_path, open_no_follow, read_no_follow
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
        if value is None:
            return default
        try:
            return int(float(value))
        except (ValueError, OverflowError):  # an expression, or pnnx's text, where a number is read
            raise CbamDeployError(f"ncnn layer {shorten(self.name)}: parameter {key} is {shorten(value)} where a number "
                                  "is read") from None

    def line(self) -> str:
        parts = [f"{self.type:<24}", f"{self.name:<24}", str(len(self.inputs)), str(len(self.outputs)),
                 *self.inputs, *self.outputs, *(f"{k}={v}" for k, v in self.params.items())]
        return " ".join(parts)


@dataclass
class NcnnParam:
    layers: list

    @classmethod
    def parse(cls, text: str, where: str = ".param", strict: bool = True) -> NcnnParam:
        """The layers of a .param's ``text``. ``strict`` (every .param read from a bundle): the file is
        checked before anything walks it or ncnn parses it (``check_layer_values``, ``check_graph``):
        at most ``MAX_LAYERS`` layers, each line whole, every value a finite number in ncnn's ranges,
        every blob made once and before it is used (so the graph has no cycle), the header's counts
        exact. ``strict=False`` is for pnnx's own output, which may hold ops it left unconverted."""
        lines = [ln for ln in text.splitlines() if ln.strip()]
        try:
            if int(lines[0]) != MAGIC:
                raise ValueError
            count, blob_count = (int(v) for v in lines[1].split())
        except (ValueError, IndexError):
            raise CbamDeployError(f"{where} is not an ncnn .param file (no magic {MAGIC} and layer counts)") from None
        if strict and not (1 <= count <= MAX_LAYERS and 1 <= blob_count <= MAX_BLOBS):
            raise CbamDeployError(f"{where}: its header declares {count} layers and {blob_count} blobs; cbam-deploy "
                                  f"reads at most {MAX_LAYERS} layers and {MAX_BLOBS} blobs")
        if strict and len(lines) - 2 > count:
            raise CbamDeployError(f"{where}: {len(lines) - 2} layer lines where its header says {count}")
        layers = []
        for number, line in enumerate(lines[2:], start=3):
            tokens = line.split()
            try:
                n_in, n_out = int(tokens[2]), int(tokens[3])
                if n_in < 0 or n_out < 0 or (strict and max(n_in, n_out) > MAX_LAYER_BLOBS):
                    raise ValueError
                inputs, outputs = tokens[4:4 + n_in], tokens[4 + n_in:4 + n_in + n_out]
                if len(outputs) != n_out:
                    raise ValueError
                params = {}
                for item in tokens[4 + n_in + n_out:]:
                    key, _, value = item.partition("=")
                    params[key] = value
            except (ValueError, IndexError):
                raise CbamDeployError(f"{where}: line {number} is not an ncnn layer line") from None
            layer = Layer(tokens[0], tokens[1], inputs, outputs, params)
            if strict:
                check_layer_values(layer, f"{where}: line {number}")
            layers.append(layer)
        if len(layers) != count:
            raise CbamDeployError(f"{where}: {len(layers)} layers where its header says {count} (truncated?)")
        if strict:
            check_graph(layers, blob_count, where)
        return cls(layers)

    @classmethod
    def read(cls, path: Path, strict: bool = True) -> NcnnParam:
        """The .param at ``path``: a regular file (never a link, a FIFO or a device), at most
        ``MAX_PARAM_BYTES``, parsed and checked (``parse``)."""
        try:
            text = read_no_follow(path, MAX_PARAM_BYTES).decode("utf-8")
        except (UnsafePath, FileTooLarge) as exc:
            raise CbamDeployError(f"cannot read ncnn param file {path}: {exc}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise CbamDeployError(f"cannot read ncnn param file {path}: {exc}") from None
        return cls.parse(text, str(path), strict)

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


# ---------------------------------------------------------------------- a .param checked before use

MAX_PARAM_BYTES = 16 << 20
# ncnn's loader looks every blob up by name, one by one: 100,000 layers take it many minutes, while
# the largest networks converted to ncnn have a few thousand
MAX_LAYERS = 10_000
MAX_BLOBS = 4 * MAX_LAYERS
MAX_LAYER_BLOBS = 1024     # inputs or outputs of one layer
MAX_TOKEN = 256            # characters of a layer type, a layer name or a blob name
MAX_ARRAY = 1 << 16        # values of one array parameter
MAX_BIN_BYTES = 8 << 30
_INT32 = (-(1 << 31), (1 << 31) - 1)
_FLOAT32_MAX = 3.4028234663852886e38
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?$")
_NCNN_MAX_PARAM_ID = 32    # ncnn's NCNN_MAX_PARAM_COUNT: ids 0..31; an array is id -23300 - i
_ARRAY_BASE = -23300


def _check_number(text: str, where: str) -> None:
    """One value as ncnn reads it: an int (``%d``: within int32) or, with a '.' or an exponent, a float
    (finite, within float32)."""
    if not _NUMBER.match(text):
        raise CbamDeployError(f"{where}: {shorten(text)} is not a number")
    if any(c in text for c in ".eE"):
        value = float(text)
        if not math.isfinite(value) or abs(value) > _FLOAT32_MAX:
            raise CbamDeployError(f"{where}: {shorten(text)} is outside the range of a float")
    elif not _INT32[0] <= int(text) <= _INT32[1]:
        raise CbamDeployError(f"{where}: {shorten(text)} is outside the range of a 32-bit integer")


def check_layer_values(layer: Layer, where: str) -> None:
    """A layer line's names and parameters as ncnn takes them, else one error naming the line: names
    of at most ``MAX_TOKEN`` characters, parameter ids 0..31 (arrays -23300..-23331), each value a
    finite number in range or a quoted shape expression (``check_expression``), an array
    ``n,v1,..,vn`` with exactly n values (at most ``MAX_ARRAY``)."""
    for token in (layer.type, layer.name, *layer.inputs, *layer.outputs):
        if len(token) > MAX_TOKEN:
            raise CbamDeployError(f"{where}: a name of {len(token)} characters (at most {MAX_TOKEN})")
    for key, value in layer.params.items():
        try:
            ident = int(key)
        except ValueError:
            raise CbamDeployError(f"{where}: parameter id {shorten(key)} is not a number") from None
        if 0 <= ident < _NCNN_MAX_PARAM_ID and value.startswith('"'):
            check_expression(value, len(layer.inputs), f"{where}: parameter {ident}")
        elif 0 <= ident < _NCNN_MAX_PARAM_ID:
            _check_number(value, f"{where}: parameter {ident}")
        elif _ARRAY_BASE - _NCNN_MAX_PARAM_ID < ident <= _ARRAY_BASE:
            items = value.split(",")
            _check_number(items[0], f"{where}: parameter {ident}")
            if any(c in items[0] for c in ".eE") or not 0 <= int(items[0]) <= MAX_ARRAY \
                    or int(items[0]) != len(items) - 1:
                raise CbamDeployError(f"{where}: array parameter {ident} does not hold the number of values its "
                                      f"count ({shorten(items[0])}) says (at most {MAX_ARRAY})")
            for item in items[1:]:
                _check_number(item, f"{where}: parameter {ident}")
        else:
            raise CbamDeployError(f"{where}: parameter id {ident} is outside ncnn's ids (0..31, arrays -23300..-23331)")


_INT32_RANGE = (_INT32[0], _INT32[1])
_EXPR_BLOB = re.compile(r"[0-9][whdcn]$")
_EXPR_BINARY = {"+", "-", "*", "//", "max", "min"}  # on two ints: int arithmetic (wrapping in int32)
_EXPR_UNARY = {"abs", "neg", "sign", "square"}
_EXPR_ROUND = {"trunc", "ceil", "floor", "round"}
_EXPR_FLOAT_UNARY = {"acos", "acosh", "asin", "asinh", "atan", "atanh", "cos", "cosh", "erf", "exp", "log", "log10",
                     "reciprocal", "rsqrt", "sin", "sinh", "sqrt", "tan", "tanh"}
_EXPR_FLOAT_BINARY = {"/", "atan2", "fmod", "pow", "remainder", "logaddexp"}
_EXPR_BITS = {"and", "or", "xor", "lshift", "rshift"}
MAX_EXPRESSION = 255  # characters of a quoted expression (ncnn reads strings of bounded length)


def check_expression(value: str, inputs: int, where: str) -> None:
    """A quoted shape expression (``6="1,1,//(16,0n),0n"``: a Reshape's shape, a Crop's starts) as
    ncnn evaluates it (``src/expression.cpp``: tokens read from the right onto a stack): every token
    an operator it knows, a literal number or a dimension of one of the layer's inputs, never an
    operator without its operands (ncnn pops an empty stack: a segfault) and never an integer
    division whose dividend can be the smallest int32 while its divisor can be -1 (a SIGFPE); the
    ranges are followed through the integer arithmetic, wrapping as int32 does."""
    text = value[1:-1] if len(value) >= 2 and value.endswith('"') else None
    if text is None or '"' in text or not text or len(text) > MAX_EXPRESSION:
        raise CbamDeployError(f"{where}: {shorten(value)} is not a quoted expression of at most {MAX_EXPRESSION} "
                              "characters")
    tokens = [t for t in re.split(r"[(),]", text) if t]
    full = ("i", *_INT32_RANGE)
    stack: list[tuple] = []

    def take(count: int, token: str) -> list[tuple]:
        if len(stack) < count:
            raise CbamDeployError(f"{where}: expression {shorten(text)}: {token!r} lacks its operands")
        return [stack.pop() for _ in range(count)]

    def wrapped(low: int, high: int) -> tuple:
        return ("i", low, high) if _INT32_RANGE[0] <= low <= high <= _INT32_RANGE[1] else full

    for token in reversed(tokens):
        if _EXPR_BLOB.match(token):
            if int(token[0]) >= inputs:
                raise CbamDeployError(f"{where}: expression {shorten(text)} reads input {token[0]} of a layer with "
                                      f"{inputs}")
            stack.append(("i", 0, _INT32_RANGE[1]))
        elif token in _EXPR_BINARY:
            a, b = take(2, token)
            if a[0] == "f" or b[0] == "f":
                stack.append(("f",))
            elif token == "//":
                if a[1] == _INT32_RANGE[0] and b[1] <= -1 <= b[2]:
                    raise CbamDeployError(f"{where}: expression {shorten(text)} can divide the smallest integer by -1")
                bound = max(abs(a[1]), abs(a[2]))
                stack.append(wrapped(-bound, bound))
            elif token in ("+", "-", "*"):
                corners = [x + y if token == "+" else x - y if token == "-" else x * y
                           for x in (a[1], a[2]) for y in ((b[1], b[2]) if token != "-" else (b[2], b[1]))]
                stack.append(wrapped(min(corners), max(corners)))
            else:
                pick = max if token == "max" else min
                stack.append(("i", pick(a[1], b[1]), pick(a[2], b[2])))
        elif token in _EXPR_UNARY:
            (a,) = take(1, token)
            if a[0] == "f":
                stack.append(a)
            elif token == "sign":
                stack.append(("i", -1, 1))
            else:
                low = 0 if a[1] <= 0 <= a[2] else min(abs(a[1]), abs(a[2]))
                high = max(abs(a[1]), abs(a[2]))
                stack.append(wrapped(-a[2], -a[1]) if token == "neg" else
                             wrapped(low, high) if token == "abs" else wrapped(low * low, high * high))
        elif token in _EXPR_ROUND:
            (a,) = take(1, token)
            stack.append(a if a[0] == "i" else full)  # a float made an int: any int
        elif token in _EXPR_FLOAT_UNARY:
            take(1, token)
            stack.append(("f",))
        elif token in _EXPR_FLOAT_BINARY:
            take(2, token)
            stack.append(("f",))
        elif token in _EXPR_BITS:
            take(2, token)
            stack.append(full)
        else:
            _check_number(token, f"{where}: expression {shorten(text)}")
            whole = re.match(r"[+-]?\d+", token)
            if whole and int(whole.group()) == float(token):
                stack.append(("i", int(whole.group()), int(whole.group())))
            else:
                stack.append(("f",))
    if not stack:
        raise CbamDeployError(f"{where}: expression {shorten(text)} gives no value")


def check_graph(layers: list, blob_count: int, where: str) -> None:
    """The graph as ncnn will walk it: every blob made by exactly one layer, every input made by an
    earlier layer (a blob used before it is made, or a cycle, could send ncnn's walk round for ever),
    and the header's blob count exact (ncnn sizes its blob table by it)."""
    made: set[str] = set()
    for layer in layers:
        for blob in layer.inputs:
            if blob not in made:
                raise CbamDeployError(f"{where}: layer {shorten(layer.name)} reads blob {shorten(blob)} before any "
                                      "layer makes it (a cycle, or a layer out of order)")
        for blob in layer.outputs:
            if blob in made:
                raise CbamDeployError(f"{where}: blob {shorten(blob)} is made twice (again by layer "
                                      f"{shorten(layer.name)})")
            made.add(blob)
    if len(made) != blob_count:
        raise CbamDeployError(f"{where}: {len(made)} blobs where its header says {blob_count}")


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
            unconverted = sorted({layer.type for layer in NcnnParam.read(produced_param, strict=False).layers
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
    try:
        values = [int(float(v)) for v in raw.split(",")]
    except (ValueError, OverflowError):
        return None
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
        return [("data", math.prod(dims), False)]
    raise CbamDeployError(f"ncnn layer type {t} ({layer.name}): its weights' layout is not known to cbam-deploy")


def walk_bin(param: NcnnParam, data: bytes) -> list[WeightArray]:
    """Every weight array of ``data`` (a .bin) in the order ``param``'s layers read them; the file
    must be read exactly to its end."""
    pos, arrays = 0, []
    for layer in param.layers:
        for role, size, tagged in _arrays(layer):
            if size < 0:
                raise CbamDeployError(f"ncnn layer {shorten(layer.name)} declares {size} values of {role}")
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


def open_net(param_path: Path, bin_path: Path, threads: int | None = None, pinned: bool = True,
             param: NcnnParam | None = None):
    """An ``ncnn.Net`` over a .param/.bin pair. ``pinned``: fp16/bf16 storage and arithmetic off,
    set BEFORE loading (ncnn picks them by itself where the CPU has them, and a model claimed fp32
    would run in fp16); INT8 layers run in int8 either way (``use_int8_inference``). A file ncnn
    cannot read is one error line (ncnn returns -1 and prints to stderr; it raises nothing).

    ncnn parses only what was checked: the .param is read and checked here (``NcnnParam.read``; or
    ``param``, already read so) and ncnn is handed its text; the .bin is opened once, never through
    a link, its size walked against the .param (``walk_bin``), and ncnn loads that same open file
    (``/proc/self/fd``) where the system has it."""
    ncnn = require_ncnn()
    net = ncnn.Net()
    if pinned:
        for key, value in PINNED.items():
            setattr(net.opt, key, value)
    net.opt.num_threads = int(threads) if threads else ncnn.get_physical_big_cpu_count() or ncnn.get_cpu_count()
    for path in (param_path, bin_path):
        if not os.path.lexists(path):
            raise CbamDeployError(f"ncnn file {path} is missing")
    # our own checks first: a truncated or foreign .param, a .bin of the wrong size (ncnn reads a
    # longer .bin silently, and a damaged one with a line on stderr only)
    param = param if param is not None else NcnnParam.read(Path(param_path))
    try:
        fd = open_no_follow(bin_path)
    except (UnsafePath, OSError) as exc:
        raise CbamDeployError(f"cannot read ncnn .bin {bin_path}: {exc}") from None
    try:
        with os.fdopen(os.dup(fd), "rb") as handle:
            data = handle.read(MAX_BIN_BYTES + 1)
        if len(data) > MAX_BIN_BYTES:
            raise CbamDeployError(f"ncnn .bin {bin_path} is larger than {MAX_BIN_BYTES >> 30} GiB")
        try:
            walk_bin(param, data)
        except CbamDeployError as exc:
            raise CbamDeployError(f"ncnn .bin {bin_path} does not match its .param: {exc}") from None
        del data
        if net.load_param_mem(param.text()) != 0:
            raise CbamDeployError(f"ncnn cannot load {param_path}: not a whole, matching ncnn .param file")
        opened = f"/proc/self/fd/{fd}"  # the file checked, whatever its name leads to now
        if net.load_model(opened if os.path.exists(opened) else str(bin_path)) != 0:
            raise CbamDeployError(f"ncnn cannot load {bin_path}: not a whole, matching ncnn .bin file")
    finally:
        os.close(fd)
    return net


def copy_out(mat, blob: str, shape: tuple) -> np.ndarray:
    """An ncnn output blob as a float32 array (copied out of ncnn's memory); one line when ncnn made
    a blob that is no array (a crafted .param can make it size one by negative or absurd dimensions)."""
    try:
        return np.array(mat, dtype=np.float32, copy=True)
    except (ValueError, MemoryError, OverflowError, RuntimeError) as exc:
        raise CbamDeployError(f"ncnn made blob {shorten(blob)} for a {'x'.join(map(str, shape))} input with no valid "
                              f"shape ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); the .param is "
                              "damaged") from None


def net_options(net) -> dict:
    """What ncnn runs with: its options and what this CPU supports."""
    ncnn = require_ncnn()
    opt = {k: bool(getattr(net.opt, k)) for k in ("use_fp16_packed", "use_fp16_storage", "use_fp16_arithmetic",
                                                  "use_bf16_storage", "use_int8_inference", "use_packing_layout")}
    cpu = {p.replace("cpu_support_", ""): bool(getattr(ncnn, p)()) for p in _CPU_PROBES if hasattr(ncnn, p)}
    return {"options": opt, "num_threads": int(net.opt.num_threads), "cpu_support": cpu}


def input_mat(arr: np.ndarray):
    """An input blob ncnn owns (a copy of ``arr``): an ``ncnn.Mat`` over numpy's memory has no
    reference count, and in light mode ncnn frees, then writes, an input that an in-place layer
    (ReLU, Sigmoid, Noop) takes first: a segfault, which a crafted .param can ask for."""
    return require_ncnn().Mat(arr).clone()


def run_blobs(net, chw: np.ndarray, input_blob: str, blobs: list[str]) -> dict[str, np.ndarray]:
    """Run one C,H,W image and read ``blobs`` (copied out of ncnn's memory)."""
    require_ncnn()
    arr = np.ascontiguousarray(chw, dtype=np.float32)
    ex = net.create_extractor()
    ex.set_light_mode(len(blobs) < 2)  # light mode frees blobs once consumed: a later extract of one fails
    mat = input_mat(arr)
    if ex.input(input_blob, mat) != 0:
        raise CbamDeployError(f"ncnn refused the input blob {input_blob}")
    found = {}
    for blob in blobs:
        rc, out = ex.extract(blob)
        if rc != 0:
            raise CbamDeployError(f"ncnn could not compute blob {blob} for a {'x'.join(map(str, arr.shape))} input")
        found[blob] = copy_out(out, blob, arr.shape)
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
