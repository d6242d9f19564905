"""Ultralytics' own exporter as peers of ``bench --peers`` for a bundle of an Ultralytics model: what a YOLO user
gets from ``YOLO(model).export(format=...)`` on the same model, side by side with the bundle's artifacts.

The same PyTorch model the bundle was made from is saved as an Ultralytics checkpoint in the bench's work
folder and loaded with ``YOLO(path)``; each peer is one ``export`` call with Ultralytics' defaults (static batch
1 at the bundle's input side, on the CPU), run by the runtime cbam-deploy has for the file it wrote (the format
whose extension it has), so each is timed like the bundle's artifacts. The INT8 exports (``quantize=8``)
calibrate on the bench's calibration images, written as a YOLO image folder for Ultralytics' data loader.

Every INT8 peer says whether it quantized the CBAM gates: its graph read by cbam-deploy's gate finder (by
structure), and per gate whether its sigmoid, its multiply or its layers carry quantization; and whether its
output tail stayed in float. An export Ultralytics cannot make here is reported with its error (skipped).
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

from ..errors import CbamDeployError
from ..formats import Unsupported, row_for_file
from .libraries import LibraryPeer
from .ultralytics_source import ULTRALYTICS, _first_line, _quiet, ultralytics

# (peer name, Ultralytics' format, precision, extra export arguments, run by torch.jit: no runtime of its own here)
EXPORTS = (
    ("peer-ultralytics-torchscript", "torchscript", "fp32", {}, True),
    ("peer-ultralytics-onnx", "onnx", "fp32", {}, False),
    ("peer-ultralytics-onnx-int8", "onnx", "int8", {"quantize": 8}, False),
    ("peer-ultralytics-openvino", "openvino", "fp32", {}, False),
    ("peer-ultralytics-openvino-int8", "openvino", "int8", {"quantize": 8}, False),
    ("peer-ultralytics-ncnn", "ncnn", "fp32", {}, False),
    ("peer-ultralytics-executorch", "executorch", "fp32", {}, False),
)


def _side(src) -> int:
    return int(src.example.shape[-1])


def _yolo(src):
    """``YOLO(path)`` over the bench's model saved as an Ultralytics checkpoint (made once for every peer)."""
    def make():
        package = ultralytics()
        folder = Path(src.workdir) / "ultralytics"
        folder.mkdir(parents=True, exist_ok=True)
        module = copy.deepcopy(src.module)
        for head in module.modules():
            if hasattr(head, "anchors") and hasattr(head, "shape"):
                head.shape = None  # the exporter's own dry run caches it again
        path = folder / "model.pt"
        torch.save({"model": module, "train_args": {"imgsz": _side(src), "task": "detect"},
                    "version": package.__version__, "date": None}, path)
        with _quiet():
            return package.YOLO(str(path), task="detect")
    return src.cached("ultralytics-yolo", make)


