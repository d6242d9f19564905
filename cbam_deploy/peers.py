"""Peers for ``bench --peers``: what a user gets WITHOUT this tool, built on the fly from the same
PyTorch model through each library's own documented, default path, so the bench shows what the
project's artifacts are worth.

* ``peer-torch-compile``        ``torch.compile(model)``: inductor, default mode, FP32.
* ``peer-torchao-pt2e-int8``    PyTorch's own INT8 path for x86 CPUs (torchao PT2E): ``torch.export``
                                (strict, as the PT2E guides have it; the non-strict default fails
                                on a ResNet block's ReLU module called twice),
                                ``prepare_pt2e`` with ``X86InductorQuantizer`` and its default config
                                (static, per-channel weights), calibration, ``convert_pt2e``, then
                                ``torch.compile`` with inductor's freezing on (int8 weights prepacked
                                for oneDNN, Q/DQ fused into qconv/qlinear).
* ``peer-openvino-fp32``        ``ov.convert_model(model, example_input=...)`` compiled for "CPU" with no
                                config (OpenVINO's default hint and inference precision, bf16 on CPUs
                                that have it; ``describe()["inference_precision"]`` says which).
* ``peer-openvino-nncf-int8``   ``nncf.quantize(ov_model, nncf.Dataset(...))`` with default settings.
* ``peer-ort-quantize-static``  ``torch.onnx.export`` (TorchScript exporter, opset 17, dynamic batch),
                                then ``onnxruntime.quantization.quantize_static`` with its defaults.
* ``peer-pnnx-ncnn``            ``pnnx.export(model, ..., inputs=x)`` with its defaults (fp16 weights in
                                the .bin, CBAM pools as generic Reduction layers), run by ncnn with its
                                default options (fp16 storage/arithmetic where the CPU has them), image
                                by image like the project's ncnn runner.
* ``peer-executorch-fp32``      ExecuTorch's documented path: ``torch.export.export(model, (x,))`` ->
                                ``to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()])``
                                -> .pte, run by ``executorch.runtime`` (no rewrites: CBAM's pools stay
                                on the portable kernels, between several delegate calls).
* ``peer-executorch-pt2e-int8`` the same with PT2E first: ``prepare_pt2e`` with ``XNNPACKQuantizer``
                                (``get_symmetric_quantization_config(is_per_channel=True)``),
                                calibration, ``convert_pt2e``, export again, lower (no rewrites).

Settings are the libraries' defaults on purpose; the one exception is ``threads``, passed to the
libraries that take a thread count (OpenVINO, onnxruntime) when the bench pins one. torch's thread
count is process-wide and left to the caller. Every runner's ``describe()`` carries ``made_by``:
the library, the call and the settings. A peer whose library is missing or whose build fails is
returned as skipped with the reason; building peers never fails the bench.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import psutil
import torch

from .backends.executorch.exporter import lower as lower_to_xnnpack
from .backends.executorch.exporter import require_executorch
from .backends.ncnn.exporter import convert as pnnx_convert
from .backends.ncnn.exporter import NcnnParam, require_ncnn, require_pnnx
from .backends.ncnn.runner import NcnnRunner
from .errors import BackendUnavailable, CbamDeployError
from .outputs import flatten_outputs
from .runners.base import Runner
from .runners.torch import TorchRunner

NEEDS_CALIBRATION = "needs calibration data (--calib-data)"


class PeerRunner(Runner):
    """A peer: ``run`` calls what the library built; ``describe`` adds how it was made and what it took."""

    def __init__(self, run: Callable[[np.ndarray], np.ndarray], backend: str, precision: str, made_by: str,
                 threads: Callable[[], int | None], facts: dict | None = None) -> None:
        self._run = run
        self._threads = threads
        self.backend = backend
        self.precision = precision
        self.made_by = made_by
        self.facts = dict(facts or {})

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """The first output (peers are timed, not compared output by output)."""
        return {"output": np.asarray(self._run(np.ascontiguousarray(batch, dtype=np.float32)), dtype=np.float32)}

    def threads(self) -> int | None:
        return self._threads()

    def describe(self) -> dict:
        return {**super().describe(), "made_by": self.made_by, **self.facts}


class _Source:
    """What every builder starts from; the OpenVINO conversion is shared by the two OpenVINO peers."""

    def __init__(self, module: torch.nn.Module, example: np.ndarray, calib: np.ndarray | None, workdir: Path,
                 threads: int | None) -> None:
        self.module = module.eval()
        self.example = np.ascontiguousarray(example, dtype=np.float32)
        self.calib = None if calib is None else np.ascontiguousarray(calib, dtype=np.float32)
        self.workdir = workdir
        self.threads = threads

    def example_tensor(self) -> torch.Tensor:
        return torch.from_numpy(self.example.copy())

    def example_text(self) -> str:
        return f"torch.randn{tuple(self.example.shape)}"

    def calibration(self) -> np.ndarray:
        if self.calib is None or not len(self.calib):
            raise _Skip(NEEDS_CALIBRATION)
        return self.calib

    @functools.cached_property
    def ov_model(self):
        """``ov.convert_model`` straight from the torch module, as OpenVINO's PyTorch guide does it."""
        ov = _require("openvino", "OpenVINO is not installed: pip install 'cbam-deploy[openvino]'")
        started = time.perf_counter()
        model = ov.convert_model(self.module, example_input=self.example_tensor())
        self.ov_convert_seconds = round(time.perf_counter() - started, 3)
        return model


