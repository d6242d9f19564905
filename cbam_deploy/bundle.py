"""The bundle: one folder of artifacts plus ``manifest.json``; read, write (atomically), validate, look up.

Every later step (verify, bench, eval, serve, triton) reads a bundle and nothing else, through a
``Bundle``: ``Bundle.open(path)`` reads the manifest (crash recovery, the shared lock and the schema
check as ``read_manifest`` does them) and gives typed views of it (``input``, ``outputs``, ``model``,
``artifacts``) and the lookups every command needs (``artifact``, ``path_of``, ``check_integrity``).
A ``Bundle`` is read-only: changes go through ``transaction.BundleUpdate``, whose ``add_artifact``
makes an artifact's record (name, file, sha256, size) from the one naming scheme below. An artifact
whose file no longer matches the sha256 in the manifest is refused, so a half-finished write can
never be trusted.
"""

from __future__ import annotations

import functools
import json
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__
from .errors import CbamDeployError
from .fsutil import UnsafePath, copy_checked, open_no_follow, resolve_inside, sha256_file, sha256_no_follow
from .options import shorten
from .outputs import OUTPUT_KINDS

MANIFEST_NAME = "manifest.json"
SCHEMA_VERSION = 1
_REQUIRED = ("schema_version", "model", "input", "outputs", "artifacts", "versions")
MAX_DEPTH = 32  # the schema nests 4 deep; records that commands add (export, parity, verify) a few more
MAX_MANIFEST_BYTES = 64 << 20


def library_versions() -> dict:
    versions = {"python": platform.python_version(), "cbam_deploy": __version__}
    for name in ("torch", "onnx", "onnxruntime", "onnxslim"):
        try:
            module = __import__(name)
            versions[name] = getattr(module, "__version__", "unknown")
        except ImportError:
            versions[name] = None
    return versions


def new_manifest(model: dict, input_spec: dict, outputs: list[dict]) -> dict:
    return {
        "schema_version": SCHEMA_VERSION,
        "model": model,
        "input": input_spec,
        "outputs": outputs,
        "artifacts": [],
        "versions": library_versions(),
    }


def write_manifest(bundle_dir: str | Path, manifest: dict) -> Path:
    """Replace the manifest as a whole (one transaction). Commands merge their change instead, with
    ``transaction.BundleUpdate.commit``."""
    from .transaction import update_manifest

    update_manifest(bundle_dir, lambda _current: manifest)
    return Path(bundle_dir) / MANIFEST_NAME


def read_manifest(bundle_dir: str | Path) -> dict:
    """The bundle's committed manifest. Whatever a killed command left is finished or discarded first
    (see ``transaction``), and the read happens under the bundle's shared lock, so it never sees a
    commit half-applied."""
    from .transaction import bundle_lock, recover_if_needed

    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        return read_manifest_file(bundle_dir)
    recover_if_needed(bundle_dir)  # may complete a first export killed after its commit point
    if not (bundle_dir / MANIFEST_NAME).is_file():
        raise CbamDeployError(f"{bundle_dir} is not a bundle: no {MANIFEST_NAME} (make one with 'cbam-deploy export')")
    with bundle_lock(bundle_dir, shared=True):
        return read_manifest_file(bundle_dir / MANIFEST_NAME)


def read_manifest_file(path: Path) -> dict:
    """The manifest in file ``path``: a regular file (not a symbolic link), at most
    ``MAX_MANIFEST_BYTES``, JSON nested at most ``MAX_DEPTH`` deep, valid against the schema."""
    if not path.is_file() and not path.is_symlink():
        raise CbamDeployError(f"{path} is not a bundle: no {MANIFEST_NAME} (make one with 'cbam-deploy export')")
    try:
        with open(open_no_follow(path), "rb", closefd=True) as handle:
            data = handle.read(MAX_MANIFEST_BYTES + 1)
        if len(data) > MAX_MANIFEST_BYTES:
            raise CbamDeployError(f"cannot read {path}: larger than {MAX_MANIFEST_BYTES >> 20} MiB, not a manifest")
        manifest = json.loads(data.decode("utf-8"))
    except UnsafePath as exc:
        raise CbamDeployError(f"cannot read {path}: {exc}; a bundle's files must be plain files inside it") from None
    except RecursionError:
        raise CbamDeployError(f"cannot read {path}: JSON nested deeper than {MAX_DEPTH} levels") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CbamDeployError(f"cannot read {path}: {exc}") from None
    if _depth(manifest) > MAX_DEPTH:
        raise CbamDeployError(f"cannot read {path}: JSON nested deeper than {MAX_DEPTH} levels")
    validate_manifest(manifest, path)
    return manifest


