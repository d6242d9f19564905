"""The export job: model (+ checkpoint) -> ONNX -> parity against PyTorch -> bundle with manifest.

``export_bundle`` is what ``cbam-deploy export`` calls. It stages the ONNX file, checks parity on
it and commits it with the new manifest in one transaction (``transaction.BundleUpdate``): an
interrupted, killed or failed export leaves the folder as it was (the old bundle, or nothing). A
parity failure still commits the bundle, with the failure recorded, and the result says so (the
CLI exits non-zero). Artifacts built from a previous ONNX are kept only when the new ONNX is
byte-identical to it; otherwise they and their files are removed, and the result names them.
"""

from __future__ import annotations

import datetime as _dt
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .backends.base import TensorRTOptions
from .bundle import read_manifest
from .cbam_opt import MODES as CBAM_OPT_MODES
from .cbam_opt import optimize_for_export
from .checks import (MAX_BATCH, check_choice, check_existing_file, check_int, check_output_dir, check_output_file,
                     parse_batch, parse_list)
from .data import SYNTHETIC, check_data_source, load_calibration
from .errors import CbamDeployError
from .formats import GATE_POLICIES, PRECISIONS, formats, recipes, root_row
from .manifest import MANIFEST_NAME, ROOT_ARTIFACT, ROOT_FILE, new_manifest
from .models import CodeTrust, LoadedModel, build_model, count_gmacs, from_module, is_factory_spec, source_for
from .models.spec import STEMS, check_input_size, check_model_spec, check_num_classes
from .outputs import check_output_kinds, flatten_outputs, output_kinds, parse_output_kinds
from .parity import TOLERANCES, compare_all, plan_cases, run_parity
from .preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing, preprocessing_options
from .results import EXIT_FAILED_CHECK, EXIT_OK, Result
from .runners.torch import TorchRunner
from .runtimes import select_runtime
from .torch_gates import example_input, find_gates
from .transaction import BundleUpdate, faultpoint



class ExportResult(Result):
    """What ``export`` did: the bundle, its first artifact and that artifact's parity with PyTorch, and,
    when asked for, the INT8 artifacts (``int8``: a ``quantize.QuantizeResult``) or the format x
    precision matrix built, verified and timed (``summary``). Not in its JSON: ``module``, the PyTorch
    model exported, and ``parity_runner``, the runner the parity run opened the ONNX with."""

    command = "export"
    module = None
    parity_runner = None

    @property
    def bundle(self) -> Path:
        return Path(self["bundle"])

    @property
    def parity(self) -> dict:
        return self["parity"]

    @property
    def int8(self):
        return self.get("int8")

    @property
    def summary(self) -> dict | None:
        return self.get("summary")

    @property
    def exit_code(self) -> int:
        return EXIT_FAILED_CHECK if self.failure else EXIT_OK

    @property
    def failure(self) -> str | None:
        if self.passed is False:
            return "parity check failed: the ONNX model does not match PyTorch (recorded in the manifest)"
        if self.int8 is not None and self.int8.passed is False:
            return "an INT8 artifact disagrees with PyTorch beyond tolerance (recorded in the manifest)"
        if self.summary is not None and self.summary.get("passed") is False:
            return "an artifact failed verification (recorded in the manifest)"
        return None