def _calibration_yaml(src) -> Path:
    """The bench's calibration images (letterboxed, 0-1 RGB) written as a YOLO image folder with its data.yaml,
    which Ultralytics' INT8 export reads (its ``val`` split)."""
    def make():
        calib = src.calibration()
        root = Path(src.workdir) / "ultralytics" / "calibration"
        images = root / "images" / "val"
        images.mkdir(parents=True, exist_ok=True)
        (root / "labels" / "val").mkdir(parents=True, exist_ok=True)
        for index, array in enumerate(calib):
            pixels = np.clip(np.round(np.transpose(array, (1, 2, 0)) * 255), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(images / f"{index:05d}.png")
            (root / "labels" / "val" / f"{index:05d}.txt").write_text("")
        names = getattr(src.module, "names", None) or {}
        classes = int(getattr(src.module.model[-1], "nc", len(names) or 1))
        labels = "".join(f"  {i}: {names.get(i, str(i)) if isinstance(names, dict) else i}\n" for i in range(classes))
        data = root / "data.yaml"
        data.write_text(f"path: {root}\ntrain: images/val\nval: images/val\nnames:\n{labels}")
        return data
    return src.cached("ultralytics-calibration", make)


def _artifact_file(written: Path) -> Path:
    """The file a runtime opens among what an export wrote (a file, or a folder holding one)."""
    if written.is_file():
        return written
    for path in sorted(written.rglob("*")):
        if path.is_file() and row_for_file(path) is not None:
            return path
    raise CbamDeployError(f"Ultralytics' export wrote {written}, where no file cbam-deploy can run was found")


def _open(file: Path, precision: str, threads: int | None):
    """A runner for the file, by the first runtime available here of the format whose extension it has."""
    row = row_for_file(file)
    if row is None:
        raise CbamDeployError(f"no format of cbam-deploy runs {file.name}")
    for name in row.preferred_runtimes:
        for runtime in row.runtimes:
            if runtime.name == name and runtime.probe() is None:
                return row, runtime.open(file, precision, threads)
    raise Unsupported(f"no runtime for {row.title} is available here")


def gate_report(row, file: Path) -> dict:
    """Whether an artifact's graph quantizes its gates, and its output tail: read by cbam-deploy's finder."""
    try:
        graph = row.read_graph(file)
        found = row.gates(graph, None)
    except Unsupported as exc:
        return {"read": False, "reason": str(exc)}
    per_gate = [{"gate": g.name, "kind": g.kind, "sigmoid": g.quantized["sigmoid"], "multiply": g.quantized["multiply"],
                 "layers": len(g.quantized["layers"])} for g in found]
    quantized = [g for g in per_gate if g["sigmoid"] or g["multiply"] or g["layers"]]
    report = {"read": True, "found": len(found), "quantized": len(quantized), "gates_quantized": bool(quantized),
              "per_gate": per_gate}
    try:
        tail = row.check_output_tail(SimpleNamespace(name=file.name, quantization=None), graph)
        report["output_tail_float"] = tail.get("held")
    except Unsupported:
        report["output_tail_float"] = None
    return report


def _exporter(fmt: str, precision: str, extra: dict, jit: bool):
    def build(src) -> LibraryPeer:
        yolo = _yolo(src)
        arguments = {"format": fmt, "imgsz": _side(src), "batch": 1, "device": "cpu", **extra}
        if precision == "int8":
            arguments["data"] = str(_calibration_yaml(src))
        started = time.perf_counter()
        try:
            with _quiet():
                written = yolo.export(**arguments)
        except Exception as exc:  # whatever the exporter raises is the peer's result (skipped, with why)
            raise CbamDeployError(f"Ultralytics' {fmt} export failed: {_first_line(exc)}") from None
        seconds = round(time.perf_counter() - started, 3)
        if not written:
            raise CbamDeployError(f"Ultralytics' {fmt} export wrote nothing")
        file = _artifact_file(Path(written))
        shown = ", ".join(f"{k}={v!r}" for k, v in arguments.items() if k != "data")
        made_by = (f"ultralytics YOLO(model.pt).export({shown}"
                   + (", data=<the bench's calibration images as a YOLO folder>" if precision == "int8" else "") + ")")
        facts = {"ultralytics": ULTRALYTICS.require().__version__, "export_seconds": seconds, "file": file.name,
                 "batch_bounds": [1, 1]}
        if jit:  # no runtime of its own here: PyTorch's TorchScript loader runs it
            program = torch.jit.load(str(file), map_location="cpu").eval()

            def run(batch: np.ndarray) -> np.ndarray:
                with torch.no_grad():
                    out = program(torch.from_numpy(batch))
                return (out[0] if isinstance(out, (tuple, list)) else out).float().numpy()

            return LibraryPeer(run, "torchscript", precision, made_by + "; torch.jit.load", torch.get_num_threads,
                               facts)
        row, runner = _open(file, precision, src.threads)
        if precision == "int8":
            facts["gates"] = gate_report(row, file)
        return LibraryPeer(runner.run, runner.backend, precision, made_by + f"; run by {runner.runtime}", runner.threads,
                           facts)
    return build


def peers() -> dict:
    """{peer name: builder(source) -> LibraryPeer}, one per export Ultralytics offers for a detector."""
    return {name: _exporter(fmt, precision, extra, jit) for name, fmt, precision, extra, jit in EXPORTS}


__all__ = ["EXPORTS", "gate_report", "peers"]