class _Skip(Exception):
    """A peer that cannot be built here for a known reason (the message)."""


def _require(name: str, hint: str):
    try:
        return __import__(name)
    except ImportError:
        raise BackendUnavailable(hint) from None


def _timed(call: Callable, *args, **kwargs):
    started = time.perf_counter()
    result = call(*args, **kwargs)
    return result, round(time.perf_counter() - started, 3)


# --- torch.compile ------------------------------------------------------------------------------------


def _torch_compile(src: _Source) -> PeerRunner:
    compiled = torch.compile(src.module)  # inductor, mode=None ("default"), dynamic=None, fullgraph=False

    def run(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return flatten_outputs(compiled(torch.from_numpy(batch)))[0][1].float().numpy()

    # The first call compiles; a couple more take any lazy initialisation out of the timed loop.
    _, compile_seconds = _timed(run, src.example)
    _, warmup_seconds = _timed(lambda: [run(src.example) for _ in range(2)])
    peer = PeerRunner(
        run, "torch-inductor", "fp32",
        "torch.compile(model) (inductor backend, default mode, dynamic=None, no options), fp32, "
        "called under torch.inference_mode()",
        torch.get_num_threads,
        {"torch": torch.__version__, "compile_seconds": compile_seconds, "warmup_calls": 3,
         "warmup_seconds": warmup_seconds,
         "note": "compiled for the example's batch size; another batch size recompiles (dynamic shapes) "
                 "on its first call, inside the bench's warm-up"},
    )
    peer.settle_seconds = TorchRunner.settle_seconds  # the same OpenMP threads as eager PyTorch
    return peer


def _torchao_pt2e_int8(src: _Source) -> PeerRunner:
    calib = src.calibration()
    torchao = _require("torchao", "torchao is not installed: pip install 'cbam-deploy[peers]'")
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e  # lazy: the optional peers extra
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (  # lazy: as above; also registers
        X86InductorQuantizer, get_default_x86_inductor_quantization_config)  # its inductor passes (int8 fusions)

    # traced at batch 2 with the batch dynamic (export specialises a dimension of size 1)
    example = (torch.from_numpy(np.concatenate([src.example[:1]] * 2)),)
    batch = torch.export.Dim("batch", min=1, max=1024)
    # strict=True (TorchDynamo tracing, what torch.export did by default when the PT2E guides were written):
    # the non-strict default records no source_fn_stack, and X86InductorQuantizer then takes the two calls
    # of a ReLU module that a ResNet block makes for one partition and stops with "Input partition has
    # more than one output node" (torch 2.13, torchao 0.18)
    exported, export_seconds = _timed(lambda: torch.export.export(
        src.module, example, dynamic_shapes=({0: batch},), strict=True).module())
    prepared = prepare_pt2e(exported, X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config()))

    def calibrate() -> None:
        with torch.no_grad():
            for start in range(0, len(calib), 16):
                prepared(torch.from_numpy(calib[start:start + 16].copy()))

    _, calibrate_seconds = _timed(calibrate)
    converted = convert_pt2e(prepared)
    # freezing is inductor's config, scoped to this peer's compiles (each batch size compiles on its first call)
    compiled = torch.compile(converted)

    def run(x: np.ndarray) -> np.ndarray:
        with torch._inductor.config.patch(freezing=True), torch.no_grad():
            return flatten_outputs(compiled(torch.from_numpy(x)))[0][1].float().numpy()

    before = _inductor_int8_matches({})
    _, compile_seconds = _timed(run, src.example)
    kernels = _inductor_int8_matches(before)
    _, warmup_seconds = _timed(lambda: [run(src.example) for _ in range(2)])
    peer = PeerRunner(
        run, "torch-pt2e-inductor", "int8",
        "torch.export.export(model, (a batch of 2,), dynamic batch, strict=True).module(); torchao "
        "prepare_pt2e(exported, X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())) "
        f"(static, per-channel symmetric int8 weights, per-tensor uint8 activations), calibrated on {len(calib)} "
        "images in batches of 16; convert_pt2e; torch.compile(converted) with torch._inductor.config freezing=True "
        "(int8 weights prepacked for oneDNN, Q/DQ fused into qconv/qlinear, constants folded), called under "
        "torch.no_grad()",
        torch.get_num_threads,
        {"torch": torch.__version__, "torchao": torchao.__version__, "export_seconds": export_seconds,
         "calibrate_seconds": calibrate_seconds, "compile_seconds": compile_seconds, "int8_kernels": kernels,
         "warmup_calls": 3, "warmup_seconds": warmup_seconds, "calibration_samples": len(calib),
         "note": "compiled for the example's batch size; another batch size recompiles on its first call, inside "
                 "the bench's warm-up"},
    )
    peer.settle_seconds = TorchRunner.settle_seconds  # the same OpenMP threads as eager PyTorch
    return peer


