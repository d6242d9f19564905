"""cbam-deploy: ship CBAM networks to edge devices (ONNX, INT8, OpenVINO, TensorRT, ncnn, ExecuTorch) with
measured parity and latency.

The Python API (``cbam_deploy.api``): ``cbam_deploy.export(model, output, ...) -> cbam_deploy.Bundle``,
whose methods (``quantize``, ``verify``, ``bench``, ``explain``, ...) return each command's result.
They are loaded on first use, so that ``import cbam_deploy`` stays light (the command line's Ctrl-C
handler goes in before torch and the runtimes are imported) and no module of the package imports the
API that sits on top of it.
"""

import importlib

__version__ = "0.1.0"
__all__ = ["Bundle", "export", "__version__"]
_API = ("Bundle", "export")


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module("cbam_deploy.api"), name)  # the top floor, on first use
    raise AttributeError(f"module 'cbam_deploy' has no attribute {name!r}")
