"""The Python API: what a notebook calls, on the same paths as the CLI.

```python
import cbam_deploy

bundle = cbam_deploy.export(model, "bundles/mine", input_size=64)          # an nn.Module, a zoo name or FILE.py:FACTORY
bundle.quantize("ort-cpu,openvino", calib_data="photos/")                  # -> QuantizeResult
result = bundle.verify(data="photos/")                                      # -> VerifyResult (passed, exit_code, to_json())
bundle.bench(batches="1,8").speedup("onnx-fp32")                            # -> BenchResult
bundle.explain("cat.png", "explain/")                                       # -> ExplainResult
```

``export`` takes every option of ``cbam-deploy export`` as a keyword (``export_job.ExportOptions``), checked
once before any work; each method of ``Bundle`` takes its command's options the same way and returns
that command's result object (``results.Result``). A bundle made from a module in memory records the
module's class and a fingerprint of its state; nothing can rebuild it from the bundle alone, so later
checks that need the PyTorch model ask for it (``Bundle(path, model=module)``: the same module, checked
against the fingerprint), and say so in one line where it is not given.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from .backends.base import BuildOutcome
from .bench import BenchResult
from .build import build_artifacts
from .bundle import Bundle as OpenBundle
from .errors import CbamDeployError
from .evaluate import EvalResult, evaluate_bundle
from .explain_report import ExplainResult, explain_bundle
from .export_job import ExportOptions, ExportResult
from .info import InfoResult, bundle_info
from .loaders import ReferenceModel
from .models import CodeTrust
from .pipeline import bench_with_twins, run_export
from .profile import ProfileResult, profile_bundle
from .progress import NULL, Progress
from .quantize import QuantizeResult, quantize_bundle
from .verify import VerifyResult, verify_bundle

__all__ = ["Bundle", "export"]


def export(model: nn.Module | str, output: str | Path | None = None, *, progress: bool | Progress = False,
           **options) -> Bundle:
    """Export ``model`` (an ``nn.Module``, a zoo name, or ``FILE.py:FACTORY``) to a bundle at ``output``
    and do what ``options`` ask for after it (``formats``, ``precisions``, ``calib_data``, ``int8``, ...;
    every option of ``cbam-deploy export``, see ``export_job.ExportOptions``). ``progress``: show progress
    on stderr. Returns the ``Bundle``; what the export found is ``bundle.export_result``."""
    checked = ExportOptions(model=model, output=None if output is None else str(output), **options)
    result = run_export(checked, progress=_progress(progress))
    return Bundle(result["bundle"], model=model if isinstance(model, nn.Module) else None, export_result=result,
                  factory=model if isinstance(model, str) and ":" in model else None, _reference=result.module)


def _progress(progress: bool | Progress) -> Progress:
    return progress if isinstance(progress, Progress) else Progress() if progress else NULL


class Bundle:
    """A bundle folder, opened once (what its checks open of an artifact is kept between calls), with the
    commands as methods. ``model``: the module a module-made bundle was exported from (checked against
    the fingerprint the manifest records); ``factory`` / ``trust_code``: which Python code may run to
    rebuild a factory's model (as ``--model`` / ``--trust-code``)."""

    export_result: ExportResult | None = None  # what the export found, for a bundle ``export`` returned

    def __init__(self, path: str | Path, *, model: nn.Module | None = None, factory: str | None = None,
                 trust_code: bool = False, export_result: ExportResult | None = None, _reference=None) -> None:
        self.path = Path(path)
        self._bundle = OpenBundle.open(self.path)
        self.export_result = export_result
        self._trust = CodeTrust(factory=factory, trust_bundle=trust_code)
        if _reference is not None:  # the module this process has just exported
            self._reference = ReferenceModel(self._bundle, module=_reference)
        elif model is not None:
            self._reference = ReferenceModel.handed_over(self._bundle, model)
        else:
            self._reference = None

    def __repr__(self) -> str:
        return f"cbam_deploy.Bundle({str(self.path)!r}, model={self.model_name!r}, artifacts={self.artifacts})"

    # ------------------------------------------------------------------ what it holds

    @property
    def model_name(self) -> str:
        return self._bundle.model.name

    @property
    def artifacts(self) -> list[str]:
        return self._bundle.artifact_names

    @property
    def manifest(self) -> dict:
        return self._bundle.manifest

    def path_of(self, artifact: str | None = None) -> Path:
        """The checked file of an artifact (the first when None)."""
        return self._bundle.path_of(artifact)

    def info(self) -> InfoResult:
        return bundle_info(self._bundle)

    # ------------------------------------------------------------------ commands

    def _fresh(self) -> OpenBundle:
        self._bundle = self._bundle.refresh()
        if self._reference is not None:
            self._reference.bundle = self._bundle
        return self._bundle

    def _reference_or_trust(self) -> ReferenceModel:
        return self._reference or ReferenceModel(self._bundle, self._trust)

    def build(self, formats: str | list[str], precisions: str | list[str] = "fp32", calib_data: str | None = None,
              progress: bool | Progress = False, **options) -> list[BuildOutcome]:
        """Every format x precision (as ``export --format/--precision``); what could not be built says why."""
        outcomes = build_artifacts(self._bundle, formats, precisions, calib_data, reference=self._reference_or_trust(),
                                   progress=_progress(progress), **options)
        self._fresh()
        return outcomes

    def quantize(self, targets: str | list[str] = "ort-cpu", calib_data: str = "synthetic",
                 progress: bool | Progress = False, **options) -> QuantizeResult:
        """INT8 artifacts for ``targets``, each checked against PyTorch (``cbam-deploy quantize``)."""
        result = quantize_bundle(self._bundle, targets, calib_data, reference=self._reference_or_trust(),
                                 progress=_progress(progress), **options)
        self._fresh()
        return result

    def verify(self, data: str | None = None, artifacts: str | list[str] | None = None,
               progress: bool | Progress = False, **options) -> VerifyResult:
        """Every artifact (or ``artifacts``) against PyTorch FP32 (``cbam-deploy verify``)."""
        names = [a for a in artifacts.split(",") if a] if isinstance(artifacts, str) else artifacts
        result = verify_bundle(self._bundle, data, names, trust=self._trust, reference=self._needs_reference("verify"),
                               progress=_progress(progress), **options)
        self._fresh()
        return result

    def bench(self, batches: str | list[int] = "1", progress: bool | Progress = False, **options) -> BenchResult:
        """Latency of every artifact next to PyTorch eager in the same rounds (``cbam-deploy bench``)."""
        return bench_with_twins(self._bundle, batches, trust=self._trust, progress=_progress(progress),
                                module=self._reference.module_or_reason()[0] if self._reference else None, **options)

    def profile(self, artifacts: list[str] | None = None, **options) -> ProfileResult:
        """Per-operator time, rolled up by category (``cbam-deploy profile``)."""
        return profile_bundle(self._bundle, artifacts, **options)

    def explain(self, image: str | Path, output: str | Path | None = None, artifacts: list[str] | None = None
                ) -> ExplainResult:
        """Grad-CAM and every attention gate's map, PyTorch beside each artifact (``cbam-deploy explain``)."""
        return explain_bundle(self._bundle, image, artifacts, output, trust=self._trust,
                              reference=self._needs_reference("explain"))

    def evaluate(self, data: str | Path, **options) -> EvalResult:
        """Accuracy on labelled images, every artifact beside the reference (``cbam-deploy eval``)."""
        return evaluate_bundle(self._bundle, data, trust=self._trust, reference=self._needs_reference("eval"),
                               **options)

    def _needs_reference(self, command: str) -> ReferenceModel | None:
        """The reference a module-made bundle needs handed over; one line when it is not."""
        if self._reference is not None:
            return self._reference
        if self._bundle.model.source == "module":
            raise CbamDeployError(f"{command} compares with the PyTorch model, and this bundle was exported from a module "
                                  f"in memory ({self._bundle.model.raw.get('module_class')}): pass it again, "
                                  f"cbam_deploy.Bundle({str(self.path)!r}, model=module)")
        return None