def _inductor_int8_matches(before: dict[str, int]) -> dict[str, int]:
    """{pattern: count} of inductor's x86 int8 passes (weight prepacking for oneDNN qconv/qlinear, Q/DQ
    fusions) that fired since ``before`` was taken: what the compile turned into int8 kernels."""
    counters = torch._dynamo.utils.counters  # loaded by the strict torch.export that precedes every call
    now = {k: v for k, v in counters["inductor"].items() if k.startswith("q") and k.endswith("_count")}
    return {k: v - before.get(k, 0) for k, v in sorted(now.items()) if v - before.get(k, 0)}


# --- OpenVINO -----------------------------------------------------------------------------------------


def _ov_compiled_runner(src: _Source, model, precision: str, made_by: str, facts: dict) -> PeerRunner:
    """``core.compile_model(model, "CPU")`` with no config (only INFERENCE_NUM_THREADS when pinned)."""
    ov = _require("openvino", "OpenVINO is not installed: pip install 'cbam-deploy[openvino]'")
    config = {"INFERENCE_NUM_THREADS": src.threads} if src.threads else {}
    compiled, compile_seconds = _timed(ov.Core().compile_model, model, "CPU", config)
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


def _openvino_fp32(src: _Source) -> PeerRunner:
    model = src.ov_model
    return _ov_compiled_runner(
        src, model, "fp32",
        f"openvino.convert_model(model, example_input={src.example_text()}) from the torch module",
        {"convert_seconds": src.ov_convert_seconds},
    )


def _openvino_nncf_int8(src: _Source) -> PeerRunner:
    calib = src.calibration()
    nncf = _require("nncf", "NNCF is not installed: pip install 'cbam-deploy[openvino]'")
    model = src.ov_model
    batches = [calib[i:i + 1] for i in range(len(calib))]
    nncf.set_log_level(logging.ERROR)
    quantized, seconds = _timed(nncf.quantize, model.clone(), nncf.Dataset(batches))
    return _ov_compiled_runner(
        src, quantized, "int8",
        f"openvino.convert_model(model, example_input={src.example_text()}); nncf.quantize(ov_model, "
        f"nncf.Dataset({len(batches)} calibration images, batch 1)) with defaults (no preset, no ignored scope, "
        "subset_size=300, fast_bias_correction=True, target_device=ANY)",
        {"nncf": nncf.__version__, "convert_seconds": src.ov_convert_seconds, "quantize_seconds": seconds,
         "calibration_samples": len(batches)},
    )