@dataclass
class ExportOptions:
    """Everything ``export`` is asked to do, checked once, here, before any model is built or file
    written: the model (a zoo name or ``file.py:factory``) and its checkpoint, the ONNX export, the
    parity run, and what to build after it (``formats`` x ``precisions``, INT8 with ``int8`` /
    ``calib_data`` / ``targets`` / ``gates``, TensorRT's profile and builder knobs). The CLI builds one
    from its options; a notebook or a test builds one directly. Lists may be given as comma strings."""

    model: str | nn.Module  # a zoo name, FILE.py:FACTORY, or a module in memory (the Python API)
    weights: str | None = None
    num_classes: int | None = None
    stem: str = "imagenet"
    output: str | None = None
    input_size: int | None = None
    batch: int | str | None = None  # None or "dynamic": a dynamic batch
    dynamic_hw: bool = False
    opset: int = 17
    exporter: str = "torchscript"
    simplify: bool = True
    parity: bool = True
    parity_samples: int = 8
    seed: int = 0
    force: bool = False
    outputs: str = "logits"  # zoo models: "logits" (classifier) or "features" (backbone: C2..C5)
    cbam_opt: str = "on"  # CBAM rewrites (cbam_opt.py); "off" exports the module as written
    extra_notes: list[str] = field(default_factory=list)
    # {output name: kind} (or ["NAME=KIND", ...]) over the kind guessed from each output's shape
    output_kinds: dict[str, str] | list[str] | None = None
    # how images are prepared, over the model's own (preprocessing.preprocessing_options: resize, mean, std, ...)
    preprocess: dict | None = None
    # what to build after the ONNX
    formats: str | list[str] = "onnx"
    precisions: str | list[str] = "fp32"
    int8: bool = False
    calib_data: str | None = None
    targets: str | list[str] = "ort-cpu"
    gates: str | None = None
    min_batch: int = 1
    opt_batch: int = 1
    max_batch: int = 8
    workspace_mb: int = 2048
    timing_cache: str | None = None
    dla_core: int | None = None

    name: str | None = None  # a module's name in the manifest (default: its class name)
    trust_code: bool = False  # a model file that holds code (a pickled checkpoint) may run it (--trust-code)

    def __post_init__(self) -> None:
        in_memory = isinstance(self.model, nn.Module)
        if not in_memory and (not isinstance(self.model, str) or not self.model.strip()):
            raise CbamDeployError("--model needs a zoo name (see 'cbam-deploy models'), path/to/file.py:factory, or (in "
                                  "Python) an nn.Module")
        check_model_options(None if in_memory else self.model, self.stem, self.num_classes, self.input_size, self.opset,
                            self.exporter, self.cbam_opt)
        if self.name is not None and (not in_memory or not isinstance(self.name, str) or not self.name.strip()):
            raise CbamDeployError("name is for a module handed over in memory: a non-empty string")
        if isinstance(self.batch, (bool, float)):
            raise CbamDeployError(f"--batch must be 'dynamic' or a positive integer, got {self.batch!r}")
        self.batch = parse_batch(self.batch)
        check_int("parity_samples", self.parity_samples, 1)
        check_choice("--outputs", self.outputs, ("logits", "features"))
        if self.outputs == "features" and (in_memory or is_factory_spec(self.model)):
            raise CbamDeployError("--outputs features is for zoo models; your own model decides its outputs")
        self.output_kinds = parse_output_kinds(self.output_kinds)
        if self.preprocess is not None and not isinstance(self.preprocess, dict):
            raise CbamDeployError("preprocess takes a dict of resize, mean, std, scale, crop_pct, interpolation")
        try:
            self.preprocess = preprocessing_options(**(self.preprocess or {}))
        except TypeError:
            raise CbamDeployError(f"preprocess takes resize, mean, std, scale, crop_pct and interpolation, got "
                                  f"{sorted(self.preprocess)}") from None
        self.format_list = parse_list(self.formats, "--format", formats())
        self.precision_list = parse_list(self.precisions, "--precision", PRECISIONS)
        self.target_list = parse_list(self.targets, "--target", tuple(recipes()))
        if self.gates is not None:
            check_choice("--gates", self.gates, GATE_POLICIES)
        for option, value in (("--min-batch", self.min_batch), ("--opt-batch", self.opt_batch),
                              ("--max-batch", self.max_batch)):
            check_int(option, value, 1, MAX_BATCH)
        if not self.min_batch <= self.opt_batch <= self.max_batch:
            raise CbamDeployError(f"the TensorRT batch profile must satisfy 1 <= --min-batch <= --opt-batch <= "
                                  f"--max-batch, got {self.min_batch}/{self.opt_batch}/{self.max_batch}")
        check_int("--workspace-mb", self.workspace_mb, 1)
        check_int("--dla-core", self.dla_core, 0, allow_none=True)
        if self.timing_cache is not None:
            if Path(self.timing_cache).is_dir():
                raise CbamDeployError(f"--timing-cache {self.timing_cache} is a folder; give a file path")
            check_output_file("--timing-cache", self.timing_cache)
        if (self.int8 or "int8" in self.precision_list) and not self.calib_data:
            flag = "--int8" if self.int8 else "--precision int8"
            raise CbamDeployError(f"{flag} needs --calib-data DIR (images), a .npy/.npz file, or 'synthetic'")
        check_data_source("--calib-data", self.calib_data)
        check_existing_file("--weights", self.weights)
        check_output_dir("--output", self.output)
        if not in_memory:
            check_model_spec(self.model, self.stem)
            source = source_for(self.model)
            why = source.needs_trust(self.model) if source is not None else None
            if why and not self.trust_code:  # refused before any work, in one line
                raise CbamDeployError(f"--model {self.model}: {why}; pass --trust-code to load it (only for a file you "
                                      "trust), or export its weights as a state dict and give its model yaml with "
                                      "--weights")
        if self.int8 and self.builds and "int8" not in self.precision_list:
            self.precision_list.append("int8")  # --int8 with a format x precision matrix: int8 joins the matrix

    @property
    def model_name(self) -> str:
        """The model's name: the zoo name or factory spec, or a module's ``name`` (its class's by default)."""
        if isinstance(self.model, nn.Module):
            return self.name or type(self.model).__name__
        return self.model

    @property
    def builds(self) -> bool:
        """Whether artifacts beyond the ONNX are asked for (a format x precision matrix)."""
        return self.format_list != [root_row().name] or self.precision_list != ["fp32"]

    @property
    def quantize_targets(self) -> list[str]:
        """``--int8`` alone: the INT8 targets to quantize for (with a matrix, int8 is one of its precisions)."""
        return self.target_list if self.int8 and not self.builds else []

    @property
    def trt(self) -> TensorRTOptions:
        return TensorRTOptions(self.min_batch, self.opt_batch, self.max_batch, self.workspace_mb, self.timing_cache,
                               self.dla_core)


