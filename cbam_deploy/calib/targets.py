"""The INT8 targets table, data only: for each quantization target (recipe) the artifact format it
writes, its default calibration method and its default gate policy.

* ``ort-cpu``   Q/DQ ONNX for onnxruntime (U8S8), written as an ``onnx`` artifact.
* ``tensorrt``  Q/DQ ONNX in the explicit-quantization form TensorRT parses, written as an ``onnx``
               artifact (the engine is built from it).
* ``openvino``  NNCF post-training quantization: an ``openvino`` INT8 IR.
* ``ncnn``      ncnn's own scheme (as ncnn2table + ncnn2int8 write it): per-output-channel weight
               scales and one scale per layer input, for Convolution / InnerProduct: an ``ncnn`` pair.
* ``executorch`` PT2E with ExecuTorch's XNNPACK quantizer, from the PyTorch model: an ``executorch``
               INT8 .pte (``backends.executorch.recipe``).

Which recipe feeds which format is the formats table's ``quantize_recipe``; what a recipe writes is
``WRITES`` here. The recipes themselves are ``calib.recipes``.
"""

from __future__ import annotations

from ..errors import CbamDeployError

TARGETS = ("ort-cpu", "tensorrt", "openvino", "ncnn", "executorch")
METHODS = ("minmax", "entropy", "percentile")
GATES = ("int8", "fp")
WRITES = {"ort-cpu": "onnx", "tensorrt": "onnx", "openvino": "openvino", "ncnn": "ncnn", "executorch": "executorch"}  # INT8 recipe -> the format it writes
# Chosen by measurement on the reference digits model (docs/int8.md): every method keeps
# top-1 within 1 point there; minmax is the cheapest and as good as the others on these models.
DEFAULT_METHOD = {"ort-cpu": "minmax", "tensorrt": "minmax", "openvino": "minmax", "ncnn": "minmax", "executorch": "minmax"}
# Keep the attention gates in float by default: on the reference model both policies give the same
# accuracy and latencies within noise of each other (docs/int8.md), and float gates avoid the
# known INT8 failure of sigmoid gating (TensorRT#1114, NNCF's SE ignore patterns).
DEFAULT_GATES = {"ort-cpu": "fp", "tensorrt": "fp", "openvino": "fp", "ncnn": "fp", "executorch": "fp"}


def resolve(target: str, method: str | None, gates: str | None) -> tuple[str, str]:
    """(method, gates) for ``target``, the defaults filled in; one error naming what is unknown."""
    if target not in TARGETS:
        raise CbamDeployError(f"unknown target {target!r}; choose from {', '.join(TARGETS)}")
    method = method or DEFAULT_METHOD[target]
    if method not in METHODS:
        raise CbamDeployError(f"unknown calibration method {method!r}; choose from {', '.join(METHODS)}")
    if target == "openvino" and method == "entropy":
        raise CbamDeployError("NNCF (target openvino) offers no entropy calibration; use minmax or percentile")
    if target == "ncnn" and method == "entropy":
        raise CbamDeployError("target ncnn calibrates with minmax or percentile here (no KL/entropy); use one of those")
    if target == "executorch" and method != "minmax":
        raise CbamDeployError(f"the executorch recipe (PT2E) calibrates with minmax observers only, not {method}")
    gates = gates or DEFAULT_GATES[target]
    if gates not in GATES:
        raise CbamDeployError(f"--gates must be int8 or fp, got {gates!r}")
    return method, gates