def _depth(value) -> int:
    """How deep a parsed JSON value nests (iterative: a deep value cannot exhaust the stack here)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            if depth > MAX_DEPTH:
                return depth
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def validate_manifest(manifest: dict, where: Path | str = MANIFEST_NAME) -> None:
    """Check the manifest against its schema: every field that cbam-deploy reads, with its type.

    A hand-edited or damaged manifest (``"artifacts": 5``, ``"size_bytes": "x"``, ``"input": {}``)
    gives one error naming the field (``artifacts[0].size_bytes``), never a traceback later on.
    Unknown extra fields are allowed (newer versions add some).
    """
    if not isinstance(manifest, dict):
        raise CbamDeployError(f"{where} is not a JSON object (got {_json_type(manifest)})")
    missing = [k for k in _REQUIRED if k not in manifest]
    if missing:
        raise CbamDeployError(f"{where} lacks {', '.join(missing)}; re-export the bundle")
    check = _SchemaCheck(where)
    version = manifest["schema_version"]
    if not _is_int(version):
        check.fail("schema_version", "an integer", version)
    if version != SCHEMA_VERSION:
        raise CbamDeployError(f"{where} has schema version {version}; this cbam-deploy reads {SCHEMA_VERSION}")

    model = check.field(manifest, "model", "", _is_dict, "an object")
    check.field(model, "name", "model.", _is_text, "a non-empty string")
    check.field(model, "source", "model.", lambda v: v in ("zoo", "factory"), "'zoo' or 'factory'")
    check.field(model, "stem", "model.", _is_text, "a non-empty string")
    check.field(model, "num_classes", "model.", _is_positive_int, "a positive integer or null", nullable=True)
    check.field(model, "parameters", "model.", lambda v: _is_int(v) and v >= 0, "a non-negative integer", required=False)
    check.field(model, "gflops", "model.", _is_number, "a number or null", required=False, nullable=True)
    check.field(model, "factory", "model.", _is_text, "a non-empty string", required=False)
    check.field(model, "factory_sha256", "model.", _is_text, "a sha256 string", required=False)
    check.field(model, "init", "model.", _is_dict, "an object", required=False, nullable=True)
    check.field(model, "notes", "model.", lambda v: isinstance(v, list) and all(isinstance(n, str) for n in v),
                "a list of strings", required=False)
    weights = check.field(model, "weights", "model.", _is_dict, "an object or null", required=False, nullable=True)
    if weights is not None:
        check.field(weights, "path", "model.weights.", _is_text, "a non-empty string")
        check.field(weights, "sha256", "model.weights.", _is_text, "a non-empty string")
    gates = check.field(model, "gates", "model.", _is_dict, "an object", required=False)
    if gates is not None:
        listed = check.field(gates, "gates", "model.gates.", _is_list, "a list")
        for i, gate in enumerate(listed):
            check.item(gate, f"model.gates.gates[{i}]", _is_dict, "an object")
            check.field(gate, "name", f"model.gates.gates[{i}].", _is_text, "a non-empty string")
            check.field(gate, "kind", f"model.gates.gates[{i}].", lambda v: v in ("channel", "spatial", "joint"),
                        "'channel', 'spatial' or 'joint'")

    spec = check.field(manifest, "input", "", _is_dict, "an object")
    check.field(spec, "name", "input.", _is_text, "a non-empty string")
    shape = check.field(spec, "shape", "input.", lambda v: isinstance(v, list) and len(v) == 4,
                        "a list of 4 dimensions (N, C, H, W)")
    for i, dim in enumerate(shape):
        check.item(dim, f"input.shape[{i}]", lambda v: _is_positive_int(v) or _is_text(v),
                   "a positive integer or a dimension name")
    if not _is_positive_int(shape[1]):
        check.fail("input.shape[1]", "the channel count (a positive integer)", shape[1])
    for key in ("dtype", "layout", "color"):
        check.field(spec, key, "input.", _is_text, "a non-empty string", required=False)
    pre = check.field(spec, "preprocess", "input.", _is_dict, "an object")
    for key in ("resize_shorter", "center_crop"):
        check.field(pre, key, "input.preprocess.", lambda v: _is_number(v) and v >= 1 and v == int(v),
                    "a positive whole number")
    check.field(pre, "interpolation", "input.preprocess.", lambda v: v in _INTERPOLATIONS,
                f"one of {', '.join(_INTERPOLATIONS)}", required=False)
    check.field(pre, "scale", "input.preprocess.", lambda v: _is_number(v) and v > 0, "a positive number", required=False)
    mean = check.field(pre, "mean", "input.preprocess.", _is_number_list, "a non-empty list of numbers")
    std = check.field(pre, "std", "input.preprocess.", lambda v: _is_number_list(v) and all(x > 0 for x in v),
                      "a non-empty list of positive numbers")
    if len(mean) != len(std):
        check.fail("input.preprocess.std", f"as long as input.preprocess.mean ({len(mean)})", std)

    outputs = check.field(manifest, "outputs", "", lambda v: isinstance(v, list) and len(v) > 0, "a non-empty list")
    for i, output in enumerate(outputs):
        check.item(output, f"outputs[{i}]", _is_dict, "an object")
        check.field(output, "name", f"outputs[{i}].", _is_text, "a non-empty string")
        dims = check.field(output, "shape", f"outputs[{i}].", _is_list, "a list")
        for j, dim in enumerate(dims):
            check.item(dim, f"outputs[{i}].shape[{j}]", lambda v: _is_positive_int(v) or _is_text(v),
                       "a positive integer or a dimension name")
        check.field(output, "dtype", f"outputs[{i}].", _is_text, "a non-empty string", required=False)
        check.field(output, "kind", f"outputs[{i}].", lambda v: v in OUTPUT_KINDS, f"one of {', '.join(OUTPUT_KINDS)}",
                    required=False)

    artifacts = check.field(manifest, "artifacts", "", _is_list, "a list")
    names = []
    for i, artifact in enumerate(artifacts):
        at = f"artifacts[{i}]"
        check.item(artifact, at, _is_dict, "an object")
        for key in ("name", "path", "format", "precision", "sha256"):
            check.field(artifact, key, f"{at}.", _is_text, "a non-empty string")
        names.append(artifact["name"])
        _check_inside(where, artifact["path"], f"artifact path {artifact['path']!r}")
        check.field(artifact, "size_bytes", f"{at}.", lambda v: _is_int(v) and v >= 0, "a non-negative integer",
                    required=False)
        companions = check.field(artifact, "companion_files", f"{at}.", _is_dict, "an object", required=False)
        for relative, digest in (companions or {}).items():
            check.item(digest, f"{at}.companion_files[{relative!r}]", _is_text, "a sha256 string")
            _check_inside(where, relative, f"companion file {relative!r} of artifact {artifact['name']!r}")
        parity = check.field(artifact, "parity", f"{at}.", _is_dict, "an object", required=False)
        if parity is not None:
            check.field(parity, "passed", f"{at}.parity.", lambda v: isinstance(v, bool), "true, false or null",
                        required=False, nullable=True)
        for key in ("export", "quantization", "calibration", "verify"):
            check.field(artifact, key, f"{at}.", _is_dict, "an object", required=False, nullable=True)
    if len(set(names)) != len(names):
        repeated = sorted({n for n in names if names.count(n) > 1})
        raise CbamDeployError(f"{where}: artifact names repeat ({', '.join(repeated)})")

    check.field(manifest, "versions", "", _is_dict, "an object")
    check.field(manifest, "labels", "", lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
                "a list of strings", required=False, nullable=True)
    check.field(manifest, "created", "", _is_text, "a string", required=False)


_INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


class _SchemaCheck:
    """Type checks that raise one CbamDeployError naming the field (``artifacts[1].size_bytes``)."""

    def __init__(self, where) -> None:
        self.where = where

    def fail(self, field: str, expected: str, value) -> None:
        raise CbamDeployError(
            f"{self.where}: {field} must be {expected}, got {_shown(value)}; the manifest is damaged or was edited "
            "by hand: re-export the bundle"
        )

    def item(self, value, field: str, ok, expected: str) -> None:
        if not ok(value):
            self.fail(field, expected, value)

    def field(self, obj: dict, key: str, prefix: str, ok, expected: str, required: bool = True, nullable: bool = False):
        if key not in obj:
            if required:
                raise CbamDeployError(f"{self.where}: {prefix}{key} is missing ({expected}); re-export the bundle")
            return None
        value = obj[key]
        if value is None and nullable:
            return None
        if not ok(value):
            self.fail(prefix + key, expected, value)
        return value


def _check_inside(where, relative: str, what: str) -> None:
    if Path(relative).is_absolute() or ".." in Path(relative).parts:
        raise CbamDeployError(f"{where}: {what} must stay inside the bundle")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_positive_int(value) -> bool:
    return _is_int(value) and value >= 1


def _is_number(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and value == value and value not in (float("inf"), float("-inf")))


def _is_number_list(value) -> bool:
    return isinstance(value, list) and len(value) > 0 and all(_is_number(v) for v in value)


def _is_text(value) -> bool:
    return isinstance(value, str) and value.strip() != ""


def _is_dict(value) -> bool:
    return isinstance(value, dict)


def _is_list(value) -> bool:
    return isinstance(value, list)


def _json_type(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number"}.get(
        type(value), type(value).__name__)


def _shown(value) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{text} ({_json_type(value)})"


# ---------------------------------------------------------------- naming

QUANTIZED_FORMAT = {"ort-cpu": "onnx", "tensorrt": "onnx", "openvino": "openvino"}  # INT8 recipe -> what it writes


def artifact_name(fmt: str, precision: str, recipe: str | None = None, gates: str | None = None) -> str:
    """The one naming scheme: ``<format>-<precision>`` for conversions (onnx-fp32, openvino-fp16,
    tensorrt-int8); ``int8-<recipe>`` for a quantization recipe's output, ``-gates-<policy>`` added
    when the gate policy is not the recipe's default."""
    if recipe is None:
        return f"{fmt}-{precision}"
    from .calib.recipes import DEFAULT_GATES

    gates = gates or DEFAULT_GATES[recipe]
    return f"int8-{recipe}" + ("" if gates == DEFAULT_GATES[recipe] else f"-gates-{gates}")


