"""PyTorch -> ONNX, checked (onnx.checker full check, shape inference) and written atomically.

Exporter choice: the TorchScript exporter (``dynamo=False``) is the default because it writes
opset 17 natively, which both TensorRT 8.5 (parses opsets <= 17) and 10.x parse, and it
names nodes after their modules (``/layer1/layer1.0/cbam/ChannelGate/...``), which the INT8
gate policy uses. torch 2.13's dynamo exporter starts at opset 18; asked for 17 its version
converter fails on this graph and silently keeps 18, and it is ~12x slower. It is available
with ``exporter='dynamo'`` and opset >= 18.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnxslim
import torch
from torch import nn

from ...checks import MAX_BATCH, MAX_INPUT_SIZE, MIN_INPUT_SIZE, check_choice, is_int
from ...errors import CbamDeployError
from ...fsutil import atomic_path
from ...outputs import describe_outputs, dynamic_output_axes, flatten_outputs
from ...scopes import metadata_scopes

INPUT_NAME = "input"
DEFAULT_OPSET = 17
OPSET_RANGE = {"torchscript": (13, 20), "dynamo": (18, 20)}
EXPORTERS = tuple(OPSET_RANGE)


@dataclass
class OnnxExportOptions:
    input_size: int = 224
    in_channels: int = 3
    batch: int | None = None  # None: dynamic batch
    dynamic_hw: bool = False
    opset: int = DEFAULT_OPSET
    exporter: str = "torchscript"
    simplify: bool = True
    output_kinds: dict[str, str] | None = None  # {output name: kind} over the kind guessed from the shape

    def validate(self) -> None:
        check_opset(self.exporter, self.opset)
        if not is_int(self.input_size) or self.input_size < MIN_INPUT_SIZE:
            raise CbamDeployError(f"input size {self.input_size!r} is too small (at least {MIN_INPUT_SIZE})")
        if self.input_size > MAX_INPUT_SIZE:
            raise CbamDeployError(f"input size {self.input_size} is too large (at most {MAX_INPUT_SIZE})")
        if not is_int(self.in_channels) or self.in_channels < 1:
            raise CbamDeployError(f"in_channels must be a positive integer, got {self.in_channels!r}")
        if self.batch is not None and (not is_int(self.batch) or not 1 <= self.batch <= MAX_BATCH):
            raise CbamDeployError(f"batch must be 'dynamic' or an integer from 1 to {MAX_BATCH}, got {self.batch!r}")

    def symbolic_input_shape(self) -> list:
        hw = ["height", "width"] if self.dynamic_hw else [self.input_size, self.input_size]
        return ["batch" if self.batch is None else self.batch, self.in_channels, *hw]


def export_onnx(model: nn.Module, path: str | Path, options: OnnxExportOptions) -> dict:
    """Export ``model`` to ``path``; returns facts for the manifest. Nothing is left behind on failure."""
    options.validate()
    path = Path(path)
    model = model.eval()
    example = torch.randn(options.batch or 1, options.in_channels, options.input_size, options.input_size)
    started = time.perf_counter()
    with torch.no_grad():
        outputs = describe_outputs(flatten_outputs(model(example)), options.batch, options.dynamic_hw,
                                   options.output_kinds)
    with atomic_path(path) as tmp:
        _run_exporter(model, example, tmp, options, outputs)
        proto = onnx.load(str(tmp))
        _scope_node_names(proto)
        simplified = False
        if options.simplify:
            proto = _simplify(proto)
            simplified = True
        proto = _check(proto)
        onnx.save(proto, str(tmp))
    seconds = time.perf_counter() - started
    return {
        "exporter": f"torch.onnx ({options.exporter})",
        "opset": options.opset,
        "input_name": INPUT_NAME,
        "output_name": outputs[0]["name"],
        "outputs": outputs,
        "input_shape": options.symbolic_input_shape(),
        "simplified": simplified,
        "export_seconds": round(seconds, 3),
        "nodes": len(proto.graph.node),
    }


def _run_exporter(model: nn.Module, example: torch.Tensor, target: Path, options: OnnxExportOptions,
                  outputs: list[dict]) -> None:
    dynamic_axes: dict[int, str] = {}
    if options.batch is None:
        dynamic_axes[0] = "batch"
    if options.dynamic_hw:
        dynamic_axes.update({2: "height", 3: "width"})
    kwargs: dict = {}
    if options.exporter == "torchscript":
        if dynamic_axes:
            kwargs["dynamic_axes"] = {INPUT_NAME: dynamic_axes, **dynamic_output_axes(outputs)}
        kwargs["do_constant_folding"] = True
    else:
        dims = {}
        if options.batch is None:
            dims[0] = torch.export.Dim("batch", min=1, max=4096)
        if options.dynamic_hw:
            dims[2] = torch.export.Dim("height", min=8, max=8192)
            dims[3] = torch.export.Dim("width", min=8, max=8192)
        kwargs["dynamic_shapes"] = (dims,) if dims else None
        kwargs["external_data"] = False
    try:
        with warnings.catch_warnings(), torch.no_grad():
            # The TorchScript exporter is chosen on purpose (see the module docstring); its
            # deprecation notice would only confuse users.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (example,),
                str(target),
                input_names=[INPUT_NAME],
                output_names=[o["name"] for o in outputs],
                opset_version=options.opset,
                dynamo=options.exporter == "dynamo",
                **kwargs,
            )
    except Exception as exc:  # the exporters raise many types; the user needs the message
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CbamDeployError(f"ONNX export ({options.exporter}) failed: {type(exc).__name__}: {message}") from None
    if options.exporter == "dynamo":
        produced = onnx.load(str(target), load_external_data=False)
        got = next((o.version for o in produced.opset_import if o.domain in ("", "ai.onnx")), None)
        if got != options.opset:
            raise CbamDeployError(
                f"the dynamo exporter wrote opset {got}, not the requested {options.opset}; "
                "use --exporter torchscript for opsets below 18"
            )


def _scope_node_names(proto: onnx.ModelProto) -> None:
    """Give dynamo-exported nodes scoped names (``/layer1/layer1.0/.../node_mul``) from their
    name-scope metadata, as the TorchScript exporter does: simplification drops node metadata but
    keeps names, and the INT8 gate policy reads the module scope from them."""
    for node in proto.graph.node:
        scopes = metadata_scopes(node)
        if scopes is None or node.name.startswith("/"):
            continue
        modules = scopes[:-1]
        if modules:
            node.name = "/" + "/".join(modules) + "/" + node.name


def _simplify(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Constant folding and dead-node removal with onnxslim; dynamic dims are kept."""
    try:
        return onnxslim.slim(proto)
    except Exception as exc:
        raise CbamDeployError(f"onnxslim failed on the exported graph ({type(exc).__name__}: {exc}); retry with --no-simplify") from None


