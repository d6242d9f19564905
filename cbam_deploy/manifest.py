"""The manifest: its schema, the one naming scheme of artifacts, and the records that go into it.

``manifest.json`` is a bundle's table of contents: the model, its input and outputs, and one record
per artifact (name, file, format, precision, sha256 and size of its file and its companions, how it
was made and how it compares with PyTorch). This module knows the manifest as data: it makes one
(``new_manifest``), checks one against the schema (``validate_manifest``: one error naming the
field), names artifacts (``artifact_name``, ``artifact_file``) and makes their records
(``artifact_record``). Reading a bundle safely (locks, crash recovery) is ``bundle``; changing one
is ``transaction``.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

from . import __version__
from .checks import MAX_BATCH, MAX_CHANNELS, MAX_INPUT_SIZE, MAX_NUM_CLASSES, bounds_problem
from .errors import CbamDeployError
from .formats import get as get_format
from .formats import recipe as get_recipe
from .fsutil import UnsafePath, json_depth, open_no_follow, sha256_written
from .models.libraries import library_names
from .outputs import OUTPUT_KINDS
from .preprocessing import INTERPOLATIONS
from .preprocessing import MODES as PREPROCESS_MODES

MANIFEST_NAME = "manifest.json"
# where a bundle's model came from: the zoo, a FILE.py:FACTORY, or a module handed over in memory (the Python API)
MODEL_SOURCES = ("zoo", "factory", "module")
# the bundle's first artifact, which the export writes and every other artifact is built from (the
# root format's fp32 file: the ONNX), and its file
ROOT_ARTIFACT = "onnx-fp32"
ROOT_FILE = "model.onnx"
SCHEMA_VERSION = 1
_REQUIRED = ("schema_version", "model", "input", "outputs", "artifacts", "versions")
MAX_DEPTH = 32  # the schema nests 4 deep; records that commands add (export, parity, verify) a few more
MAX_MANIFEST_BYTES = 64 << 20
MAX_NAME = 4096  # characters of a model, input or output name (they go into errors, URLs, configs)
MAX_DIM = (1 << 31) - 1  # an output dimension: what a runtime's int32 shape holds


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
    if json_depth(manifest, MAX_DEPTH) > MAX_DEPTH:
        raise CbamDeployError(f"cannot read {path}: JSON nested deeper than {MAX_DEPTH} levels")
    validate_manifest(manifest, path)
    return manifest


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
    check.field(model, "name", "model.", _is_name, f"a non-empty string of at most {MAX_NAME} characters")
    sources = (*MODEL_SOURCES, *library_names())
    check.field(model, "source", "model.", lambda v: v in sources, f"one of {', '.join(sources)}")
    check.field(model, "stem", "model.", _is_text, "a non-empty string")
    check.field(model, "num_classes", "model.", lambda v: _is_positive_int(v) and v <= MAX_NUM_CLASSES,
                f"a positive integer or null, at most {MAX_NUM_CLASSES}", nullable=True)
    check.field(model, "parameters", "model.", lambda v: _is_int(v) and v >= 0, "a non-negative integer", required=False)
    check.field(model, "gflops", "model.", _is_number, "a number or null", required=False, nullable=True)
    check.field(model, "factory", "model.", _is_text, "a non-empty string", required=False)
    check.field(model, "factory_sha256", "model.", _is_text, "a sha256 string", required=False)
    init = check.field(model, "init", "model.", _is_dict, "an object", required=False, nullable=True)
    if init is not None:
        check.field(init, "state_sha256", "model.init.", _is_text, "a sha256 string")
        summary = check.field(init, "state_summary", "model.init.", _is_dict, "an object", required=False)
        if summary is not None:  # the tolerant fingerprint (models.state_summary)
            check.field(summary, "tensors", "model.init.state_summary.", _is_summary_tensors,
                        "an object of tensor name: [elements, norm, sum, projection]")
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
    check.field(spec, "name", "input.", _is_name, f"a non-empty string of at most {MAX_NAME} characters")
    shape = check.field(spec, "shape", "input.", lambda v: isinstance(v, list) and len(v) == 4,
                        "a list of 4 dimensions (N, C, H, W)")
    for i, (dim, high) in enumerate(zip(shape, (MAX_BATCH, MAX_CHANNELS, MAX_INPUT_SIZE, MAX_INPUT_SIZE))):
        check.item(dim, f"input.shape[{i}]", lambda v, high=high: _is_positive_int(v) and v <= high or _is_name(v),
                   f"an integer from 1 to {high} or a dimension name")
    if not _is_positive_int(shape[1]):
        check.fail("input.shape[1]", f"the channel count (an integer from 1 to {MAX_CHANNELS})", shape[1])
    for key in ("dtype", "layout", "color"):
        check.field(spec, key, "input.", _is_text, "a non-empty string", required=False)
    pre = check.field(spec, "preprocess", "input.", _is_dict, "an object")
    check.field(pre, "mode", "input.preprocess.", lambda v: v in PREPROCESS_MODES, f"one of {', '.join(PREPROCESS_MODES)}",
                required=False)
    check.field(pre, "pad_value", "input.preprocess.", lambda v: _is_number(v) and 0 <= v <= 255, "a number from 0 to 255",
                required=False)
    for key, high in (("resize_shorter", 2 * MAX_INPUT_SIZE), ("center_crop", MAX_INPUT_SIZE)):
        check.field(pre, key, "input.preprocess.",
                    lambda v, high=high: _is_number(v) and 1 <= v <= high and v == int(v), f"a whole number from 1 to {high}")
    check.field(pre, "interpolation", "input.preprocess.", lambda v: v in INTERPOLATIONS,
                f"one of {', '.join(INTERPOLATIONS)}", required=False)
    check.field(pre, "scale", "input.preprocess.", lambda v: _is_number(v) and v > 0, "a positive number", required=False)
    mean = check.field(pre, "mean", "input.preprocess.", _is_number_list, "a non-empty list of numbers")
    std = check.field(pre, "std", "input.preprocess.", lambda v: _is_number_list(v) and all(x > 0 for x in v),
                      "a non-empty list of positive numbers")
    if len(mean) != len(std):
        check.fail("input.preprocess.std", f"as long as input.preprocess.mean ({len(mean)})", std)

    outputs = check.field(manifest, "outputs", "", lambda v: isinstance(v, list) and len(v) > 0, "a non-empty list")
    output_names = []
    for i, output in enumerate(outputs):
        check.item(output, f"outputs[{i}]", _is_dict, "an object")
        name = check.field(output, "name", f"outputs[{i}].", _is_name,
                           f"a non-empty string of at most {MAX_NAME} characters")
        if name in output_names:
            check.fail(f"outputs[{i}].name", "a name no other output has", name)
        output_names.append(name)
        dims = check.field(output, "shape", f"outputs[{i}].", lambda v: _is_list(v) and len(v) <= 8,
                           "a list of at most 8 dimensions")
        for j, dim in enumerate(dims):
            check.item(dim, f"outputs[{i}].shape[{j}]", lambda v: _is_positive_int(v) and v <= MAX_DIM or _is_name(v),
                       f"an integer from 1 to {MAX_DIM} or a dimension name")
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
        _check_export_limits(check, artifact.get("export"), f"{at}.export")
    if len(set(names)) != len(names):
        repeated = sorted({n for n in names if names.count(n) > 1})
        raise CbamDeployError(f"{where}: artifact names repeat ({', '.join(repeated)})")

    check.field(manifest, "versions", "", _is_dict, "an object")
    check.field(manifest, "labels", "", lambda v: isinstance(v, list) and len(v) <= MAX_NUM_CLASSES
                and all(isinstance(x, str) and len(x) <= MAX_NAME for x in v),
                f"a list of at most {MAX_NUM_CLASSES} strings", required=False, nullable=True)
    check.field(manifest, "created", "", _is_text, "a string", required=False)




def _check_export_limits(check: _SchemaCheck, export, at: str) -> None:
    """The records of an artifact's ``export`` that runners and serve take as limits: input ``bounds``
    (an ExecuTorch program's, ``checks.bounds_problem``) and a batch ``profile`` (a TensorRT engine's:
    1 <= min_batch <= opt_batch <= max_batch <= MAX_BATCH)."""
    if not isinstance(export, dict):
        return
    if "bounds" in export:
        problem = bounds_problem(export["bounds"])
        if problem:
            field, expected, value = problem
            check.fail(f"{at}.bounds" + (f".{field}" if field else ""), expected, value)
    if "profile" in export:
        profile = export["profile"]
        check.item(profile, f"{at}.profile", _is_dict, "an object")
        values = []
        for key in ("min_batch", "opt_batch", "max_batch"):
            values.append(check.field(profile, key, f"{at}.profile.", lambda v: _is_positive_int(v) and v <= MAX_BATCH,
                                      f"an integer from 1 to {MAX_BATCH}"))
        if not values[0] <= values[1] <= values[2]:
            check.fail(f"{at}.profile", "min_batch <= opt_batch <= max_batch", profile)


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


def _is_summary_tensors(value) -> bool:
    return isinstance(value, dict) and all(
        isinstance(v, list) and len(v) == 4 and _is_int(v[0]) and v[0] >= 0 and all(_is_number(f) for f in v[1:])
        for v in value.values())


def _is_text(value) -> bool:
    return isinstance(value, str) and value.strip() != ""


def _is_name(value) -> bool:
    return _is_text(value) and len(value) <= MAX_NAME


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

def artifact_name(fmt: str, precision: str, recipe: str | None = None, gates: str | None = None) -> str:
    """The one naming scheme: ``<format>-<precision>`` for conversions (onnx-fp32, openvino-fp16,
    tensorrt-int8); ``int8-<recipe>`` for a quantization recipe's output, ``-gates-<policy>`` added
    when the gate policy is not the recipe's default."""
    if recipe is None:
        return f"{fmt}-{precision}"
    default = get_recipe(recipe).default_gates
    gates = gates or default
    return f"int8-{recipe}" + ("" if gates == default else f"-gates-{gates}")