def artifact_file(name: str, fmt: str) -> str:
    """``model.onnx`` for the FP32 ONNX, ``model.<artifact name>.<onnx|xml|engine>`` for the rest."""
    from .backends import get

    return "model.onnx" if name == "onnx-fp32" else f"model.{name}.{get(fmt).extension}"


def artifact_record(root: str | Path, fmt: str, precision: str, recipe: str | None = None, gates: str | None = None,
                    **fields) -> dict:
    """The manifest record of the artifact (``fmt``, ``precision``[, INT8 ``recipe``, ``gates``]) whose file
    lies in ``root`` (a staging folder) under the name the naming scheme gives it: name, path, format,
    precision, sha256, and the size of its file and its companions (the files the backend table says
    lie beside it: an IR's .bin, an engine's sidecar, an ONNX's external data), each with its sha256.
    ``transaction.BundleUpdate.add_artifact`` is how commands use it."""
    from .backends import get

    root = Path(root)
    name = artifact_name(fmt, precision, recipe, gates)
    path = artifact_file(name, fmt)
    if not (root / path).is_file():
        raise CbamDeployError(f"artifact {name}: its file {path} was not written")
    companions = tuple(get(fmt).companions(root / path))
    for companion in companions:
        _check_inside(root, companion, f"companion file {companion!r} of artifact {name!r}")
    missing = [c for c in companions if not (root / c).is_file()]
    if missing:
        raise CbamDeployError(f"artifact {name}: its companion file(s) {', '.join(missing)} were not written")
    record = {"name": name, "path": path, "format": fmt, "precision": precision, "sha256": sha256_file(root / path),
              "size_bytes": sum((root / f).stat().st_size for f in (path, *companions))}
    if companions:
        record["companion_files"] = {c: sha256_file(root / c) for c in companions}
    record.update(fields)
    return record


