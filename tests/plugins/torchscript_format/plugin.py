"""TorchScript (``torch.jit.trace``) as a cbam-deploy format, entirely outside the package: its row, its
build step, its runner and its runtime. A package makes it known with an entry point in the group
``cbam_deploy.formats`` (``torchscript = torchscript_format.plugin:FORMAT``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cbam_deploy.formats import Format, Runtime, TritonFragment
from cbam_deploy.fsutil import atomic_path
from cbam_deploy.outputs import flatten_outputs
from cbam_deploy.runners.base import Runner


class TorchScriptRunner(Runner):
    backend = "torchscript"

    def __init__(self, path: Path, precision: str = "fp32", threads: int | None = None) -> None:
        self.module = torch.jit.load(str(path), map_location="cpu").eval()
        self.precision = precision

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        with torch.no_grad():
            outputs = self.module(torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)))
        return {name: value.float().numpy() for name, value in flatten_outputs(outputs)}


def _open(path: Path, precision: str, threads: int | None) -> TorchScriptRunner:
    return TorchScriptRunner(path, precision, threads)


class TorchScriptFormat(Format):
    name = "torchscript"
    title = "TorchScript (torch.jit.trace)"
    extension = "ts"
    precisions = ("fp32",)
    build_source = "pytorch"
    runtimes = (Runtime("torchscript", ("torchscript",), "torch.jit.load on the CPU", lambda: None, _open),)
    preferred_runtimes = ("torchscript",)
    triton = TritonFragment('platform: "pytorch_libtorch"', ("model.pt",), "KIND_CPU", ("KIND_CPU", "KIND_GPU"))
    no_gates = "a TorchScript program keeps no graph this tool reads gates from: attention parity uses the other artifacts"
    no_profile = "torch.jit gives no per-operator times here: use 'cbam-deploy bench' for its latency"

    def make(self, job) -> dict:
        side = job.bundle.input.side
        example = torch.zeros(job.bundle.fixed_batch or 1, job.bundle.input.channels, side, side)
        with torch.no_grad():
            traced = torch.jit.trace(job.module.eval(), example, check_trace=False)
        with atomic_path(job.out_path) as tmp:
            torch.jit.save(traced, str(tmp))
        return {"exporter": "torch.jit.trace", "torch": torch.__version__, "example_shape": list(example.shape)}


FORMAT = TorchScriptFormat()
