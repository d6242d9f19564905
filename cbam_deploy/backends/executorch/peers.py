"""ExecuTorch's documented paths, peers of ``bench --peers``:

* ``peer-executorch-fp32``      ``torch.export.export(model, (x,))`` ->
                                ``to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()])``
                                -> .pte, run by ``executorch.runtime`` (no rewrites: CBAM's pools stay
                                on the portable kernels, between several delegate calls).
* ``peer-executorch-pt2e-int8`` the same with PT2E first: ``prepare_pt2e`` with ``XNNPACKQuantizer``
                                (``get_symmetric_quantization_config(is_per_channel=True)``),
                                calibration, ``convert_pt2e``, export again, lower (no rewrites).
"""

from __future__ import annotations

import importlib
import time

import numpy as np
import torch

from ...errors import CbamDeployError
from ...runners.peer import PeerRunner, PeerSource, timed
from .exporter import lower, require_executorch


def _executorch_peer(src: PeerSource, program, precision: str, made_by: str, facts: dict) -> PeerRunner:
    """Lower ``program`` with the XNNPACK partitioner (defaults), write the .pte, load it in the runtime."""
    require_executorch()
    (edge, partitions, outside), lower_seconds = timed(lower, program)
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


def _executorch_fp32(src: PeerSource) -> PeerRunner:
    require_executorch()
    with torch.no_grad():
        program, seconds = timed(torch.export.export, src.module, (src.example_tensor(),))
    return _executorch_peer(
        src, program, "fp32",
        f"torch.export.export(model, ({src.example_text()},)); executorch.exir.to_edge_transform_and_lower(ep, "
        "partitioner=[XnnpackPartitioner()]).to_executorch(); executorch.runtime.Runtime.get().load_program(pte)",
        {"export_seconds": seconds})


def _executorch_pt2e_int8(src: PeerSource) -> PeerRunner:
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


PEERS = {"peer-executorch-fp32": _executorch_fp32, "peer-executorch-pt2e-int8": _executorch_pt2e_int8}