def check_model_options(model: str, stem: str = "imagenet", num_classes: int | None = None,
                        input_size: int | None = None, opset: int = 17, exporter: str = "torchscript",
                        cbam_opt: str = "on") -> None:
    """The export's model options (no file access): its stem, the classifier size, the input side for
    that network, the exporter and its opset, the CBAM rewrites."""
    check_choice("--stem", stem, STEMS)
    check_choice("--cbam-opt", cbam_opt, CBAM_OPT_MODES)
    check_num_classes(num_classes)
    check_input_size(input_size, model, stem)
    root_row().check_export_choices(exporter, opset)


def default_output_dir(model_spec: str) -> Path:
    if ":" in model_spec:
        stem = Path(model_spec.rpartition(":")[0]).stem + "_" + model_spec.rpartition(":")[2]
    elif source_for(model_spec) is not None and Path(model_spec).suffix:  # a library's file: its name
        stem = Path(model_spec).stem
    else:
        stem = model_spec
    # a library's spec carries its arguments (timm:resnet50?block_args.attn_layer=cbam): a plain folder name
    return Path("bundles") / re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("_")


def input_spec(loaded: LoadedModel, options, overrides: dict | None = None) -> dict:
    """The manifest's ``input`` for ``loaded`` exported with ``options``: its preprocessing, with what the
    user set (``overrides``) over the model's own."""
    preprocessing = loaded.preprocessing.with_overrides(**(overrides or {}))
    return make_input_spec(options.input_size, shape=options.symbolic_input_shape(), preprocessing=preprocessing)


def make_input_spec(size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD, shape: list | None = None,
                    preprocessing: Preprocessing | None = None) -> dict:
    """The manifest's ``input``: what every consumer needs to feed the model identically."""
    preprocessing = preprocessing or Preprocessing(mean=tuple(mean), std=tuple(std))
    return {
        "name": "input",
        "shape": shape or ["batch", 3, size, size],
        "dtype": "float32",
        "layout": "NCHW",
        "color": "RGB",
        "preprocess": preprocessing.record(size),
    }


