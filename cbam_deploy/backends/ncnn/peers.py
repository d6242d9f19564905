"""pnnx and ncnn's own defaults, a peer of ``bench --peers``:

* ``peer-pnnx-ncnn``            ``pnnx.export(model, ..., inputs=x)`` with its defaults (fp16 weights in
                                the .bin, CBAM pools as generic Reduction layers), run by ncnn with its
                                default options (fp16 storage/arithmetic where the CPU has them), image
                                by image like the project's ncnn runner.
"""

from __future__ import annotations

from ...runners.peer import PeerRunner, PeerSource, timed
from .exporter import NcnnParam, convert, require_ncnn, require_pnnx
from .runner import NcnnRunner


def _pnnx_ncnn(src: PeerSource) -> PeerRunner:
    require_ncnn()
    require_pnnx()
    folder = src.workdir / "pnnx-ncnn"
    folder.mkdir(parents=True, exist_ok=True)
    param = folder / "model.param"
    _, seconds = timed(convert, src.module, src.example_tensor()[:1], param, folder / "model.bin", True)
    runner = NcnnRunner(param, precision="fp16", threads=src.threads, pinned=False)
    described = runner.describe()
    return PeerRunner(runner.run, "ncnn", "fp16", "pnnx.export(model, path, inputs=x) (fp16=True: its default); "
                      "ncnn.Net() with its default options", runner.threads,
                      {"convert_seconds": seconds, "layers": NcnnParam.read(param).counts(),
                       "compute_precision": described["compute_precision"], "ncnn_options": described["ncnn_options"]})


PEERS = {"peer-pnnx-ncnn": _pnnx_ncnn}
