"""ONNX -> OpenVINO IR (.xml/.bin), written atomically (.bin first, .xml last)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from ...errors import CbamDeployError
from ...formats import Extra
from ...fsutil import atomic_path

OPENVINO = Extra("OpenVINO", ("openvino",), "pip install 'cbam-deploy[openvino]'")
NNCF = Extra("NNCF", ("nncf", "openvino"), "pip install 'cbam-deploy[openvino]'")


def require_openvino():
    """The ``openvino`` module, or BackendUnavailable in one line (the optional openvino extra)."""
    return OPENVINO.require()


def save_ir(model, out_xml: Path, compress_to_fp16: bool = False) -> None:
    """Serialise an ov.Model as out_xml + out_xml.bin; a reader never sees a half-written pair."""
    ov = require_openvino()
    out_xml = Path(out_xml)
    with tempfile.TemporaryDirectory(prefix=".ir-", dir=out_xml.parent) as tmp:
        staged = Path(tmp) / out_xml.name
        ov.save_model(model, str(staged), compress_to_fp16=compress_to_fp16)
        for suffix in (".bin", ".xml"):
            with atomic_path(out_xml.with_suffix(suffix)) as target:
                staged.with_suffix(suffix).replace(target)


def export_ir(onnx_path: Path, out_xml: Path, precision: str = "fp32") -> dict:
    """Convert the bundle's ONNX to IR; fp16 stores weights in fp16 (compute precision is a runtime hint)."""
    if precision not in ("fp32", "fp16"):
        raise CbamDeployError(f"OpenVINO IR precision must be fp32 or fp16 here (int8 comes from 'quantize'), got {precision}")
    ov = require_openvino()
    try:
        model = ov.convert_model(str(onnx_path))
    except Exception as exc:
        raise CbamDeployError(f"OpenVINO could not convert {onnx_path}: {str(exc).splitlines()[0]}") from None
    save_ir(model, out_xml, compress_to_fp16=precision == "fp16")
    return {"converter": "openvino.convert_model", "openvino": ov.__version__, "weights_precision": precision}