def upsert_artifact(manifest: dict, artifact: dict) -> None:
    """Add an artifact, replacing one of the same name."""
    manifest["artifacts"] = [a for a in manifest["artifacts"] if a["name"] != artifact["name"]] + [artifact]


# ---------------------------------------------------------------- typed views of a manifest

@dataclass(frozen=True)
class Preprocess:
    """How an image becomes the model's input: resize the shorter side, centre-crop, scale, normalise."""

    resize_shorter: int
    center_crop: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"
    scale: float = 1 / 255

    @classmethod
    def from_dict(cls, raw: dict) -> Preprocess:
        return cls(int(raw["resize_shorter"]), int(raw["center_crop"]), tuple(raw["mean"]), tuple(raw["std"]),
                   raw.get("interpolation", "bilinear"), float(raw.get("scale", 1 / 255)))


@dataclass(frozen=True)
class InputSpec:
    """The model's one input. ``shape`` is (N, C, H, W): each an integer or a dimension name
    ("batch", "height", "width") where the model takes any size. ``raw`` is the manifest's own
    dict, for the data layer (``data.load_calibration``, ``data.load_image_file``) that takes it as is."""

    name: str
    shape: list
    dtype: str = "float32"
    layout: str = "NCHW"
    color: str = "RGB"
    preprocess: Preprocess | None = None
    raw: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dict(cls, raw: dict) -> InputSpec:
        pre = raw.get("preprocess")
        return cls(raw["name"], list(raw["shape"]), raw.get("dtype", "float32"), raw.get("layout", "NCHW"),
                   raw.get("color", "RGB"), Preprocess.from_dict(pre) if pre is not None else None, raw)

    @property
    def fixed_batch(self) -> int | None:
        """The batch a fixed-batch model was exported with; None for a dynamic batch."""
        return self.shape[0] if isinstance(self.shape[0], int) else None

    @property
    def channels(self) -> int:
        return self.shape[1]

    @property
    def dynamic_hw(self) -> bool:
        return len(self.shape) > 2 and isinstance(self.shape[2], str)

    @property
    def side(self) -> int:
        """The input's side in pixels (the centre crop; the size a dynamic-H/W model was exported at)."""
        if self.preprocess is None:
            raise CbamDeployError("the manifest's input has no preprocess section; re-export the bundle")
        return self.preprocess.center_crop