def artifact_file(name: str, fmt: str) -> str:
    """``model.onnx`` for the bundle's first artifact, the format's own name for the rest
    (``model.<artifact name>.<extension>``)."""
    return ROOT_FILE if name == ROOT_ARTIFACT else get_format(fmt).file_name(name)


def artifact_record(root: str | Path, fmt: str, precision: str, recipe: str | None = None, gates: str | None = None,
                    **fields) -> dict:
    """The manifest record of the artifact (``fmt``, ``precision``[, INT8 ``recipe``, ``gates``]) whose file
    lies in ``root`` (a staging folder) under the name the naming scheme gives it: name, path, format,
    precision, sha256, and the size of its file and its companions (the files the format's row says
    lie beside it: an IR's .bin, an engine's sidecar, an ONNX's external data), each with its sha256.
    ``transaction.BundleUpdate.add_artifact`` is how commands use it."""
    root = Path(root)
    name = artifact_name(fmt, precision, recipe, gates)
    path = artifact_file(name, fmt)
    if not (root / path).is_file():
        raise CbamDeployError(f"artifact {name}: its file {path} was not written")
    companions = tuple(get_format(fmt).companions(root / path))
    for companion in companions:
        _check_inside(root, companion, f"companion file {companion!r} of artifact {name!r}")
    missing = [c for c in companions if not (root / c).is_file()]
    if missing:
        raise CbamDeployError(f"artifact {name}: its companion file(s) {', '.join(missing)} were not written")
    record = {"name": name, "path": path, "format": fmt, "precision": precision, "sha256": sha256_written(root / path),
              "size_bytes": sum((root / f).stat().st_size for f in (path, *companions))}
    if companions:
        record["companion_files"] = {c: sha256_written(root / c) for c in companions}
    record.update(fields)
    return record


def upsert_artifact(manifest: dict, artifact: dict) -> None:
    """Add an artifact, replacing one of the same name."""
    manifest["artifacts"] = [a for a in manifest["artifacts"] if a["name"] != artifact["name"]] + [artifact]


def fixed_batch(shape: list) -> int | None:
    """The batch an input shape (N, C, H, W) was fixed to at export; None for a dynamic batch (a
    dimension name)."""
    return shape[0] if isinstance(shape[0], int) else None
