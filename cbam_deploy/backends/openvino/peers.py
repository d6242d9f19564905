"""OpenVINO's own paths, peers of ``bench --peers``:

* ``peer-openvino-fp32``        ``ov.convert_model(model, example_input=...)`` compiled for "CPU" with no
                                config (OpenVINO's default hint and inference precision, bf16 on CPUs
                                that have it; ``describe()["inference_precision"]`` says which).
* ``peer-openvino-nncf-int8``   ``nncf.quantize(ov_model, nncf.Dataset(...))`` with default settings.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from ...runners.peer import PeerRunner, PeerSource, timed
from .exporter import NNCF, OPENVINO


def _ov_model(src: PeerSource):
    """``ov.convert_model`` straight from the torch module, as OpenVINO's PyTorch guide does it; made once
    for both peers (the conversion's seconds kept beside it)."""
    def convert():
        ov = OPENVINO.require()
        started = time.perf_counter()
        model = ov.convert_model(src.module, example_input=src.example_tensor())
        src.cached("ov_convert_seconds", lambda: round(time.perf_counter() - started, 3))
        return model
    return src.cached("ov_model", convert)


def _ov_compiled_runner(src: PeerSource, model, precision: str, made_by: str, facts: dict) -> PeerRunner:
    """``core.compile_model(model, "CPU")`` with no config (only INFERENCE_NUM_THREADS when pinned)."""
    ov = OPENVINO.require()
    config = {"INFERENCE_NUM_THREADS": src.threads} if src.threads else {}
    compiled, compile_seconds = timed(ov.Core().compile_model, model, "CPU", config)
    request = compiled.create_infer_request()
    output = compiled.output(0)

    def run(batch: np.ndarray) -> np.ndarray:
        return request.infer({0: batch})[output]

    def prop(name: str) -> str:
        value = str(compiled.get_property(name))
        return value.replace("<Type: '", "").rstrip("'>")  # <Type: 'bfloat16'> -> bfloat16, as OpenVINORunner

    settings = f"config={config}" if config else "no config"
    hint, inference_precision = prop("PERFORMANCE_HINT"), prop("INFERENCE_PRECISION_HINT")
    return PeerRunner(
        run, "openvino", precision,
        f"{made_by}; ov.Core().compile_model(model, 'CPU') with {settings} "
        f"(OpenVINO defaults here: PERFORMANCE_HINT={hint}, INFERENCE_PRECISION_HINT={inference_precision})",
        lambda: int(compiled.get_property("INFERENCE_NUM_THREADS")) or None,
        {**facts, "openvino": ov.__version__, "inference_precision": inference_precision, "performance_hint": hint,
         "compile_seconds": compile_seconds},
    )


def _openvino_fp32(src: PeerSource) -> PeerRunner:
    model = _ov_model(src)
    return _ov_compiled_runner(
        src, model, "fp32",
        f"openvino.convert_model(model, example_input={src.example_text()}) from the torch module",
        {"convert_seconds": src.cached("ov_convert_seconds", lambda: None)},
    )


def _openvino_nncf_int8(src: PeerSource) -> PeerRunner:
    calib = src.calibration()
    nncf = NNCF.require()
    model = _ov_model(src)
    batches = [calib[i:i + 1] for i in range(len(calib))]
    nncf.set_log_level(logging.ERROR)
    quantized, seconds = timed(nncf.quantize, model.clone(), nncf.Dataset(batches))
    return _ov_compiled_runner(
        src, quantized, "int8",
        f"openvino.convert_model(model, example_input={src.example_text()}); nncf.quantize(ov_model, "
        f"nncf.Dataset({len(batches)} calibration images, batch 1)) with defaults (no preset, no ignored scope, "
        "subset_size=300, fast_bias_correction=True, target_device=ANY)",
        {"nncf": nncf.__version__, "convert_seconds": src.cached("ov_convert_seconds", lambda: None), "quantize_seconds": seconds,
         "calibration_samples": len(batches)},
    )


PEERS = {"peer-openvino-fp32": _openvino_fp32, "peer-openvino-nncf-int8": _openvino_nncf_int8}
