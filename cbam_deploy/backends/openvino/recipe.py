"""The ``openvino`` INT8 recipe: NNCF post-training quantization of the OpenVINO model, an INT8 IR
(.xml + .bin) with the gate policy applied to the gates the finder finds and checked on the IR as
written (FakeQuantize placement), and the output tail (``gates.output_tail``: a detector's box decode, the
concatenation of its pixel boxes with its probabilities, its final sigmoid) in NNCF's ignored scope and
checked free of FakeQuantize on the IR. The calibration cache holds the quantized IR itself.

Weights take 7 bits on every layer (NNCF's ``OverflowFix.ENABLE``; NNCF's default does so for the
first layer only): x86 CPUs without VNNI (AVX2, AVX-512 before Cascade Lake) multiply u8 x s8 pairs
into saturating 16-bit sums, and with full 8-bit weights an IR then computes other numbers there than
on a VNNI CPU (a gate-int8 CBAM map drifted from correlation 0.9994 to 0.96, docs/int8.md). With 7-bit
weights both paths compute the same integers, so one IR is right on every x86 CPU."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path

from ...calib.recipes import (
    RecipeResult,
    cache_key,
    cache_rebuilt,
    fail_unless_held,
    first_line,
    graph_gates_or_fail,
    preprocess_onnx,
)
from ...data import CalibrationSet
from ...errors import CbamDeployError
from ...fsutil import atomic_path, sha256_file
from ...gates import nodes_of, output_tail, tail_check
from .exporter import NNCF, save_ir
from .gates import check_openvino_policy, openvino_gates, openvino_graph


def quantize_openvino(
    fp32_onnx: Path,
    out_xml: Path,
    data: CalibrationSet,
    method: str,
    gates: str,
    expected: list[dict] | None,
    cache_dir: Path | None = None,
) -> RecipeResult:
    """NNCF post-training quantization of the OpenVINO model; writes an INT8 IR (.xml + .bin).

    NNCF keeps no reusable statistics file, so the cache holds the quantized IR itself, keyed like
    the onnxruntime ranges (model, data fingerprint, recipe, method, gates): a hit skips calibration.
    """
    nncf, ov = NNCF.require_all("nncf", "openvino")
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix  # lazy: as nncf above
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet  # lazy: as nncf above

    with tempfile.TemporaryDirectory(prefix="cbam-ov-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        preprocess_onnx(fp32_onnx, pre)
        key = cache_key(sha256_file(pre), data, "openvino+7-bit-weights+float-tail", method, gates)
        cached = (cache_dir / f"{key}.xml") if cache_dir else None
        info = {"recipe": "openvino", "method": method, "gates": gates,
                "activations": "int8 (NNCF performance preset: symmetric)",
                "weights": "int8 symmetric, per channel, 7-bit range on every layer (NNCF overflow fix: no "
                           "saturation on CPUs without VNNI)"}
        cache_warning = None
        if cached:
            problem = _ov_cache_problem(cached)
            if problem is None:
                _copy_ir(cached, out_xml)
                info["calibration_cache"] = {"path": str(cached), "hit": True}
                info["gate_check"], model, found = _check_ir(ov, out_xml, expected, gates)
                info["output_tail"] = _check_tail(model, out_xml)
                return RecipeResult(out_xml, "openvino", info, graph=model, gates=found)
            if problem != "absent":
                cache_warning = cache_rebuilt(data, cached, problem)
        model = ov.convert_model(str(pre))
        found = graph_gates_or_fail(openvino_gates(model, expected), expected, "the OpenVINO model")
        if expected is None:
            expected = [g.record for g in found]
        tail = [op.name for op in output_tail(openvino_graph(model))]
        ignored = list(dict.fromkeys((nodes_of(found) if gates == "fp" else []) + tail))
        info["excluded_nodes"] = len(ignored) - len(tail)
        estimator = {"minmax": RangeEstimatorParametersSet.MINMAX, "percentile": RangeEstimatorParametersSet.MEAN_QUANTILE}[method]
        batches = [data.inputs[i:i + 1] for i in range(len(data.inputs))]
        nncf.set_log_level(logging.ERROR)
        try:
            # NNCF draws progress bars and logs on stdout, which belongs to --json output
            with contextlib.redirect_stdout(sys.stderr):
                quantized = nncf.quantize(
                    model,
                    nncf.Dataset(batches, lambda x: (data.advance(1), x)[1]),
                    preset=nncf.QuantizationPreset.PERFORMANCE,
                    subset_size=len(batches),
                    ignored_scope=nncf.IgnoredScope(names=ignored, validate=False) if ignored else None,
                    advanced_parameters=AdvancedQuantizationParameters(activations_range_estimator_params=estimator,
                                                                       overflow_fix=OverflowFix.ENABLE),
                )
        except Exception as exc:
            raise CbamDeployError(f"NNCF quantization failed: {type(exc).__name__}: {exc}") from None
        save_ir(quantized, out_xml)
        info["ignored_ov_nodes"] = len(ignored)
        info["gate_check"], checked_model, checked_gates = _check_ir(ov, out_xml, expected, gates)
        info["output_tail"] = {**_check_tail(checked_model, out_xml), "excluded_nodes": len(tail)}
        if cached:
            cache_dir.mkdir(parents=True, exist_ok=True)
            _store_ir(out_xml, cached)
            info["calibration_cache"] = {"path": str(cached), "hit": False}
            if cache_warning:
                info["calibration_cache"]["rebuilt"] = cache_warning
        else:
            info["calibration_cache"] = {"path": None, "hit": False, "reason": "disabled"}
    return RecipeResult(out_xml, "openvino", info, graph=checked_model, gates=checked_gates)


def _check_ir(ov, xml: Path, expected: list[dict] | None, gates: str) -> tuple[dict, object, list]:
    """The gate policy checked on the IR as written (FakeQuantize placement), failing it when broken; the
    check, and the IR and its gates as read for it."""
    model = ov.Core().read_model(str(xml))
    found = openvino_gates(model, expected)
    check = check_openvino_policy(model, expected, gates, "the OpenVINO INT8 IR", found)
    fail_unless_held(check, xml)
    return check, model, found


def _check_tail(model, xml: Path) -> dict:
    """The output tail checked free of FakeQuantize on the IR as written; the IR removed when it is not."""
    check = tail_check(openvino_graph(model), "the OpenVINO INT8 IR")
    if check["held"] is False:
        for suffix in (".xml", ".bin"):
            xml.with_suffix(suffix).unlink(missing_ok=True)
        raise CbamDeployError(f"the output tail is quantized in the OpenVINO INT8 IR: {check['broken'][0]}")
    return check


def _ov_digest_file(cached_xml: Path) -> Path:
    return cached_xml.with_suffix(".sha256.json")


def _ov_cache_problem(cached_xml: Path) -> str | None:
    """None when the cached IR pair is whole (both files match the digests written after them);
    'absent' when there is no entry; else what is wrong with it."""
    xml, binary, digests = cached_xml, cached_xml.with_suffix(".bin"), _ov_digest_file(cached_xml)
    if not xml.exists() and not binary.exists() and not digests.exists():
        return "absent"
    try:
        recorded = json.loads(digests.read_text())
    except (OSError, ValueError) as exc:
        return f"its digest file is unreadable: {first_line(exc)}"
    if not isinstance(recorded, dict):
        return "its digest file is not a JSON object"
    for label, path in (("xml", xml), ("bin", binary)):
        try:
            if not path.is_file() or sha256_file(path) != recorded.get(label):
                return f"the .{label} file is missing or does not match its sha256"
        except OSError as exc:
            return f"the .{label} file is unreadable: {exc.strerror or exc}"
    return None


def _store_ir(src_xml: Path, cached_xml: Path) -> None:
    """Put a fresh IR pair in the cache: the old digest goes first (so a crash leaves no entry that
    looks whole), the files are replaced atomically, the new digest file lands last."""
    digests = _ov_digest_file(cached_xml)
    with contextlib.suppress(FileNotFoundError):
        digests.unlink()
    _copy_ir(src_xml, cached_xml)
    payload = {"xml": sha256_file(cached_xml), "bin": sha256_file(cached_xml.with_suffix(".bin"))}
    with atomic_path(digests) as tmp:
        tmp.write_text(json.dumps(payload))


def _copy_ir(src_xml: Path, dst_xml: Path) -> None:
    """Copy an IR pair; the .bin lands first and the .xml last, each atomically."""
    for suffix in (".bin", ".xml"):
        with atomic_path(dst_xml.with_suffix(suffix)) as tmp:
            shutil.copyfile(src_xml.with_suffix(suffix), tmp)
