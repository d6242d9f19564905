"""Option checks that run before any work: every command validates all of its options first, so a
typo costs a second, not an export, and nothing is written when an option is wrong.

Each ``validate_*`` function raises ``CbamDeployError`` naming the option (``--calib-size``) and the
accepted range; the CLI turns that into one ``error:`` line and exit code 2. Library callers get the
same checks (``ExportRequest.validate``, ``bench.bench_bundle``, ``evaluate.evaluate_bundle``).
"""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import CbamDeployError

# Input side in pixels. The lower bound is the network's total stride (a zoo model with the
# ImageNet stem downsamples by 32, with the CIFAR stem by 8); above 2048 the example tensor and
# activations alone take many GiB and a typo (100000) would only end in an allocation failure.
MIN_INPUT_SIZE = 8
MAX_INPUT_SIZE = 2048
STRIDE = {"imagenet": 32, "cifar": 8}
STEMS = tuple(STRIDE)
MAX_NUM_CLASSES = 100_000
MAX_BATCH = 1024


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(option: str, value, low: int | None = None, high: int | None = None, *, allow_none: bool = False) -> None:
    """``value`` is an integer in [low, high]; the message names the option and the range."""
    if value is None and allow_none:
        return
    if not is_int(value) or (low is not None and value < low) or (high is not None and value > high):
        if low is not None and high is not None:
            wanted = f"an integer from {low} to {high}"
        elif low is not None:
            wanted = {0: "a non-negative integer", 1: "a positive integer"}.get(low, f"an integer >= {low}")
        else:
            wanted = "an integer"
        raise CbamDeployError(f"{option} must be {wanted}, got {value!r}")


def check_number(option: str, value, *, positive: bool = True) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value in (float("inf"), float("-inf")):
        raise CbamDeployError(f"{option} must be a number, got {value!r}")
    if positive and value <= 0:
        raise CbamDeployError(f"{option} must be greater than 0, got {value!r}")


