"""Write a Triton Inference Server model repository from a bundle.

``REPO/<model>/config.pbtxt`` and ``REPO/<model>/1/<file>`` for the onnxruntime backend (ONNX FP32
or INT8 Q/DQ), the TensorRT backend (engine, as ``model.plan``) and the OpenVINO backend (IR, as
``model.xml`` + ``model.bin``). Names, datatypes and dims come from the manifest. Every config is
made and checked before anything is written; each model folder is staged *beside* the repository
(a folder inside it would be polled by Triton as a model) and swapped in with one atomic exchange
(``renameat2(RENAME_EXCHANGE)`` on Linux; two renames elsewhere), so Triton never sees half a model
or, on Linux, none.

What each backend accepts, read from the backends' sources (triton-inference-server/*_backend):

* TensorRT: instance kind GPU only ("TensorRT backend supports only GPU device"); max_batch_size
  must not exceed the engine's profile max; Triton sends any batch from 1 up, so an engine whose
  profile min is above 1 cannot serve a batched model. A plan loads only in a tritonserver with the
  TensorRT version that built it: ``triton_release`` is checked against the release recorded in the
  engine's metadata when it was built in a cbam-deploy image (which pins one).
* OpenVINO: instance kind CPU only; with max_batch_size > 0 the backend reshapes the model to that
  batch (``ov::set_batch``) and answers any smaller batch with an error unless
  ``ENABLE_BATCH_PADDING`` is YES (then it pads: a batch of 1 costs a batch of max_batch_size). Its
  parameters are INFERENCE_NUM_THREADS, COMPILATION_NUM_THREADS, HINT_BF16 (YES only),
  NUM_STREAMS, PERFORMANCE_HINT; anything else, INFERENCE_PRECISION_HINT included, is never read.
  There is no way to pin f32 there: on a CPU with bf16 (AMX, AVX512-BF16) OpenVINO's default runs
  the IR in bf16, and the written entry says so.
* onnxruntime: CPU or GPU (the GPU needs Triton's onnxruntime backend with CUDA, as in the -py3
  images).
"""

from __future__ import annotations

import re
from pathlib import Path

from ..bundle import Bundle, check_artifact_names
from ..checks import MAX_BATCH, check_choice, check_int, check_name, check_output_dir, safe_name
from ..errors import CbamDeployError
from ..formats import get as get_format
from ..manifest import ROOT_ARTIFACT
from ..fsutil import StagedFolder
from ..transaction import faultpoint

def _fragment(artifact: dict):
    """The Triton fragment of the artifact's format (its row)."""
    row = get_format(artifact["format"])
    if row.triton is None:
        raise CbamDeployError(f"artifact {artifact['name']} ({artifact['format']}) has no Triton backend"
                              + (f": {row.no_triton}" if row.no_triton else ""))
    fragment = row.triton
    return fragment


def _dims(shape: list) -> str:
    return "[ " + ", ".join(str(d if isinstance(d, int) else -1) for d in shape) + " ]"


def check_kind(artifact: dict, kind: str | None) -> str:
    """The instance kind for an artifact: ``kind`` when its backend accepts it, else an error."""
    fragment = _fragment(artifact)
    default, allowed = fragment.default_kind, fragment.kinds
    if kind is None:
        return default
    if kind not in allowed:
        raise CbamDeployError(f"--kind {kind} does not fit artifact {artifact['name']}: Triton's {artifact['format']} "
                              f"backend runs {' or '.join(allowed)} only")
    return kind


def check_triton_release(text: str | None) -> str | None:
    if text is not None and not re.fullmatch(r"\d{2}\.\d{2}", text):
        raise CbamDeployError(f"--triton-release takes a Triton container release like 25.01, got {text!r}")
    return text


def model_config(manifest, artifact: dict, name: str, max_batch: int, instances: int, delay_us: int,
                 kind: str | None = None, triton_release: str | None = None, warnings: list[str] | None = None) -> str:
    """config.pbtxt text for one artifact (its manifest record) of a bundle (``manifest``: a ``Bundle``
    or its manifest dict); problems that Triton would meet at load or on the first request are errors
    here, what cannot be checked is appended to ``warnings``."""
    bundle = Bundle.of(manifest)
    platform = _fragment(artifact).config_line
    instance_kind = check_kind(artifact, kind)
    shape = bundle.input.shape
    batched = bundle.fixed_batch is None
    notes = warnings if warnings is not None else []
    row = get_format(artifact["format"])
    notes += row.triton_check(bundle, artifact, batched, max_batch, check_triton_release(triton_release))
    lines = [f"name: {_quoted(name)}", platform, f"max_batch_size: {max_batch if batched else 0}"]
    in_dims = shape[1:] if batched else shape
    lines += [
        "input [", "  {", f"    name: {_quoted(bundle.input.name)}", "    data_type: TYPE_FP32",
        f"    dims: {_dims(in_dims)}", "  }", "]", "output [",
    ]
    for index, output in enumerate(bundle.outputs):  # every output, in the model's order
        out_dims = output.shape[1:] if batched else output.shape
        lines += ["  {", f"    name: {_quoted(output.name)}", "    data_type: TYPE_FP32", f"    dims: {_dims(out_dims)}",
                  "  }" + ("," if index < len(bundle.outputs) - 1 else "")]
    lines.append("]")
    if batched:
        preferred = [b for b in (2, 4, 8, 16, 32) if b <= max_batch]
        lines += ["dynamic_batching {"]
        if preferred:
            lines.append(f"  preferred_batch_size: [ {', '.join(map(str, preferred))} ]")
        lines += [f"  max_queue_delay_microseconds: {delay_us}", "}"]
    lines += ["instance_group [", "  {", f"    count: {instances}", f"    kind: {instance_kind}", "  }", "]"]
    parameters, parameter_notes = row.triton_parameters(batched, max_batch)
    lines += _parameters(parameters)
    notes += [f"{artifact['name']}: {note}" for note in parameter_notes]
    lines.append(f"# made by cbam-deploy from artifact {_quoted(artifact['name'])} ({_quoted(artifact['format'])}, "
                 f"{_quoted(artifact['precision'])}, sha256 {_quoted(artifact['sha256'][:16])}...)")
    return "\n".join(lines) + "\n"