def _check(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Full checker pass plus strict shape inference; returns the model with inferred shapes."""
    try:
        onnx.checker.check_model(proto, full_check=True)
        return onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True, data_prop=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise CbamDeployError(f"the exported ONNX model is invalid: {str(exc).splitlines()[0]}") from None


def check_opset(exporter: str, opset) -> None:
    check_choice("--exporter", exporter, EXPORTERS)
    low, high = OPSET_RANGE[exporter]
    if not is_int(opset) or not low <= opset <= high:
        raise CbamDeployError(
            f"opset {opset} is out of range for the {exporter} exporter: choose {low}..{high} "
            f"(default {DEFAULT_OPSET}; TensorRT 8.5 on JetPack 5 parses at most 17)"
        )


def external_data_files(path) -> tuple[str, ...]:
    """The external-data files an ONNX file keeps its tensors in (a model over protobuf's 2 GB limit
    does), named relative to its folder; () for a self-contained file."""
    path = Path(path)
    if not path.is_file():
        return ()
    proto = onnx.load(str(path), load_external_data=False)
    found: dict[str, None] = {}
    graphs = [proto.graph]
    while graphs:
        graph = graphs.pop()
        tensors = list(graph.initializer) + [s.values for s in graph.sparse_initializer]
        for node in graph.node:
            for attribute in node.attribute:
                tensors += [attribute.t, *attribute.tensors]
                graphs += [attribute.g, *attribute.graphs]
        for tensor in tensors:
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                location = next((e.value for e in tensor.external_data if e.key == "location"), None)
                if location:
                    found[location] = None
    return tuple(found)
