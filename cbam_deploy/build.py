"""Build the bundle's other artifacts: every format x precision asked for, each through its row
(``formats.Format``: its build's ``make`` step in the one skeleton ``backends.base.build_artifact``;
its INT8 through its recipe, every INT8 target quantized in one pass over the calibration data).
What cannot be built here is returned as skipped, with its reason; what failed, with its error; the
other formats are built all the same."""

from __future__ import annotations

import time

from .backends.base import BuildOptions, BuildOutcome, TensorRTOptions, build_artifact
from .bundle import Bundle
from .checks import parse_list
from .errors import BackendUnavailable, CbamDeployError
from .formats import PRECISIONS, formats, get
from .loaders import ReferenceModel
from .manifest import artifact_name
from .quantize import quantize_bundle

__all__ = ["PRECISIONS", "BuildOutcome", "TensorRTOptions", "build_artifacts"]


def build_artifacts(bundle_dir, formats_asked: str | list[str], precisions: str | list[str],
                    calib_data: str | None = None, calib_size: int = 128, gates: str | None = None,
                    trt: TensorRTOptions | None = None, trust=None, reference: ReferenceModel | None = None,
                    progress=None) -> list[BuildOutcome]:
    """Every format x precision of the lists, in the formats' order. ``bundle_dir``: a folder or an open
    ``Bundle``; ``reference``: the PyTorch model already rebuilt (an export passes its own), else it
    is rebuilt once, under ``trust``, for whichever build or recipe needs it. ``progress``: a callable
    taking a line per built artifact (``progress.Progress.artifact``)."""
    format_list = parse_list(formats_asked, "--format", formats())  # the options before the bundle is read
    precision_list = parse_list(precisions, "--precision", PRECISIONS)
    bundle = bundle_dir if isinstance(bundle_dir, Bundle) else Bundle.open(bundle_dir)
    reference = reference or ReferenceModel(bundle, trust)
    outcomes: list[BuildOutcome] = []
    engines_from_int8: list[str] = []
    if "int8" in precision_list:
        targets = {}
        for fmt in format_list:
            row = get(fmt)
            if not row.int8_recipe:
                outcomes.append(BuildOutcome(fmt, "int8", skipped=f"{row.title} has no INT8 recipe"))
            elif not calib_data:
                outcomes.append(BuildOutcome(fmt, "int8", skipped="INT8 needs --calib-data (images, .npy/.npz or "
                                                                  "'synthetic')"))
            else:
                targets[fmt] = row.int8_recipe
        if targets:
            try:
                result = quantize_bundle(bundle, list(dict.fromkeys(targets.values())), calib_data, calib_size=calib_size,
                                         gates=gates, reference=reference, skip_unavailable=True, progress=progress)
            except CbamDeployError as exc:
                if isinstance(exc, BackendUnavailable):
                    raise
                result = {"artifacts": [], "skipped": {t: f"failed: {exc}" for t in targets.values()}}
            made = {a["name"]: a for a in result["artifacts"]}
            for fmt, target in targets.items():
                why = result["skipped"].get(target)
                if why:
                    outcomes.append(BuildOutcome(fmt, "int8", skipped=why))
                elif get(fmt).int8_from_recipe_artifact:
                    engines_from_int8.append(fmt)  # built below from the recipe's artifact
                else:
                    name = artifact_name(fmt, "int8", target, gates)
                    record = made.get(name, {})
                    outcomes.append(BuildOutcome(fmt, "int8", name, seconds=(record.get("quantization") or {}).get("seconds"),
                                                 size_bytes=record.get("size_bytes")))
                    if progress is not None:
                        progress.artifact(outcomes[-1])
            bundle = bundle.refresh()
    options = BuildOptions(gates=gates, trt=trt, pytorch_model=reference.module_or_reason)
    for fmt in format_list:
        row = get(fmt)
        for precision in precision_list:
            if precision == "int8" and fmt not in engines_from_int8:
                continue  # the recipe's artifact is this format's INT8 (above)
            started = time.perf_counter()
            try:
                outcome = build_artifact(row, bundle, precision, options)
            except BackendUnavailable as exc:
                outcome = BuildOutcome(fmt, precision, skipped=str(exc))
            except CbamDeployError as exc:
                outcome = BuildOutcome(fmt, precision, failed=str(exc))
            outcome.seconds = round(time.perf_counter() - started, 2)
            outcomes.append(outcome)
            if outcome.name and not row.root:
                bundle = bundle.refresh()
            if progress is not None and not (row.root and precision == "fp32"):  # the export reported it
                progress.artifact(outcome)
    return outcomes