def _quoted(text: str) -> str:
    """``text`` as a protobuf text-format string: quoted, with '\\', '"' and control characters escaped,
    so a name from a manifest can never end the line or the string it is written in."""
    escaped = "".join("\\\\" if c == "\\" else '\\"' if c == '"' else f"\\{ord(c):03o}" if ord(c) < 0x20 or ord(c) == 0x7F
                      else c for c in str(text))
    return f'"{escaped}"'


def _parameters(values: dict[str, str]) -> list[str]:
    out = []
    for key, value in values.items():
        out += ["parameters {", f'  key: "{key}"', f'  value: {{ string_value: "{value}" }}', "}"]
    return out


def write_repository(bundle_dir: str | Path, repo: str | Path, artifacts: list[str] | None = None, name: str | None = None,
                     max_batch: int = 8, instances: int = 1, delay_us: int = 5000, kind: str | None = None,
                     triton_release: str | None = None) -> list[dict]:
    validate_triton_options(repo, max_batch, instances, delay_us, kind)
    bundle_dir, repo = Path(bundle_dir), Path(repo)
    bundle = Bundle.open(bundle_dir)
    check_artifact_names(bundle, artifacts, bundle_dir)
    chosen = artifacts or [ROOT_ARTIFACT]
    base = triton_model_name(bundle, name)
    plans = []  # every config made (and so checked) before anything is written
    for artifact_name in chosen:
        bundle.path_of(artifact_name)  # present, inside the bundle, intact
        artifact = bundle.artifact(artifact_name).raw
        _fragment(artifact)  # a format without a Triton backend is refused before anything is written
        model_name = base if len(chosen) == 1 else safe_name(f"{base}-{artifact_name}")
        warnings: list[str] = []
        config = model_config(bundle, artifact, model_name, max_batch, instances, delay_us, kind, triton_release, warnings)
        plans.append((artifact, model_name, config, warnings))
    try:
        repo.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CbamDeployError(f"cannot create the repository folder {repo}: {exc.strerror or exc}") from None
    written = []
    for artifact, model_name, config, warnings in plans:
        final = repo / model_name
        try:
            stage = StagedFolder(final, "triton", around=repo)
            with stage as staged:
                (staged / "1").mkdir()
                record = bundle.artifact(artifact["name"])
                # the checked bytes themselves (read once, hashed as they are written), never a link; each
                # file under the name the format's Triton backend reads
                for source, target in get_format(record.format).triton_sources(record):
                    (staged / "1" / target).parent.mkdir(parents=True, exist_ok=True)
                    bundle.copy_file(source, staged / "1" / target)
                (staged / "config.pbtxt").write_text(config)
                faultpoint("triton-staged")
                # one atomic swap where the system has it (Triton never sees the model folder missing);
                # elsewhere two renames, with a moment between them when it is
                stage.swap_in()
        except OSError as exc:
            raise CbamDeployError(f"cannot write the model folder {final}: {exc.strerror or exc}") from None
        written.append({"model": model_name, "artifact": artifact["name"], "format": artifact["format"],
                        "path": str(final), "config": str(final / "config.pbtxt"), "warnings": warnings})
    return written


def triton_model_name(manifest, name: str | None = None, option: str = "--name") -> str:
    """The model's folder in the Triton repository: ``name`` (the one name rule, ``checks.check_name``)
    or one made from the bundle's model name (a ``Bundle`` or a manifest dict), which can never lead out
    of the repository whatever the manifest says."""
    if name is not None:
        return check_name(option, name)
    return safe_name(Bundle.of(manifest).model.name.replace(":", "_").replace("/", "_").replace(".py", ""))


def validate_triton_options(output: str, max_batch: int = 8, instances: int = 1, delay_us: int = 5000,
                            kind: str | None = None) -> None:
    check_int("--max-batch", max_batch, 1, MAX_BATCH)
    check_int("--instances", instances, 1, 1024)
    check_int("--delay-us", delay_us, 0, 60_000_000)
    if kind is not None:
        check_choice("--kind", kind, ("KIND_CPU", "KIND_GPU"))
    check_output_dir("--output", output)
