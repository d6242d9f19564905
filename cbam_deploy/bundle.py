"""The bundle: one folder of artifacts plus ``manifest.json``; read, write (atomically), validate, look up.

Every later step (verify, bench, eval, serve, triton) reads a bundle and nothing else. An artifact
whose file no longer matches the sha256 in the manifest is refused, so a half-finished write can
never be trusted.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

from . import __version__
from .errors import CbamDeployError
from .fsutil import sha256_file, write_bytes_atomic

MANIFEST_NAME = "manifest.json"
SCHEMA_VERSION = 1
_REQUIRED = ("schema_version", "model", "input", "outputs", "artifacts", "versions")


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
    path = Path(bundle_dir) / MANIFEST_NAME
    validate_manifest(manifest, path)
    write_bytes_atomic(path, (json.dumps(manifest, indent=2, sort_keys=False) + "\n").encode())
    return path


def read_manifest(bundle_dir: str | Path) -> dict:
    bundle_dir = Path(bundle_dir)
    path = bundle_dir / MANIFEST_NAME if bundle_dir.is_dir() else bundle_dir
    if not path.is_file():
        raise CbamDeployError(f"{bundle_dir} is not a bundle: no {MANIFEST_NAME} (make one with 'cbam-deploy export')")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CbamDeployError(f"cannot read {path}: {exc}") from None
    validate_manifest(manifest, path)
    return manifest


def validate_manifest(manifest: dict, where: Path | str = MANIFEST_NAME) -> None:
    if not isinstance(manifest, dict):
        raise CbamDeployError(f"{where} is not a JSON object")
    missing = [k for k in _REQUIRED if k not in manifest]
    if missing:
        raise CbamDeployError(f"{where} lacks {', '.join(missing)}; re-export the bundle")
    if manifest["schema_version"] != SCHEMA_VERSION:
        raise CbamDeployError(
            f"{where} has schema version {manifest['schema_version']}; this cbam-deploy reads {SCHEMA_VERSION}"
        )
    names = [a.get("name") for a in manifest["artifacts"]]
    for artifact in manifest["artifacts"]:
        for key in ("name", "path", "format", "precision", "sha256"):
            if key not in artifact:
                raise CbamDeployError(f"{where}: an artifact lacks {key!r}")
        if Path(artifact["path"]).is_absolute() or ".." in Path(artifact["path"]).parts:
            raise CbamDeployError(f"{where}: artifact path {artifact['path']!r} must stay inside the bundle")
    if len(set(names)) != len(names):
        raise CbamDeployError(f"{where}: artifact names repeat")


def fixed_batch(manifest: dict) -> int | None:
    """The batch size a fixed-batch model was exported with; None for a dynamic batch."""
    first = manifest["input"]["shape"][0]
    return first if isinstance(first, int) else None


def fit_to_batch(manifest: dict, inputs, preferred: int = 8):
    """(inputs, batch) ready to run: a fixed-batch model takes only its own batch, so the inputs are
    cut to a multiple of it; a dynamic one runs in chunks of ``preferred``."""
    fixed = fixed_batch(manifest)
    if fixed is None:
        return inputs, preferred
    usable = len(inputs) // fixed * fixed
    if usable == 0:
        raise CbamDeployError(f"the model has a fixed batch of {fixed}; only {len(inputs)} samples were given")
    return inputs[:usable], fixed


def upsert_artifact(manifest: dict, artifact: dict) -> None:
    """Add an artifact, replacing one of the same name."""
    manifest["artifacts"] = [a for a in manifest["artifacts"] if a["name"] != artifact["name"]] + [artifact]


def artifact_path(bundle_dir: str | Path, manifest: dict, name: str | None = None, verify_hash: bool = True) -> tuple[dict, Path]:
    """Look up an artifact (the first one when no name is given) and check its file's sha256."""
    artifacts = manifest["artifacts"]
    if not artifacts:
        raise CbamDeployError(f"bundle {bundle_dir} has no artifacts")
    if name is None:
        artifact = artifacts[0]
    else:
        found = [a for a in artifacts if a["name"] == name]
        if not found:
            raise CbamDeployError(f"bundle {bundle_dir} has no artifact {name!r}; it has {', '.join(a['name'] for a in artifacts)}")
        artifact = found[0]
    path = Path(bundle_dir) / artifact["path"]
    if not path.is_file():
        raise CbamDeployError(f"artifact {artifact['name']} is missing its file {path}; re-export the bundle")
    if verify_hash:
        expected = {artifact["path"]: artifact["sha256"], **artifact.get("companion_files", {})}
        for relative, digest in expected.items():
            file = Path(bundle_dir) / relative
            if not file.is_file() or sha256_file(file) != digest:
                raise CbamDeployError(
                    f"artifact {artifact['name']} ({file}) does not match the sha256 in the manifest: it was "
                    "changed or its write did not finish; rebuild it"
                )
    return artifact, path
