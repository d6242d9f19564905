"""What this machine has, probed cheaply (nothing heavy imported): NVIDIA GPUs, Python modules and
libraries, and the software stack of a cbam-deploy Docker image."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import importlib.util
import json
import os
from pathlib import Path

IMAGE_STACK_FILE = Path("/etc/cbam-deploy/stack.json")  # written by the Dockerfile's image targets


@functools.lru_cache(maxsize=None)
def cuda_devices() -> int:
    """NVIDIA GPUs on this machine, through NVML (ctypes: no torch import, and no cuInit, which would
    break CUDA in processes forked later); a Jetson (no NVML) counts as one."""
    for name in ("libnvidia-ml.so.1", "libnvidia-ml.so", "nvml.dll"):
        try:
            nvml = ctypes.CDLL(name)
        except OSError:
            continue
        count = ctypes.c_uint(0)
        try:
            if nvml.nvmlInit_v2() != 0:
                return 0
            ok = nvml.nvmlDeviceGetCount_v2(ctypes.byref(count)) == 0
            nvml.nvmlShutdown()
        except AttributeError:
            return 0
        return count.value if ok else 0
    return 1 if Path("/etc/nv_tegra_release").is_file() else 0


def has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def has_library(name: str) -> bool:
    """Whether the dynamic linker finds ``lib<name>`` (e.g. TensorRT's nvinfer)."""
    return ctypes.util.find_library(name) is not None


def image_stack(path: Path | None = None) -> dict | None:
    """The software stack a cbam-deploy Docker image was built with (its target, the Triton release its
    plans are for, and the TensorRT, CUDA, torch and onnxruntime versions read from the installed
    libraries at build time); None outside those images. ``info`` and ``bench`` print it."""
    path = Path(os.environ.get("CBAM_DEPLOY_STACK_FILE") or path or IMAGE_STACK_FILE)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