def check_choice(option: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise CbamDeployError(f"{option} must be one of {', '.join(choices)}, got {value!r}")


def parse_list(value: str | list[str] | None, option: str, allowed: tuple[str, ...] | None = None) -> list[str]:
    """'a,b' -> ['a', 'b'], each checked against ``allowed``; empty lists and repeats are errors."""
    items = value if isinstance(value, list) else [v.strip() for v in (value or "").split(",") if v.strip()]
    if not items:
        raise CbamDeployError(f"{option} takes a comma list{_of(allowed)}; got nothing")
    bad = [v for v in items if allowed is not None and v not in allowed]
    if bad:
        raise CbamDeployError(f"{option} takes a comma list{_of(allowed)}; got {', '.join(repr(b) for b in bad)}")
    return list(dict.fromkeys(items))


def _of(allowed) -> str:
    return f" of {', '.join(allowed)}" if allowed else ""


def parse_batch(value: str | int | None, option: str = "--batch") -> int | None:
    """'dynamic' (or None) -> None; else a positive integer up to MAX_BATCH."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "dynamic"):
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise CbamDeployError(f"{option} must be 'dynamic' or a positive integer, got {value!r}") from None
    if not 1 <= number <= MAX_BATCH:
        raise CbamDeployError(f"{option} must be 'dynamic' or an integer from 1 to {MAX_BATCH}, got {value!r}")
    return number


def parse_batches(value: str, option: str = "--batch") -> list[int]:
    """'1,8,32' -> [1, 8, 32] (each 1..MAX_BATCH)."""
    try:
        batches = [int(b) for b in str(value).split(",") if b.strip()]
    except ValueError:
        raise CbamDeployError(f"{option} takes a comma list of positive integers, got {value!r}") from None
    if not batches or min(batches) < 1 or max(batches) > MAX_BATCH:
        raise CbamDeployError(f"{option} takes a comma list of integers from 1 to {MAX_BATCH}, got {value!r}")
    return list(dict.fromkeys(batches))


# --- names that become paths, and text that goes into a file -------------------------------------

NAME_MAX = 128
_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9_.-]")


def safe_name(text: str) -> str:
    """A name made from ``text`` that obeys ``check_name``: other characters become '_', leading and
    trailing dots go, at most ``NAME_MAX`` characters; 'model' when nothing is left."""
    return _UNSAFE_NAME_CHARS.sub("_", text)[:NAME_MAX].strip(".") or "model"


def check_name(option: str, name: str) -> str:
    """The one rule for a name that becomes a folder or a URL path (a served model, a Triton model, a
    KServe model): letters, digits, '_', '.' and '-', not starting with '.', at most ``NAME_MAX``
    characters. So ``../evil``, ``/abs`` or ``a/b`` can never lead out of the folder it is written in."""
    if not isinstance(name, str) or not name or safe_name(name) != name or len(name) > NAME_MAX:
        raise CbamDeployError(f"{option} {shorten(name)}: a model name is letters, digits, '_', '.' and '-' (not "
                              f"starting with '.'), at most {NAME_MAX} characters")
    return name


def check_plain_text(option: str, value: str | None) -> str | None:
    """Text that goes into a YAML value, a pbtxt string or a comment line: no line break or other
    control character, which would end the line it is written on."""
    if value is not None and any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise CbamDeployError(f"{option} {shorten(value)}: control characters (a line break, a tab) are not allowed")
    return value


def shorten(value, limit: int = 80) -> str:
    """``repr(value)``, cut to about ``limit`` characters with the full length named: error text that
    quotes a name stays short whatever the name (a 20 KB model name in a gRPC request)."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit - 20]}...' ({len(value) if hasattr(value, '__len__') else len(text)} characters)"


# --- paths --------------------------------------------------------------------------------------

def check_existing_file(option: str, path: str | Path | None) -> None:
    if path is None:
        return
    path = Path(path)
    if not path.exists():
        raise CbamDeployError(f"{option} {path} does not exist")
    if not path.is_file():
        raise CbamDeployError(f"{option} {path} is not a file")


def check_output_file(option: str, path: str | Path | None) -> None:
    """A file we will write later: its folder exists and is writable, and it is not a folder itself.
    Checked before any measuring, so a typo in the path does not throw away minutes of work."""
    if path is None:
        return
    if str(path).strip() == "":
        raise CbamDeployError(f"{option} needs a file path")
    try:
        _check_output_file(option, Path(path))
    except OSError as exc:  # a name too long, a loop of links: whatever a write would meet
        raise CbamDeployError(f"{option} {shorten(str(path))}: cannot write there ({exc.strerror or exc})") from None


def _check_output_file(option: str, path: Path) -> None:
    if path.is_dir():
        raise CbamDeployError(f"{option} {path} is a folder; give a file path")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise CbamDeployError(f"{option} {path}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):  # files are replaced atomically: the folder is what counts
        raise CbamDeployError(f"{option} {path}: the folder {parent} is not writable")
    # os.access misses what only a write shows (root on a read-only or special filesystem such as
    # /proc, a name too long): make and remove the very temporary file the atomic write will use
    import tempfile

    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise CbamDeployError(f"{option} {path}: cannot write there ({exc.strerror or exc})") from None


def check_output_dir(option: str, path: str | Path | None) -> None:
    """A folder we may create later: it is a folder if it exists, and its nearest existing parent is
    a writable folder. Nothing is created here."""
    if path is None:
        return
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CbamDeployError(f"{option} {path} exists and is not a folder")
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise CbamDeployError(f"{option} {path}: {probe} is a file, not a folder")
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        raise CbamDeployError(f"{option} {path}: {probe} is not writable")


def check_data_source(option: str, source: str | None, *, images_only: bool = False) -> None:
    """A calibration / verification source: 'synthetic', a folder holding images, or a NumPy file
    (recognised by its first bytes, not its name). ``images_only``: a folder (eval's ImageFolder)."""
    if source is None:
        return
    from .data import IMAGE_SUFFIXES, SYNTHETIC, array_file_kind, has_images

    if not images_only and source == SYNTHETIC:
        return
    path = Path(source)
    if not path.exists():
        what = "a folder of images" if images_only else "a folder of images, a .npy/.npz file, or 'synthetic'"
        raise CbamDeployError(f"{option} {path} does not exist ({what})")
    if path.is_dir():
        if not has_images(path):
            raise CbamDeployError(f"{option} {path} holds no images ({', '.join(IMAGE_SUFFIXES)}, searched recursively)")
        return
    if images_only:
        raise CbamDeployError(f"{option} {path} is not a folder (ImageFolder layout: one sub-folder per class)")
    if array_file_kind(path) is None:
        raise CbamDeployError(
            f"{option} {path} is neither a folder of images nor a NumPy .npy/.npz file (judged by its first bytes)"
        )


# --- model --------------------------------------------------------------------------------------

def check_model_spec(spec: str, stem: str = "imagenet") -> None:
    """A zoo name (with a stem it has) or an existing 'file.py:factory'."""
    from .models.custom import is_factory_spec
    from .models.registry import get_entry

    check_choice("--stem", stem, STEMS)
    if is_factory_spec(spec):
        path = Path(spec.rpartition(":")[0])
        if not path.is_file():
            raise CbamDeployError(f"model file {path} does not exist")
        return
    entry = get_entry(spec)
    if stem not in entry.stems:
        raise CbamDeployError(f"model {spec!r} has no {stem!r} stem; choose one of {', '.join(entry.stems)}")


def min_input_size(spec: str | None, stem: str = "imagenet") -> int:
    """The network's total stride for zoo models; 8 for a user's factory (we cannot know it)."""
    from .models.custom import is_factory_spec

    if spec is None or is_factory_spec(spec):
        return MIN_INPUT_SIZE
    return max(MIN_INPUT_SIZE, STRIDE.get(stem, MIN_INPUT_SIZE))


def check_input_size(value, spec: str | None = None, stem: str = "imagenet", option: str = "--input-size") -> None:
    low = min_input_size(spec, stem)
    if value is None:
        return
    if not is_int(value) or not low <= value <= MAX_INPUT_SIZE:
        why = f" (the network's stride with the {stem} stem)" if low > MIN_INPUT_SIZE else ""
        raise CbamDeployError(f"{option} must be an integer from {low}{why} to {MAX_INPUT_SIZE}, got {value!r}")


def check_num_classes(value, option: str = "--num-classes") -> None:
    check_int(option, value, 1, MAX_NUM_CLASSES, allow_none=True)


def check_opset(exporter: str, opset) -> None:
    from .exporters.onnx import DEFAULT_OPSET, EXPORTERS, OPSET_RANGE

    check_choice("--exporter", exporter, EXPORTERS)
    low, high = OPSET_RANGE[exporter]
    if not is_int(opset) or not low <= opset <= high:
        raise CbamDeployError(
            f"opset {opset} is out of range for the {exporter} exporter: choose {low}..{high} "
            f"(default {DEFAULT_OPSET}; TensorRT 8.5 on JetPack 5 parses at most 17)"
        )


# --- commands -----------------------------------------------------------------------------------

@dataclass
class ExportPlan:
    """What ``validate_export_options`` understood: the parsed lists the later steps use."""

    batch: int | None
    formats: list[str]
    precisions: list[str]
    targets: list[str]
    int8: bool
    notes: list[str] = field(default_factory=list)
    output_kinds: dict[str, str] = field(default_factory=dict)


def parse_output_kinds(values, option: str = "--output-kind") -> dict[str, str]:
    """``NAME=KIND`` items (or a {name: kind} dict) -> {name: kind}, each KIND one of logits, dense,
    other; one error naming the bad item, the unknown kind or the output given twice."""
    from .outputs import OUTPUT_KINDS

    if values is None:
        return {}
    if isinstance(values, dict):
        pairs = list(values.items())
        shown = [f"{k}={v}" for k, v in pairs]
    elif isinstance(values, (list, tuple)):
        shown = list(values)
        pairs = []
        for item in values:
            name, sep, kind = item.partition("=") if isinstance(item, str) else ("", "", "")
            if not sep or not name.strip() or not kind.strip():
                raise CbamDeployError(f"{option} takes NAME=KIND (KIND one of {', '.join(OUTPUT_KINDS)}), got {item!r}")
            pairs.append((name.strip(), kind.strip()))
    else:
        raise CbamDeployError(f"{option} must be a dict of output name to kind, got {type(values).__name__}")
    kinds: dict[str, str] = {}
    for (name, kind), item in zip(pairs, shown):
        if not isinstance(name, str) or not name:
            raise CbamDeployError(f"{option}: {item!r} does not name an output")
        if kind not in OUTPUT_KINDS:
            raise CbamDeployError(f"{option} {item!r}: unknown kind {kind!r}; the kinds are {', '.join(OUTPUT_KINDS)}")
        if name in kinds and kinds[name] != kind:
            raise CbamDeployError(f"{option}: output {name!r} is given two kinds ({kinds[name]}, {kind})")
        kinds[name] = kind
    return kinds


def check_output_kinds(kinds: dict[str, str], outputs: list[str], option: str = "--output-kind") -> None:
    """Every output named in ``kinds`` is one of the model's ``outputs`` (known once it has run)."""
    unknown = [name for name in kinds if name not in outputs]
    if unknown:
        raise CbamDeployError(f"{option}: no output {', '.join(repr(u) for u in unknown)}; the model's outputs are "
                              f"{', '.join(outputs)}")


def validate_export_options(
    model: str,
    weights: str | None = None,
    num_classes: int | None = None,
    stem: str = "imagenet",
    output: str | None = None,
    input_size: int | None = None,
    batch: str | int | None = "dynamic",
    opset: int = 17,
    exporter: str = "torchscript",
    formats: str = "onnx",
    precisions: str = "fp32",
    gates: str | None = None,
    min_batch: int = 1,
    opt_batch: int = 1,
    max_batch: int = 8,
    workspace_mb: int = 2048,
    timing_cache: str | None = None,
    dla_core: int | None = None,
    int8: bool = False,
    calib_data: str | None = None,
    target: str = "ort-cpu",
    output_kinds: list[str] | None = None,
    cbam_opt: str = "on",
) -> ExportPlan:
    """Every ``export`` option, checked before anything is built or written (the names in
    ``--output-kind`` are checked against the model's outputs once it has run, before the ONNX export)."""
    from .backends import formats as backend_formats
    from .cbam_opt import MODES as CBAM_OPT_MODES
    from .build import PRECISIONS
    from .calib.recipes import GATES, TARGETS

    if not isinstance(model, str) or not model.strip():
        raise CbamDeployError("--model needs a zoo name (see 'cbam-deploy models') or path/to/file.py:factory")
    check_choice("--stem", stem, STEMS)
    check_choice("--cbam-opt", cbam_opt, CBAM_OPT_MODES)
    check_num_classes(num_classes)
    check_input_size(input_size, model, stem)
    parsed_batch = parse_batch(batch)
    check_opset(exporter, opset)
    format_list = parse_list(formats, "--format", backend_formats())
    precision_list = parse_list(precisions, "--precision", PRECISIONS)
    target_list = parse_list(target, "--target", TARGETS)
    if gates is not None:
        check_choice("--gates", gates, GATES)
    check_int("--min-batch", min_batch, 1, MAX_BATCH)
    check_int("--opt-batch", opt_batch, 1, MAX_BATCH)
    check_int("--max-batch", max_batch, 1, MAX_BATCH)
    if not min_batch <= opt_batch <= max_batch:
        raise CbamDeployError(
            f"the TensorRT batch profile must satisfy 1 <= --min-batch <= --opt-batch <= --max-batch, "
            f"got {min_batch}/{opt_batch}/{max_batch}"
        )
    check_int("--workspace-mb", workspace_mb, 1)
    check_int("--dla-core", dla_core, 0, allow_none=True)
    if timing_cache is not None:
        if Path(timing_cache).is_dir():
            raise CbamDeployError(f"--timing-cache {timing_cache} is a folder; give a file path")
        check_output_file("--timing-cache", timing_cache)
    wants_int8 = int8 or "int8" in precision_list
    if wants_int8 and not calib_data:
        flag = "--int8" if int8 else "--precision int8"
        raise CbamDeployError(f"{flag} needs --calib-data DIR (images), a .npy/.npz file, or 'synthetic'")
    check_data_source("--calib-data", calib_data)
    kinds = parse_output_kinds(output_kinds)
    check_existing_file("--weights", weights)
    check_output_dir("--output", output)
    check_model_spec(model, stem)  # last: it imports the model registry (and torch)
    return ExportPlan(parsed_batch, format_list, precision_list, target_list, wants_int8, output_kinds=kinds)


def validate_quantize_options(targets: str | list[str], calib_data: str, calib_size: int = 128, calib_batch: int = 8,
                              method: str | None = None, gates: str | None = None) -> list[str]:
    from .calib.recipes import resolve

    target_list = parse_list(targets, "--target")
    for target in target_list:
        resolve(target, method, gates)  # "unknown target ...", "unknown calibration method ...", "--gates ..."
    check_int("--calib-size", calib_size, 1)
    check_int("--calib-batch", calib_batch, 1, MAX_BATCH)
    if not calib_data:
        raise CbamDeployError("--calib-data needs a folder of images, a .npy/.npz file, or 'synthetic'")
    check_data_source("--calib-data", calib_data)
    return target_list


def validate_bench_options(batch: str | list[int] = "1", iters: int | None = None, min_seconds: float | None = 5.0,
                           warmup: int = 5, threads: int | None = None, markdown: str | None = None,
                           plot: str | None = None) -> list[int]:
    batches = parse_batches(batch) if isinstance(batch, str) else parse_batches(",".join(map(str, batch)))
    check_int("--iters", iters, 1, allow_none=True)
    if min_seconds is not None:
        check_number("--min-seconds", min_seconds)
    check_int("--warmup", warmup, 0)
    check_int("--threads", threads, 1, allow_none=True)
    check_output_file("--markdown", markdown)
    check_output_file("--plot", plot)
    if plot is not None and importlib.util.find_spec("matplotlib") is None:
        raise CbamDeployError("--plot needs matplotlib: pip install matplotlib")
    return batches


def validate_eval_options(data: str, batch: int = 32, limit: int | None = None) -> None:
    check_int("--batch", batch, 1, MAX_BATCH)
    check_int("--limit", limit, 1, allow_none=True)
    check_data_source("--data", data, images_only=True)


def validate_verify_options(data: str | None = None, samples: int = 16) -> None:
    check_int("--samples", samples, 1)
    check_data_source("--data", data)


def validate_triton_options(output: str, max_batch: int = 8, instances: int = 1, delay_us: int = 5000,
                            kind: str | None = None) -> None:
    check_int("--max-batch", max_batch, 1, MAX_BATCH)
    check_int("--instances", instances, 1, 1024)
    check_int("--delay-us", delay_us, 0, 60_000_000)
    if kind is not None:
        check_choice("--kind", kind, ("KIND_CPU", "KIND_GPU"))
    check_output_dir("--output", output)


def check_artifact_names(manifest, names: list[str] | None, bundle: str | Path, option: str = "--artifact") -> None:
    """Every requested artifact exists in the bundle (checked before any measuring)."""
    if not names:
        return
    from .bundle import Bundle

    have = Bundle.of(manifest).artifact_names
    unknown = [n for n in names if n not in have]
    if unknown:
        raise CbamDeployError(
            f"{option}: bundle {bundle} has no artifact {', '.join(repr(u) for u in unknown)}; "
            f"it has {', '.join(have) or 'none'}"
        )