@dataclass(frozen=True)
class OutputSpec:
    """One model output. ``kind``: ``logits`` (classification: judged on top-1 too), ``dense`` (maps,
    features, embeddings: cosine and element-wise bounds) or ``other`` (element-wise bounds)."""

    name: str
    shape: list
    dtype: str = "float32"
    kind: str = "logits"

    @classmethod
    def from_dict(cls, raw: dict) -> OutputSpec:
        return cls(raw["name"], list(raw["shape"]), raw.get("dtype", "float32"), raw.get("kind", "logits"))


@dataclass(frozen=True)
class Weights:
    path: str
    sha256: str


@dataclass(frozen=True)
class ModelInfo:
    """What the bundle's model is and how to rebuild it (``spec``, ``weights`` or the seeded ``init``)."""

    name: str
    source: str = "zoo"
    stem: str = "imagenet"
    num_classes: int | None = None
    factory: str | None = None
    factory_sha256: str | None = None
    weights: Weights | None = None
    init: dict | None = None
    outputs_mode: str | None = None
    gates: dict | None = None  # what the gate finder found in the PyTorch model (``gates.GateReport``)
    parameters: int | None = None
    notes: list = field(default_factory=list)
    raw: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dict(cls, raw: dict) -> ModelInfo:
        weights = raw.get("weights")
        return cls(raw["name"], raw.get("source", "zoo"), raw.get("stem", "imagenet"), raw.get("num_classes"),
                   raw.get("factory"), raw.get("factory_sha256"),
                   Weights(weights["path"], weights["sha256"]) if weights else None,
                   raw.get("init"), raw.get("outputs_mode"), raw.get("gates"),
                   raw.get("parameters"), list(raw.get("notes") or []), raw)

    @property
    def spec(self) -> str:
        """What ``models.build_model`` takes: the factory (absolute path) or the zoo name."""
        return self.factory or self.name

    @property
    def gate_list(self) -> list[dict] | None:
        """The model's gates as the finder recorded them; None when the manifest has no record (an
        older bundle) or the model could not be traced: the exported graphs are then searched alone."""
        if not self.gates or self.gates.get("error"):
            return None
        return list(self.gates.get("gates") or [])

    @property
    def trained(self) -> bool:
        """Whether the model has a checkpoint (a random-init model's top-1 says nothing)."""
        return self.weights is not None


@dataclass(frozen=True)
class ArtifactRecord:
    """One artifact of the manifest. ``path`` and the keys of ``companion_files`` are relative to the
    bundle folder; ``raw`` is the manifest's own record (for JSON output and the per-artifact helpers
    of ``exporters.tensorrt`` and ``serve.triton``)."""

    name: str
    path: str
    format: str
    precision: str
    sha256: str
    size_bytes: int | None = None
    companion_files: dict = field(default_factory=dict)
    source_sha256: str | None = None
    export: dict | None = None
    parity: dict | None = None
    quantization: dict | None = None
    calibration: dict | None = None
    verify: dict | None = None
    raw: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dict(cls, raw: dict) -> ArtifactRecord:
        return cls(raw["name"], raw["path"], raw["format"], raw["precision"], raw["sha256"], raw.get("size_bytes"),
                   dict(raw.get("companion_files") or {}), raw.get("source_sha256"), raw.get("export"),
                   raw.get("parity"), raw.get("quantization"), raw.get("calibration"), raw.get("verify"), raw)

    @property
    def files(self) -> dict[str, str]:
        """{file relative to the bundle: sha256} for the artifact's file and its companions."""
        return {self.path: self.sha256, **self.companion_files}