def _guard_existing(current: dict | None, out_dir: Path, model_name: str, force: bool) -> None:
    existing = (current or {}).get("model", {}).get("name") if isinstance(current, dict) else None
    if current is None or force or existing == model_name:
        return
    raise CbamDeployError(
        f"{out_dir} already holds a bundle of {existing or 'an unreadable manifest'}; choose another "
        "--output or pass --force to replace it"
    )


def _existing_manifest(out_dir: Path) -> dict | None:
    try:
        return read_manifest(out_dir) if (out_dir / MANIFEST_NAME).exists() else None
    except CbamDeployError:
        return {}  # unreadable: replaced only with --force


def export_bundle(request: ExportOptions) -> ExportResult:
    """Run the whole export; returns the summary that ``--json`` prints, holding also (not in its JSON)
    the PyTorch module it exported (``module``) and the runner its parity ran the ONNX with
    (``parity_runner``), which later steps of the same command reuse.

    The ONNX file is staged and parity-checked inside a ``BundleUpdate``; only a finished export is
    committed, so an interrupted or failed one leaves the folder as it was (the old bundle, or none)."""
    started = time.perf_counter()
    out_dir = Path(request.output) if request.output else default_output_dir(request.model_name)
    _guard_existing(_existing_manifest(out_dir), out_dir, request.model_name, request.force)  # before any work
    if isinstance(request.model, nn.Module):
        loaded = from_module(request.model, request.model_name, request.num_classes, request.input_size or 224,
                             weights=request.weights)
    else:
        loaded = build_model(request.model, request.weights, request.num_classes, request.stem, request.outputs,
                             CodeTrust(trust_bundle=request.trust_code))
    options = root_row().export_options(
        input_size=request.input_size if request.input_size is not None else loaded.default_input_size,
        batch=request.batch,
        dynamic_hw=request.dynamic_hw,
        opset=request.opset,
        exporter=request.exporter,
        simplify=request.simplify,
    )
    loaded.prepare_for(options.input_size, options.dynamic_hw)  # a detector's anchors, before anything traces it
    options.output_kinds = resolve_output_kinds(loaded, request.output_kinds, options) or None
    with BundleUpdate(out_dir, create=True) as update:
        result = _export_into(request, loaded, options, update, started)
    result.module = loaded.module
    return result


def resolve_output_kinds(loaded: LoadedModel, requested: dict[str, str], options) -> dict[str, str]:
    """The output kinds set by hand: those the model declares (an ``output_kinds`` attribute, {name:
    kind}, on a factory's module), overridden by ``--output-kind`` (which also sets right a wrong
    declaration). Each name is checked against the model's outputs (one forward pass) before anything
    is exported or written."""
    requested = parse_output_kinds(requested)
    declared = getattr(loaded.module, "output_kinds", None)
    where = f"output_kinds of {loaded.name}"
    if isinstance(declared, dict):
        declared = {name: kind for name, kind in declared.items() if name not in requested}
    declared = parse_output_kinds(declared, option=where) if declared is not None else {}
    if not declared and not requested:
        return {}
    example = torch.zeros(options.batch or 1, options.in_channels, options.input_size, options.input_size)
    with torch.no_grad():
        names = [name for name, _ in flatten_outputs(loaded.module.eval()(example))]
    check_output_kinds(declared, names, option=where)
    check_output_kinds(requested, names)
    return {**declared, **requested}


