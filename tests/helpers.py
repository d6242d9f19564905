"""Helpers the tests share: write a manifest whole, look up an artifact's file, read an ONNX file's
inputs and outputs, count the forms of a Q/DQ graph's weights."""

from __future__ import annotations

from pathlib import Path

import onnx

from cbam_deploy.bundle import Bundle
from cbam_deploy.manifest import MANIFEST_NAME
from cbam_deploy.transaction import update_manifest


def write_manifest(bundle_dir: str | Path, manifest: dict) -> Path:
    """Replace the manifest as a whole (one transaction). Commands merge their change instead, with
    ``transaction.BundleUpdate.commit``."""
    update_manifest(bundle_dir, lambda _current: manifest)
    return Path(bundle_dir) / MANIFEST_NAME


def artifact_path(bundle_dir: str | Path, manifest: Bundle | dict, name: str | None = None,
                  verify_hash: bool = True) -> tuple[dict, Path]:
    """Look up an artifact (the first one when no name is given) and check its file's sha256; returns
    its manifest record and its file (``Bundle.artifact`` and ``Bundle.path_of`` in one)."""
    bundle = Bundle(manifest.manifest if isinstance(manifest, Bundle) else manifest, bundle_dir)
    path = bundle.path_of(name, verify_hash)
    return bundle.artifact(name).raw, path


def onnx_io(path: str | Path) -> dict:
    """Input and output names and symbolic shapes of an ONNX file."""
    proto = onnx.load(str(path), load_external_data=False)

    def dims(value_info) -> list:
        return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]

    initializers = {i.name for i in proto.graph.initializer}
    return {
        "inputs": [{"name": v.name, "shape": dims(v)} for v in proto.graph.input if v.name not in initializers],
        "outputs": [{"name": v.name, "shape": dims(v)} for v in proto.graph.output],
    }


def qdq_weight_forms(model) -> dict[str, int]:
    """How a Q/DQ ONNX holds its quantized weights: counts of DequantizeLinear nodes whose input is an
    int8 initializer, is produced by a QuantizeLinear, or other; and of Q/DQ outputs with more than
    one consumer (``shared``)."""
    inits = {init.name for init in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    consumers: dict[str, list] = {}  # tensor name -> the nodes that read it, each once
    for node in model.graph.node:
        for name in dict.fromkeys(n for n in node.input if n):
            consumers.setdefault(name, []).append(node)
    counts = {"int8_initializer": 0, "after_quantize": 0, "other": 0, "shared": 0}
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(consumers.get(node.output[0], [])) > 1:
            counts["shared"] += 1
        if node.op_type != "DequantizeLinear":
            continue
        src = node.input[0]
        if src in inits:
            counts["int8_initializer"] += 1
        elif src in producers and producers[src].op_type == "QuantizeLinear":
            counts["after_quantize"] += 1
        else:
            counts["other"] += 1
    return counts
