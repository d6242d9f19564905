"""onnxruntime's own INT8 path, a peer of ``bench --peers``:

* ``peer-ort-quantize-static``  ``torch.onnx.export`` (TorchScript exporter, opset 17, dynamic batch),
                                then ``onnxruntime.quantization.quantize_static`` with its defaults.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import psutil
import torch

from ...runners.peer import PeerRunner, PeerSource, timed
from .runner import ONNXRUNTIME


class _CalibrationReader:
    """onnxruntime's ``CalibrationDataReader`` protocol over the calibration images, one image per batch."""

    def __init__(self, images: np.ndarray, input_name: str) -> None:
        self._images, self._name, self._index = images, input_name, 0

    def get_next(self):
        if self._index >= len(self._images):
            return None
        self._index += 1
        return {self._name: self._images[self._index - 1:self._index]}

    def rewind(self) -> None:
        self._index = 0


def _ort_quantize_static(src: PeerSource) -> PeerRunner:
    calib = src.calibration()
    ort = ONNXRUNTIME.require()
    from onnxruntime.quantization import quantize_static  # lazy: onnxruntime may be absent (the peer is then skipped)

    fp32, int8 = src.workdir / "peer-ort-fp32.onnx", src.workdir / "peer-ort-int8.onnx"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        _, export_seconds = timed(
            torch.onnx.export, src.module, (src.example_tensor(),), str(fp32), dynamo=False, opset_version=17,
            input_names=["input"], output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
        )
    _, quantize_seconds = timed(quantize_static, str(fp32), str(int8), _CalibrationReader(calib, "input"))
    options = ort.SessionOptions()
    if src.threads:
        options.intra_op_num_threads = src.threads
    # The one change from the defaults: onnxruntime's pool spins after each run and takes the CPU from
    # whichever runner the interleaved bench times next (measured: PyTorch after it ran 2x slower).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(int8), options, providers=["CPUExecutionProvider"])

    def run(batch: np.ndarray) -> np.ndarray:
        return session.run(None, {"input": batch})[0]

    settings = (f"intra_op_num_threads={src.threads}, " if src.threads else "default SessionOptions except ") + \
        "session.intra_op.allow_spinning=0 (so that its spinning pool does not slow the runner timed next)"
    return PeerRunner(
        run, "onnxruntime", "int8",
        f"torch.onnx.export(model, {src.example_text()}, dynamo=False, opset_version=17, dynamic batch axis); "
        f"onnxruntime.quantization.quantize_static(fp32.onnx, int8.onnx, reader over {len(calib)} calibration "
        "images, batch 1) with defaults (QuantFormat.QDQ, QInt8 activations and weights, per_channel=False, "
        "reduce_range=False, CalibrationMethod.MinMax, no quant_pre_process); "
        f"onnxruntime.InferenceSession(int8.onnx, providers=['CPUExecutionProvider']) with {settings}",
        lambda: src.threads or _ort_default_threads(),
        {"onnxruntime": ort.__version__, "export_seconds": export_seconds, "quantize_seconds": quantize_seconds,
         "calibration_samples": len(calib)},
    )


def _ort_default_threads() -> int | None:
    """onnxruntime's default intra-op pool: one thread per physical core."""
    return psutil.cpu_count(logical=False) or os.cpu_count()


PEERS = {"peer-ort-quantize-static": _ort_quantize_static}
