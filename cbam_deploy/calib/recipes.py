"""What every INT8 recipe shares: the result, the calibration cache (folder, keys, safe rebuilds), the
gate checks around a recipe (every model gate found in the graph to quantize; a built graph that
breaks the policy removed), and onnxruntime's quantization pre-processing of the FP32 ONNX that the
ONNX and OpenVINO recipes start from. The recipes themselves live in their formats' packages
(``backends/<format>/recipe.py``), each a ``formats.Recipe`` of its row.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import onnx

from ..data import CalibrationSet
from ..errors import CbamDeployError
from ..fsutil import cache_root

CACHE_VERSION = 3  # 2: OpenVINO entries carry a digest file; 3: int8 gates quantize sigmoid and multiply too


@dataclass
class RecipeResult:
    """What a recipe wrote: the artifact's file, its format, its ``quantization`` record and, for a
    recipe that exports the model itself, its ``export`` record."""

    path: Path
    format: str
    info: dict
    export: dict | None = None
    graph: object = None  # the written artifact's graph, as its format reads it, when the recipe read it
    gates: list | None = None  # the gates found in that graph


def default_cache_dir() -> Path:
    return cache_root() / "calibration"


def cache_key(model_sha: str, data: CalibrationSet, target: str, method: str, gates: str) -> str:
    text = json.dumps({"v": CACHE_VERSION, "model": model_sha, "data": data.fingerprint, "n": len(data.inputs),
                       "target": target, "method": method, "gates": gates}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def preprocess_onnx(src: Path, dst: Path) -> None:
    """onnxruntime's quantization pre-processing: shape inference and graph optimisation."""
    from onnxruntime.quantization.shape_inference import quant_pre_process  # lazy: onnxruntime.quantization is heavy and only INT8 needs it

    # symbolic shape inference with merged symbols (a Resize by scales over a dynamic batch, joined by a Concat,
    # leaves a dimension unknown without them); where it still fails, ONNX's own shape inference alone
    first = None
    for options in ({"skip_symbolic_shape": False, "auto_merge": True}, {"skip_symbolic_shape": True}):
        try:
            quant_pre_process(str(src), str(dst), **options)
            return
        except Exception as exc:
            first = first or exc
        finally:
            _remove_debug_dump()
    raise CbamDeployError(f"onnxruntime pre-processing failed on {src}: {type(first).__name__}: {first}") from None


_DEBUG_DUMP = Path("sym_shape_infer_temp.onnx")  # what a failed symbolic shape inference leaves in the folder


def _remove_debug_dump() -> None:
    """onnxruntime's symbolic shape inference saves the graph it could not finish (with its weights as external
    data) into the current folder: take it away again."""
    if not _DEBUG_DUMP.is_file():
        return
    with contextlib.suppress(Exception):
        dump = onnx.load(str(_DEBUG_DUMP), load_external_data=False)
        for tensor in dump.graph.initializer:
            for entry in tensor.external_data:
                if entry.key == "location" and "/" not in entry.value and entry.value.endswith(".data"):
                    Path(entry.value).unlink(missing_ok=True)
    _DEBUG_DUMP.unlink(missing_ok=True)


def graph_gates_or_fail(found: list, expected: list[dict] | None, where: str) -> list:
    """The gates found in a graph to be quantized; every gate of the model must be among them, or
    the policy could not be applied to it."""
    if expected:
        names = {g.name for g in found}
        missing = [g["name"] for g in expected if g["name"] not in names]
        if missing:
            raise CbamDeployError(f"gate policy: {', '.join(missing)} (found in the model) not found in {where}; "
                                  "the policy cannot be applied to it. Re-export the bundle")
    return found


def fail_unless_held(check: dict, artifact_path: Path) -> None:
    """A built graph that does not follow the gate policy is no artifact: remove it, name the gates."""
    if check["held"]:
        return
    for suffix in ("", ".bin"):
        with contextlib.suppress(FileNotFoundError):
            (artifact_path.with_suffix(".bin") if suffix else artifact_path).unlink()
    raise CbamDeployError(f"gate policy --gates {check['policy']} does not hold on {check['checked_on']}: "
                          + "; ".join(check["broken"]))


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def cache_rebuilt(data: CalibrationSet, entry: Path, problem: str) -> str:
    """Record (in the calibration warnings the result reports) that a cache entry was unusable."""
    message = f"calibration cache entry {entry} was unusable ({problem}); calibrated again and replaced it"
    data.warnings.append(message)
    return message


def rebuild_cache_entry(entry: Path, run) -> None:
    """Calibrate with a fresh cache file beside ``entry`` and move it into place (atomic replace), so a
    reader never sees a half-written entry and a bad one is overwritten, never trusted again."""
    fd, fresh = tempfile.mkstemp(prefix=f".{entry.name}.", suffix=".tmp", dir=entry.parent)
    os.close(fd)
    fresh_path = Path(fresh)
    fresh_path.unlink()  # onnxruntime calibrates only when the cache file does not exist yet
    try:
        run(fresh_path)
        if fresh_path.is_file():
            if entry.is_dir():
                shutil.rmtree(entry)
            os.replace(fresh_path, entry)
    finally:
        if fresh_path.exists():
            fresh_path.unlink()