def _export_into(request: ExportOptions, loaded: LoadedModel, options, update: BundleUpdate,
                 started: float) -> dict:
    out_dir = update.bundle_dir
    root = root_row()
    staged = update.stage_artifact(root.name, "fp32")
    # every attention gate, found by its structure in the traced model (the manifest lists them; the
    # INT8 policy, attention parity, explain, profile and the rewrites read this one record)
    gates = find_gates(loaded.module, example_input(options.in_channels, options.input_size)).describe()
    exported, rewrites = optimize_for_export(loaded.module, request.cbam_opt, gates)
    info = root.export_root(exported, staged, options)
    info["cbam_opt"] = rewrites  # parity below runs the unmodified module: it checks the rewrites too
    faultpoint("exported")

    parity, candidate = None, None
    spec = input_spec(loaded, options, request.preprocess)
    if request.parity:
        cases = plan_cases(options.input_size, options.batch, options.dynamic_hw, request.parity_samples,
                           loaded.input_stride or 8)
        candidate = select_runtime(root.name, root.reference_runtime).open(staged)
        reference = TorchRunner(loaded.module)
        kinds = output_kinds(info["outputs"])
        parity = run_parity(reference, candidate, cases, "fp32", seed=request.seed, kinds=kinds,
                            preprocess=spec["preprocess"])
        if request.calib_data and request.calib_data != SYNTHETIC:  # the user's own images too
            images = load_calibration(request.calib_data, spec, request.parity_samples, request.seed + 1).inputs
            batch = options.batch or min(len(images), 4)
            images = images[:len(images) // batch * batch] if options.batch else images
            on_images = compare_all(reference.infer_batched(images, batch), candidate.infer_batched(images, batch),
                                    TOLERANCES["fp32"], kinds, side=options.input_size)
            parity["images"] = {"source": request.calib_data, **on_images}
            parity["passed"] = parity["passed"] and on_images["passed"]
    faultpoint("parity-done")

    model_info = loaded.describe()
    model_info["gates"] = gates
    try:
        model_info["gflops"] = round(count_gmacs(loaded.module, options.input_size), 3)
        model_info["gflops_input_size"] = options.input_size
    except Exception:  # a user's factory model may not run on the counter; the count is optional
        model_info["gflops"] = None
    model_info["notes"] = model_info["notes"] + request.extra_notes
    manifest = new_manifest(model_info, spec, info["outputs"])
    manifest["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    if loaded.labels:
        manifest["labels"] = list(loaded.labels)
    artifact = update.add_artifact(root.name, "fp32", export=info,
                                   parity=parity if parity is not None else {"passed": None, "skipped": "--no-parity"})
    manifest["artifacts"] = [artifact]  # first: the artifact commands take when none is named
    dropped: list[str] = []

    def replace(current: dict | None) -> dict:
        _guard_existing(current, out_dir, loaded.name, request.force)  # another export may have landed meanwhile
        kept = derived_artifacts_to_keep(current, artifact["sha256"]) if current and not request.force else []
        dropped.extend(a["name"] for a in (current or {}).get("artifacts", [])
                       if a["name"] != ROOT_ARTIFACT and a not in kept)
        manifest["artifacts"] += kept
        return manifest

    update.commit(replace)
    if dropped:
        model_info["notes"].append(f"removed {', '.join(dropped)}: built from the previous ONNX, which this export "
                                   "replaced; rebuild them (quantize / export --format)")
    result = ExportResult({
        "bundle": str(out_dir),
        "manifest": str(out_dir / MANIFEST_NAME),
        "model": model_info,
        "artifacts": [{"name": artifact["name"], "path": str(out_dir / ROOT_FILE), "format": root.name, "precision": "fp32",
                       "size_bytes": artifact["size_bytes"], "sha256": artifact["sha256"]}],
        "export": info,
        "parity": artifact["parity"],
        "passed": parity["passed"] if parity is not None else None,
        "removed_artifacts": dropped,
        "seconds": round(time.perf_counter() - started, 3),
    })
    result.parity_runner = candidate  # the ONNX as the parity run opened it (loaded in memory: still valid)
    return result


def derived_artifacts_to_keep(current: dict, new_onnx_sha: str) -> list[dict]:
    """Artifacts built from the bundle's FP32 ONNX stay only when the new ONNX is byte-identical to the
    one they were built from (``source_sha256``)."""
    artifacts = current.get("artifacts", [])
    return [a for a in artifacts if a["name"] != ROOT_ARTIFACT and a.get("source_sha256") == new_onnx_sha]