class Bundle:
    """A bundle as read: its folder and its manifest, with typed views and lookups.

    ``Bundle.open(path)`` reads and checks the manifest (``read_manifest``); ``Bundle.of(x)`` takes a
    ``Bundle``, a path or a manifest dict (what older callers pass), so functions can accept all three.
    Read-only: ``manifest`` is the raw dict for JSON output; every change goes through
    ``transaction.BundleUpdate``.
    """

    def __init__(self, manifest: dict, directory: str | Path | None = None) -> None:
        self.manifest = manifest
        self.directory = Path(directory) if directory is not None else None
        self._companions_checked: dict[tuple[str, str], list[str]] = {}

    @classmethod
    def open(cls, path: str | Path) -> Bundle:
        """The bundle in folder ``path`` (or of the manifest file ``path``): recovered from a killed
        command if need be, read under the shared lock, checked against the schema."""
        path = Path(path)
        manifest = read_manifest(path)
        return cls(manifest, path if path.is_dir() else path.parent)

    @classmethod
    def of(cls, source: Bundle | dict | str | Path, directory: str | Path | None = None) -> Bundle:
        if isinstance(source, Bundle):
            return source if directory is None or source.directory is not None else cls(source.manifest, directory)
        if isinstance(source, dict):
            return cls(source, directory)
        return cls.open(source)

    def __repr__(self) -> str:
        return f"Bundle({str(self.directory)!r}, model={self.manifest.get('model', {}).get('name')!r})"

    # ------------------------------------------------------------ typed views

    @functools.cached_property
    def input(self) -> InputSpec:
        return InputSpec.from_dict(self.manifest["input"])

    @functools.cached_property
    def outputs(self) -> list[OutputSpec]:
        return [OutputSpec.from_dict(o) for o in self.manifest["outputs"]]

    @functools.cached_property
    def model(self) -> ModelInfo:
        return ModelInfo.from_dict(self.manifest["model"])

    @functools.cached_property
    def artifacts(self) -> list[ArtifactRecord]:
        return [ArtifactRecord.from_dict(a) for a in self.manifest["artifacts"]]

    @property
    def artifact_names(self) -> list[str]:
        return [a["name"] for a in self.manifest["artifacts"]]

    @property
    def labels(self) -> list[str] | None:
        return self.manifest.get("labels")

    @property
    def fixed_batch(self) -> int | None:
        """The batch size a fixed-batch model was exported with; None for a dynamic batch."""
        return self.input.fixed_batch

    @property
    def output_kinds(self) -> dict[str, str]:
        """{output name: kind}, what the parity checks judge each output by."""
        return {o.name: o.kind for o in self.outputs}

    @property
    def classification_output(self) -> OutputSpec | None:
        """The one logits output of a classifier; None for detectors, segmenters, backbones, embedders."""
        outputs = self.outputs
        return outputs[0] if len(outputs) == 1 and outputs[0].kind == "logits" else None

    @property
    def cbam_opt(self) -> dict:
        """What ``--cbam-opt`` rewrote at export (``cbam_opt.optimize_for_export``'s record); bundles
        exported before the option existed were exported as written."""
        source = next((a for a in self.artifacts if a.name == "onnx-fp32"), None)
        record = (source.export or {}).get("cbam_opt") if source else None
        return record or {"mode": "off", "rewrites": [], "note": "exported before --cbam-opt existed"}

    # ------------------------------------------------------------ lookups

    def has_artifact(self, name: str) -> bool:
        return name in self.artifact_names

    def artifact(self, name: str | None = None) -> ArtifactRecord:
        """The artifact called ``name`` (the first one when None); the error names those there are."""
        artifacts = self.artifacts
        if not artifacts:
            raise CbamDeployError(f"bundle {self.directory} has no artifacts")
        if name is None:
            return artifacts[0]
        for artifact in artifacts:
            if artifact.name == name:
                return artifact
        raise CbamDeployError(f"bundle {self.directory} has no artifact {name!r}; it has "
                              f"{', '.join(a.name for a in artifacts)}")

    def resolve(self, relative: str) -> Path:
        """The one rule for every file read from a bundle: ``relative`` (a path the manifest names) as a
        path inside the bundle folder that is a regular file, reached without a symbolic link (the
        file's own or a folder's on the way) and without leaving the folder. A bundle from elsewhere is
        untrusted input: whatever its manifest says, nothing outside it is read."""
        try:
            return resolve_inside(self._folder(), relative)
        except UnsafePath as exc:
            raise CbamDeployError(f"bundle {self._folder()}: {exc}; a bundle's files must be plain files inside "
                                  "it (re-export it, or copy it without links)") from None

    def path_of(self, name: str | None = None, verify_hash: bool = True) -> Path:
        """The file of artifact ``name`` (the first when None), present, inside the bundle (``resolve``)
        and, with ``verify_hash``, its file and companions matching the sha256 in the manifest."""
        artifact = self.artifact(name)
        folder = self._folder()
        try:
            path = self.resolve(artifact.path)
        except FileNotFoundError:
            raise CbamDeployError(f"artifact {artifact.name} is missing its file {folder / artifact.path}; re-export "
                                  "the bundle") from None
        for relative, digest in artifact.files.items():
            try:
                file = self.resolve(relative)
                intact = not verify_hash or sha256_no_follow(file) == digest
            except (FileNotFoundError, UnsafePath):
                intact = False
            if not intact:
                raise CbamDeployError(
                    f"artifact {artifact.name} ({folder / relative}) does not match the sha256 in the manifest: it was "
                    "changed or its write did not finish; rebuild it"
                )
        if verify_hash:  # an intact file: what it makes its runtime open must be recorded too
            self._check_companions(artifact, path)
        return path

    def _check_companions(self, artifact: ArtifactRecord, path: Path) -> None:
        undeclared = self._undeclared_companions(artifact, path)
        if undeclared:
            raise CbamDeployError(f"artifact {artifact.name}: its file refers to {shorten(undeclared[0])}, which the "
                                  "manifest does not record; a bundle's files must be plain files inside it, each with "
                                  "its sha256 (re-export the bundle)")

    def _undeclared_companions(self, artifact: ArtifactRecord, path: Path) -> list[str]:
        """Files the artifact's own file makes its runtime open (an ONNX's external data, an IR's .bin)
        that exist but that the manifest does not list with a sha256: a crafted ONNX could point them
        anywhere. Read once per artifact version."""
        from .backends import get

        key = (artifact.name, artifact.sha256)
        if key not in self._companions_checked:
            try:
                wanted = get(artifact.format).companions(path)
            except CbamDeployError:
                raise
            except Exception as exc:  # a file the format's reader cannot parse: the runtime would fail too
                raise CbamDeployError(f"artifact {artifact.name}: cannot read {path}: {str(exc)[:200]}") from None
            # one that is not there cannot be read (the runtime will say it is missing); one that is there
            # (a file, a link) but not recorded with its sha256 is refused
            self._companions_checked[key] = [c for c in wanted if c not in artifact.companion_files
                                             and os.path.lexists(path.parent / c)]
        return self._companions_checked[key]

    def check_integrity(self) -> dict[str, str]:
        """Per artifact: 'ok', 'changed' (a file no longer matches its sha256), 'missing', or 'unsafe'
        (a file is a symbolic link, or not a regular file: ``resolve`` refuses it)."""
        states = {}
        for artifact in self.artifacts:
            state = "ok"
            for relative, digest in artifact.files.items():
                try:
                    if sha256_no_follow(self.resolve(relative)) != digest:
                        state = "changed" if state == "ok" else state
                except FileNotFoundError:
                    state = "missing" if state in ("ok", "changed") else state
                except CbamDeployError:
                    state = "unsafe"
                except (OSError, UnsafePath):  # unreadable: as good as missing
                    state = "missing" if state in ("ok", "changed") else state
            if state == "ok":
                try:
                    state = "unsafe" if self._undeclared_companions(artifact, self.resolve(artifact.path)) else "ok"
                except CbamDeployError:
                    state = "unsafe"
            states[artifact.name] = state
        return states

    def copy_file(self, relative: str, target: Path) -> None:
        """Copy a file the manifest names (an artifact's or a companion's) to ``target``: resolved by
        the one rule, read once, and what is written is exactly what matched the recorded sha256."""
        digest = next((d for a in self.artifacts for f, d in a.files.items() if f == relative), None)
        if digest is None:
            raise CbamDeployError(f"bundle {self._folder()}: the manifest names no file {relative}")
        try:
            source = self.resolve(relative)
            intact = copy_checked(source, target, digest)
        except FileNotFoundError:
            raise CbamDeployError(f"bundle {self._folder()}: {relative} is missing; re-export the bundle") from None
        except UnsafePath as exc:
            raise CbamDeployError(f"bundle {self._folder()}: {exc}; a bundle's files must be plain files inside "
                                  "it") from None
        if not intact:
            raise CbamDeployError(f"bundle {self._folder()}: {relative} does not match the sha256 in the manifest: it "
                                  "was changed or replaced; rebuild it")

    @property
    def files(self) -> set[str]:
        """Every file the manifest names (artifacts and their companions), relative to the bundle."""
        return {f for artifact in self.artifacts for f in artifact.files}

    def fit_to_batch(self, inputs, preferred: int = 8):
        """(inputs, batch) ready to run: a fixed-batch model takes only its own batch, so the inputs are
        cut to a multiple of it; a dynamic one runs in chunks of ``preferred``."""
        fixed = self.fixed_batch
        if fixed is None:
            return inputs, preferred
        usable = len(inputs) // fixed * fixed
        if usable == 0:
            raise CbamDeployError(f"the model has a fixed batch of {fixed}; only {len(inputs)} samples were given")
        return inputs[:usable], fixed

    def snapshot(self, name: str, update) -> tuple[ArtifactRecord, Path]:
        """Link (or copy) an artifact's file into a ``BundleUpdate``'s staging folder and check its sha256
        there: work that reads it for minutes sees one version, whatever lands in the bundle meanwhile."""
        artifact = self.artifact(name)
        self.path_of(name, verify_hash=False)
        # its own folder, files under their own names: an ONNX finds its external-data companions
        # beside it, and nothing here is a file the commit would move into the bundle
        folder = update.path(".source-" + name)
        folder.mkdir(exist_ok=True)
        for relative, digest in artifact.files.items():
            copy = folder / relative
            copy.parent.mkdir(parents=True, exist_ok=True)
            try:
                source = self.resolve(relative)  # a regular file inside the bundle, no link on the way
                os.link(source, copy, follow_symlinks=False)
                intact = sha256_no_follow(copy) == digest
            except FileNotFoundError:
                raise CbamDeployError(f"artifact {name}: {self._folder() / relative} is missing; run the command that "
                                      "built it again") from None
            except (OSError, UnsafePath):
                copy.unlink(missing_ok=True)
                try:
                    intact = copy_checked(self.resolve(relative), copy, digest)
                except UnsafePath as exc:
                    raise CbamDeployError(f"artifact {name}: {exc}; a bundle's files must be plain files inside it") \
                        from None
            if not intact:
                raise CbamDeployError(f"artifact {name} ({self._folder() / relative}) does not match the sha256 in the "
                                      "manifest: it was changed or replaced meanwhile; run the command again")
        self._check_companions(artifact, folder / artifact.path)
        return artifact, folder / artifact.path

    def _folder(self) -> Path:
        if self.directory is None:
            raise CbamDeployError("this manifest was given without its bundle folder, so its files cannot be found")
        return self.directory


# ---------------------------------------------------------------- functions over a manifest dict or a Bundle

def fixed_batch(manifest: Bundle | dict) -> int | None:
    """The batch size a fixed-batch model was exported with; None for a dynamic batch."""
    if isinstance(manifest, Bundle):
        return manifest.fixed_batch
    first = manifest["input"]["shape"][0]
    return first if isinstance(first, int) else None


def artifact_path(bundle_dir: str | Path, manifest: Bundle | dict, name: str | None = None,
                  verify_hash: bool = True) -> tuple[dict, Path]:
    """Look up an artifact (the first one when no name is given) and check its file's sha256; returns
    its manifest record and its file (``Bundle.artifact`` and ``Bundle.path_of`` in one)."""
    bundle = Bundle(_raw(manifest), bundle_dir)
    path = bundle.path_of(name, verify_hash)
    return bundle.artifact(name).raw, path


def _raw(manifest: Bundle | dict) -> dict:
    return manifest.manifest if isinstance(manifest, Bundle) else manifest
