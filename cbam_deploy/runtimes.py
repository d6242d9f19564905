"""Runtimes: what runs an artifact, as an axis of its own. An ONNX artifact runs under onnxruntime's CPU,
CUDA, TensorRT or OpenVINO execution providers, or under OpenVINO reading the ONNX itself; an IR runs
under OpenVINO; an engine under TensorRT.

One table, ``RUNTIMES``: for each runtime the artifact formats it runs, a probe (cheap: nothing heavy
is imported) saying whether this machine has it, and a factory making the Runner. ``select_runtime``
picks one for an artifact: the one asked for (refused, in one line naming the ones this machine has,
when it is missing or does not run that format), else the best available for the format. For ONNX that
is ``ort-tensorrt`` > ``ort-cuda`` > ``ort-openvino`` > ``ort-cpu``, so a CPU-only machine with the
plain onnxruntime wheel keeps ``ort-cpu``.

onnxruntime falls back silently (an EP that fails to load, or nodes it cannot take, run on the CPU
provider); ``OnnxRuntimeRunner`` reads where the nodes really went and ``describe()`` says so.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .backends.executorch.exporter import probe as _probe_executorch
from .backends.executorch.runner import ExecuTorchRunner
from .backends.onnx.runner import OnnxRuntimeRunner
from .backends.openvino.runner import OpenVINORunner
from .backends.tensorrt.runner import TensorRTRunner
from .checks import split_list
from .errors import BackendUnavailable, CbamDeployError
from .backends.ncnn.runner import NcnnRunner
from .formats import FORMATS

CPU_EP = "CPUExecutionProvider"


class RuntimeUnavailable(BackendUnavailable):
    """A runtime asked for by name is not on this machine (exit 2, one line naming those that are)."""


@dataclass(frozen=True)
class Runtime:
    name: str
    formats: tuple[str, ...]
    summary: str
    probe: Callable[[], str | None]  # None when this machine has the runtime, else why not
    factory: Callable[..., object]   # (path, precision, threads) -> Runner
    execution_provider: str | None = None  # the onnxruntime EP it asks for first, for ort-* runtimes

    def open(self, path: str | Path, precision: str = "fp32", threads: int | None = None):
        runner = self.factory(Path(path), precision, threads)
        runner.runtime = self.name
        return runner


# ---------------------------------------------------------------- probes (memoised: see clear_probe_cache)

@functools.lru_cache(maxsize=None)
def _ort_providers() -> tuple[str, ...]:
    try:
        import onnxruntime as ort  # lazy: a probe reads the providers only when a runtime is asked about
    except ImportError:
        return ()
    return tuple(ort.get_available_providers())


@functools.lru_cache(maxsize=None)
def _cuda_devices() -> int:
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


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _probe_ort(provider: str, needs_gpu: bool = False, needs_tensorrt: bool = False) -> Callable[[], str | None]:
    def probe() -> str | None:
        providers = _ort_providers()
        if not providers:
            return "onnxruntime is not installed: pip install onnxruntime"
        if provider not in providers:
            wheel = {"CUDAExecutionProvider": "onnxruntime-gpu", "TensorrtExecutionProvider": "onnxruntime-gpu",
                     "OpenVINOExecutionProvider": "onnxruntime-openvino"}.get(provider, "a build with it")
            return f"this onnxruntime has no {provider} (it has {', '.join(providers)}): it comes with {wheel}"
        if needs_gpu and _cuda_devices() == 0:
            return f"{provider} needs an NVIDIA GPU and none is visible"
        if needs_tensorrt:
            if not (_has_module("tensorrt_libs") or _has_module("tensorrt") or ctypes.util.find_library("nvinfer")):
                return f"{provider} needs the TensorRT libraries (libnvinfer): pip install tensorrt"
        return None
    return probe


def _probe_openvino() -> str | None:
    return None if _has_module("openvino") else "OpenVINO is not installed: pip install 'cbam-deploy[openvino]'"


def _probe_tensorrt() -> str | None:
    if not _has_module("tensorrt"):
        return ("TensorRT is not installed: on x86 with an NVIDIA GPU, pip install 'cbam-deploy[tensorrt]'; on Jetson "
                "it comes with JetPack (python3-libnvinfer)")
    if _cuda_devices() == 0:
        return "no CUDA GPU found: TensorRT engines need an NVIDIA GPU (or a Jetson)"
    return None


def _probe_ncnn() -> str | None:
    return None if _has_module("ncnn") else "ncnn is not installed: install the ncnn extra: pip install 'cbam-deploy[ncnn]'"


def clear_probe_cache() -> None:
    """Forget what the probes found (after installing a wheel in the same process; tests)."""
    _ort_providers.cache_clear()
    _cuda_devices.cache_clear()


# ---------------------------------------------------------------- factories

def _ort(providers: Callable[[str, int | None], list]) -> Callable[..., object]:
    def factory(path: Path, precision: str, threads: int | None):
        return OnnxRuntimeRunner(path, providers=providers(precision, threads), threads=threads, precision=precision)
    return factory


def _cuda_options(precision: str) -> dict:
    # an "fp32" latency or parity must be fp32: the CUDA EP would otherwise use TF32 on Ampere and later
    return {"device_id": "0", **({"use_tf32": "0"} if precision == "fp32" else {})}


def _openvino_ep_options(precision: str, threads: int | None) -> dict:
    # FP32 on the CPU device, as OpenVINORunner pins its inference precision (never a silent bf16)
    return {"device_type": "CPU", "precision": "FP32", **({"num_of_threads": str(threads)} if threads else {})}


def _openvino(path: Path, precision: str, threads: int | None):
    return OpenVINORunner(path, precision=precision, threads=threads)


def _tensorrt(path: Path, precision: str, threads: int | None):
    return TensorRTRunner(path, precision=precision)


def _ncnn(path: Path, precision: str, threads: int | None):
    return NcnnRunner(path, precision=precision, threads=threads)


def _executorch(path: Path, precision: str, threads: int | None):
    return ExecuTorchRunner(path, precision=precision, threads=threads)


RUNTIMES: dict[str, Runtime] = {r.name: r for r in (
    Runtime("ort-cpu", ("onnx",), "onnxruntime, CPU execution provider", _probe_ort(CPU_EP),
            _ort(lambda precision, threads: [CPU_EP]), CPU_EP),
    Runtime("ort-cuda", ("onnx",), "onnxruntime, CUDA execution provider (onnxruntime-gpu)",
            _probe_ort("CUDAExecutionProvider", needs_gpu=True),
            _ort(lambda precision, threads: [("CUDAExecutionProvider", _cuda_options(precision)), CPU_EP]),
            "CUDAExecutionProvider"),
    Runtime("ort-tensorrt", ("onnx",), "onnxruntime, TensorRT execution provider, CUDA then CPU for what it leaves",
            _probe_ort("TensorrtExecutionProvider", needs_gpu=True, needs_tensorrt=True),
            _ort(lambda precision, threads: [("TensorrtExecutionProvider", {"device_id": "0"}),
                                             ("CUDAExecutionProvider", _cuda_options(precision)), CPU_EP]),
            "TensorrtExecutionProvider"),
    Runtime("ort-openvino", ("onnx",), "onnxruntime, OpenVINO execution provider on the CPU (onnxruntime-openvino)",
            _probe_ort("OpenVINOExecutionProvider"),
            _ort(lambda precision, threads: [("OpenVINOExecutionProvider", _openvino_ep_options(precision, threads)),
                                             CPU_EP]),
            "OpenVINOExecutionProvider"),
    Runtime("openvino", ("onnx", "openvino"), "OpenVINO runtime (reads the ONNX itself, or the IR)", _probe_openvino,
            _openvino),
    Runtime("tensorrt", ("tensorrt",), "TensorRT runtime (engines built by cbam-deploy)", _probe_tensorrt, _tensorrt),
    Runtime("ncnn", ("ncnn",), "ncnn (Python bindings), fp32 pinned, image by image", _probe_ncnn, _ncnn),
    Runtime("executorch", ("executorch",), "ExecuTorch runtime with the XNNPACK delegate (CPU: x86 and ARM)",
            _probe_executorch, _executorch),
)}



def available_runtimes(fmt: str | None = None) -> list[str]:
    """The runtimes this machine has (that run artifacts of format ``fmt``), in table order."""
    return [n for n, r in RUNTIMES.items() if (fmt is None or fmt in r.formats) and r.probe() is None]


def default_runtime(fmt: str) -> str:
    """The best runtime this machine has for format ``fmt``: the first of its backend's
    ``preferred_runtimes`` that is available, else the last (whose own error then says why)."""
    if fmt not in FORMATS:
        raise CbamDeployError(f"no runner for artifact format {fmt!r}")
    order = FORMATS[fmt].preferred_runtimes  # the formats table says which it prefers
    return next((n for n in order if RUNTIMES[n].probe() is None), order[-1])


def check_runtime_names(names: list[str], option: str = "--runtime") -> list[str]:
    """Every name known and available here, else one line naming the ones that are."""
    for name in names:
        if name not in RUNTIMES:
            raise CbamDeployError(f"{option}: unknown runtime {name!r}; runtimes: {', '.join(RUNTIMES)} "
                                  f"(available here: {', '.join(available_runtimes()) or 'none'})")
        reason = RUNTIMES[name].probe()
        if reason is not None:
            raise RuntimeUnavailable(f"{option}: runtime {name} is not available here ({reason}); available here: "
                                     f"{', '.join(available_runtimes()) or 'none'}")
    if len(set(names)) != len(names):
        raise CbamDeployError(f"{option}: a runtime is listed twice: {', '.join(names)}")
    return names


def parse_runtimes(value: str | list[str] | None, option: str = "--runtime") -> list[str] | None:
    """A comma list (or list) of runtime names, checked; None for the default."""
    if value is None:
        return None
    names = split_list(value)
    if not names:
        raise CbamDeployError(f"{option}: give one or more of {', '.join(RUNTIMES)}")
    return check_runtime_names(names, option)


def select_runtime(fmt: str, name: str | None = None) -> Runtime:
    """The runtime for an artifact of format ``fmt``: ``name`` (checked: known, runs ``fmt``, on this
    machine) or the default."""
    if name is None:
        return RUNTIMES[default_runtime(fmt)]
    if name in RUNTIMES and fmt not in RUNTIMES[name].formats:
        fits = [n for n, r in RUNTIMES.items() if fmt in r.formats]
        raise CbamDeployError(f"runtime {name} does not run {fmt} artifacts (it runs {', '.join(RUNTIMES[name].formats)}); "
                              f"{fmt} runs under {', '.join(fits) or 'none'} (available here: "
                              f"{', '.join(available_runtimes(fmt)) or 'none'})")
    check_runtime_names([name])
    return RUNTIMES[name]


def fitting(fmt: str, names: list[str]) -> list[str]:
    """Those of ``names`` that run artifacts of format ``fmt``."""
    return [n for n in names if fmt in RUNTIMES[n].formats]


def runtime_help() -> str:
    """For the CLI's help: every runtime and what it runs (no probing: help stays instant)."""
    return "; ".join(f"{n} ({'/'.join(r.formats)})" for n, r in RUNTIMES.items())