# --- onnxruntime --------------------------------------------------------------------------------------


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


def _ort_quantize_static(src: _Source) -> PeerRunner:
    calib = src.calibration()
    ort = _require("onnxruntime", "onnxruntime is not installed: pip install onnxruntime")
    from onnxruntime.quantization import quantize_static  # lazy: onnxruntime may be absent (the peer is then skipped)

    fp32, int8 = src.workdir / "peer-ort-fp32.onnx", src.workdir / "peer-ort-int8.onnx"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        _, export_seconds = _timed(
            torch.onnx.export, src.module, (src.example_tensor(),), str(fp32), dynamo=False, opset_version=17,
            input_names=["input"], output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
        )
    _, quantize_seconds = _timed(quantize_static, str(fp32), str(int8), _CalibrationReader(calib, "input"))
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


def _pnnx_ncnn(src: _Source) -> PeerRunner:
    require_ncnn()
    require_pnnx()
    folder = src.workdir / "pnnx-ncnn"
    folder.mkdir(parents=True, exist_ok=True)
    param = folder / "model.param"
    _, seconds = _timed(pnnx_convert, src.module, src.example_tensor()[:1], param, folder / "model.bin", True)
    runner = NcnnRunner(param, precision="fp16", threads=src.threads, pinned=False)
    described = runner.describe()
    return PeerRunner(runner.run, "ncnn", "fp16", "pnnx.export(model, path, inputs=x) (fp16=True: its default); "
                      "ncnn.Net() with its default options", runner.threads,
                      {"convert_seconds": seconds, "layers": NcnnParam.read(param).counts(),
                       "compute_precision": described["compute_precision"], "ncnn_options": described["ncnn_options"]})


def _ort_default_threads() -> int | None:
    """onnxruntime's default intra-op pool: one thread per physical core."""
    return psutil.cpu_count(logical=False) or os.cpu_count()


# --- ExecuTorch ---------------------------------------------------------------------------------------


def _executorch_peer(src: _Source, program, precision: str, made_by: str, facts: dict) -> PeerRunner:
    """Lower ``program`` with the XNNPACK partitioner (defaults), write the .pte, load it in the runtime."""
    require_executorch()
    (edge, partitions, outside), lower_seconds = _timed(lower_to_xnnpack, program)
    path = src.workdir / f"peer-executorch-{precision}.pte"
    path.write_bytes(edge.to_executorch().buffer)
    runtime = importlib.import_module("executorch.runtime")  # lazy: ExecuTorch is optional (the executorch extra)
    bindings = importlib.import_module("executorch.extension.pybindings.portable_lib")
    method = runtime.Runtime.get().load_program(path).load_method("forward")

    shape = src.example.shape

    def run(batch: np.ndarray) -> np.ndarray:
        # a static program: other batch sizes run as chunks of its own (another shape would be computed
        # wrongly without an error: ExecuTorch does not check shapes)
        if batch.shape[1:] != shape[1:] or len(batch) % shape[0]:
            raise CbamDeployError(f"the ExecuTorch peer was exported for inputs of shape {tuple(shape)} "
                                  f"(or whole multiples of its batch); got {tuple(batch.shape)}")
        return np.concatenate([method.execute([torch.from_numpy(batch[i:i + shape[0]])])[0].numpy()
                               for i in range(0, len(batch), shape[0])])

    return PeerRunner(
        run, "executorch", precision, made_by, lambda: int(bindings._threadpool_get_thread_count()),
        {**facts, "partitions": partitions, "outside_delegate": outside, "lower_seconds": lower_seconds,
         "note": f"exported for the example's shape {tuple(src.example.shape)} (static, as the documented path)"},
    )


def _executorch_fp32(src: _Source) -> PeerRunner:
    require_executorch()
    with torch.no_grad():
        program, seconds = _timed(torch.export.export, src.module, (src.example_tensor(),))
    return _executorch_peer(
        src, program, "fp32",
        f"torch.export.export(model, ({src.example_text()},)); executorch.exir.to_edge_transform_and_lower(ep, "
        "partitioner=[XnnpackPartitioner()]).to_executorch(); executorch.runtime.Runtime.get().load_program(pte)",
        {"export_seconds": seconds})


