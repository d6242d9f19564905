"""Peers for ``bench --peers``: what a user gets WITHOUT this tool, built on the fly from the same
PyTorch model through each library's own documented, default path, so the bench shows what the
project's artifacts are worth.

PyTorch's own paths are here:

* ``peer-torch-compile``        ``torch.compile(model)``: inductor, default mode, FP32.
* ``peer-torchao-pt2e-int8``    PyTorch's own INT8 path for x86 CPUs (torchao PT2E): ``torch.export``
                                (strict, as the PT2E guides have it; the non-strict default fails
                                on a ResNet block's ReLU module called twice),
                                ``prepare_pt2e`` with ``X86InductorQuantizer`` and its default config
                                (static, per-channel weights), calibration, ``convert_pt2e``, then
                                ``torch.compile`` with inductor's freezing on (int8 weights prepacked
                                for oneDNN, Q/DQ fused into qconv/qlinear).

Each format adds its engine's own (``formats.Format.peers``: OpenVINO's ``convert_model`` and NNCF,
onnxruntime's ``quantize_static``, pnnx and ncnn's defaults, ExecuTorch's documented path); the docs
of each list them. A model library adds its own exporter for a bundle of its model
(``models.LibrarySource.peers``: Ultralytics' ``YOLO.export``), each peer a ``models.libraries.LibraryPeer``.

Settings are the libraries' defaults on purpose; the one exception is ``threads``, passed to the
libraries that take a thread count (OpenVINO, onnxruntime) when the bench pins one. torch's thread
count is process-wide and left to the caller. Every runner's ``describe()`` carries ``made_by``:
the library, the call and the settings. A peer whose library is missing or whose build fails is
returned as skipped with the reason; building peers never fails the bench.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .errors import CbamDeployError
from .formats import Extra, rows
from .models.libraries import LibraryPeer
from .outputs import flatten_outputs
from .runners.base import Runner
from .runners.peer import NEEDS_CALIBRATION, PeerRunner, PeerSource, Skip, timed
from .runners.torch import TorchRunner

TORCHAO = Extra("torchao", ("torchao",), "pip install 'cbam-deploy[peers]'")


# --- torch.compile ------------------------------------------------------------------------------------


def _torch_compile(src: PeerSource) -> PeerRunner:
    compiled = torch.compile(src.module)  # inductor, mode=None ("default"), dynamic=None, fullgraph=False

    def run(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return flatten_outputs(compiled(torch.from_numpy(batch)))[0][1].float().numpy()

    # The first call compiles; a couple more take any lazy initialisation out of the timed loop.
    _, compile_seconds = timed(run, src.example)
    _, warmup_seconds = timed(lambda: [run(src.example) for _ in range(2)])
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


def _torchao_pt2e_int8(src: PeerSource) -> PeerRunner:
    calib = src.calibration()
    torchao = TORCHAO.require()
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
    exported, export_seconds = timed(lambda: torch.export.export(
        src.module, example, dynamic_shapes=({0: batch},), strict=True).module())
    prepared = prepare_pt2e(exported, X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config()))

    def calibrate() -> None:
        with torch.no_grad():
            for start in range(0, len(calib), 16):
                prepared(torch.from_numpy(calib[start:start + 16].copy()))

    _, calibrate_seconds = timed(calibrate)
    converted = convert_pt2e(prepared)
    # freezing is inductor's config, scoped to this peer's compiles (each batch size compiles on its first call)
    compiled = torch.compile(converted)

    def run(x: np.ndarray) -> np.ndarray:
        with torch._inductor.config.patch(freezing=True), torch.no_grad():
            return flatten_outputs(compiled(torch.from_numpy(x)))[0][1].float().numpy()

    before = _inductor_int8_matches({})
    _, compile_seconds = timed(run, src.example)
    kernels = _inductor_int8_matches(before)
    _, warmup_seconds = timed(lambda: [run(src.example) for _ in range(2)])
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


TORCH_PEERS: dict[str, Callable[[PeerSource], PeerRunner]] = {
    "peer-torch-compile": _torch_compile,
    "peer-torchao-pt2e-int8": _torchao_pt2e_int8,
}


def all_peers(library_peers: dict | None = None) -> dict[str, Callable[[PeerSource], PeerRunner]]:
    """{peer name: builder}: PyTorch's, then each format's, in the formats' order, then the model library's
    (``library_peers``: its own exporter, for a bundle of its model)."""
    peers = dict(TORCH_PEERS)
    for row in rows():
        peers.update(row.peers())
    peers.update(library_peers or {})
    return peers


def _as_runner(built) -> Runner:
    """A library's peer (``LibraryPeer``) as a runner, like every other peer."""
    if isinstance(built, LibraryPeer):
        return PeerRunner(built.run, built.backend, built.precision, built.made_by, built.threads, built.facts)
    return built


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
    if isinstance(exc, (Skip, CbamDeployError)):
        return str(exc)
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    detail = lines[0][:300] if lines else ""
    return f"build failed: {type(exc).__name__}" + (f": {detail}" if detail else "")


def build_peers(module: torch.nn.Module, example: np.ndarray, calib: np.ndarray | None, workdir: Path,
                threads: int | None = None, which: list[str] | None = None,
                library_peers: dict | None = None) -> tuple[dict[str, Runner], list[dict]]:
    """Build the peers named in ``which`` (default all, see ``PEERS``) from ``module``; ``library_peers``: the
    model library's own (``models.LibrarySource.peers()``).

    ``example`` is an (N, C, H, W) float32 batch used for tracing, export and the compile warm-up;
    ``calib`` holds calibration images (N, C, H, W) for the INT8 peers (None: they are skipped).
    Returns (runners by peer name, [{"peer": name, "reason": ...} for each peer not built]).
    """
    peers = all_peers(library_peers)
    unknown = [name for name in which or [] if name not in peers]
    if unknown:
        raise CbamDeployError(f"unknown peer(s) {', '.join(unknown)}; choose from {', '.join(peers)}")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    src = PeerSource(module, example, calib, workdir, threads)
    runners: dict[str, Runner] = {}
    skipped: list[dict] = []
    for name in which or list(peers):
        started = time.perf_counter()
        try:
            with _quiet():
                runner = _as_runner(peers[name](src))
        except Exception as exc:  # a peer that cannot be built here is reported, never fatal
            skipped.append({"peer": name, "reason": _reason(exc)})
            continue
        runner.facts["build_seconds"] = round(time.perf_counter() - started, 3)
        runners[name] = runner
    return runners, skipped


__all__ = ["NEEDS_CALIBRATION", "PeerRunner", "PeerSource", "TORCH_PEERS", "all_peers", "build_peers"]