def _executorch_pt2e_int8(src: _Source) -> PeerRunner:
    calib = src.calibration()
    require_executorch()
    pt2e = importlib.import_module("torchao.quantization.pt2e.quantize_pt2e")  # lazy: optional (executorch extra)
    xnn = importlib.import_module("executorch.backends.xnnpack.quantizer.xnnpack_quantizer")
    example = src.example_tensor()
    started = time.perf_counter()
    with torch.no_grad():
        graph = torch.export.export(src.module, (example,)).module()
        quantizer = xnn.XNNPACKQuantizer().set_global(xnn.get_symmetric_quantization_config(is_per_channel=True))
        prepared = pt2e.prepare_pt2e(graph, quantizer)
        for i in range(0, len(calib), len(src.example)):
            chunk = calib[i:i + len(src.example)]
            if len(chunk) == len(src.example):  # the static example shape
                prepared(torch.from_numpy(chunk))
        program = torch.export.export(pt2e.convert_pt2e(prepared), (example,))
    return _executorch_peer(
        src, program, "int8",
        f"torch.export.export(model, ({src.example_text()},)).module(); prepare_pt2e(m, XNNPACKQuantizer()"
        f".set_global(get_symmetric_quantization_config(is_per_channel=True))); {len(calib)} calibration images; "
        "convert_pt2e; torch.export.export; to_edge_transform_and_lower(partitioner=[XnnpackPartitioner()])",
        {"quantize_seconds": round(time.perf_counter() - started, 3), "calibration_samples": len(calib)})


PEERS: dict[str, Callable[[_Source], PeerRunner]] = {
    "peer-torch-compile": _torch_compile,
    "peer-torchao-pt2e-int8": _torchao_pt2e_int8,
    "peer-openvino-fp32": _openvino_fp32,
    "peer-openvino-nncf-int8": _openvino_nncf_int8,
    "peer-ort-quantize-static": _ort_quantize_static,
    "peer-pnnx-ncnn": _pnnx_ncnn,
    "peer-executorch-fp32": _executorch_fp32,
    "peer-executorch-pt2e-int8": _executorch_pt2e_int8,
}


@contextlib.contextmanager
def _quiet():
    """NNCF's progress bars and prints go to stdout, which belongs to ``--json`` output; onnxruntime's
    quantizer logs every node it skips on the root logger."""
    root = logging.getLogger()
    previous = root.level
    root.setLevel(max(previous, logging.ERROR))
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        root.setLevel(previous)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, (_Skip, CbamDeployError)):
        return str(exc)
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    detail = lines[0][:300] if lines else ""
    return f"build failed: {type(exc).__name__}" + (f": {detail}" if detail else "")


def build_peers(module: torch.nn.Module, example: np.ndarray, calib: np.ndarray | None, workdir: Path,
                threads: int | None = None, which: list[str] | None = None) -> tuple[dict[str, Runner], list[dict]]:
    """Build the peers named in ``which`` (default all, see ``PEERS``) from ``module``.

    ``example`` is an (N, C, H, W) float32 batch used for tracing, export and the compile warm-up;
    ``calib`` holds calibration images (N, C, H, W) for the INT8 peers (None: they are skipped).
    Returns (runners by peer name, [{"peer": name, "reason": ...} for each peer not built]).
    """
    unknown = [name for name in which or [] if name not in PEERS]
    if unknown:
        raise CbamDeployError(f"unknown peer(s) {', '.join(unknown)}; choose from {', '.join(PEERS)}")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    src = _Source(module, example, calib, workdir, threads)
    runners: dict[str, Runner] = {}
    skipped: list[dict] = []
    for name in which or list(PEERS):
        started = time.perf_counter()
        try:
            with _quiet():
                runner = PEERS[name](src)
        except Exception as exc:  # a peer that cannot be built here is reported, never fatal
            skipped.append({"peer": name, "reason": _reason(exc)})
            continue
        runner.facts["build_seconds"] = round(time.perf_counter() - started, 3)
        runners[name] = runner
    return runners, skipped
