"""The bundle: one folder of artifacts plus ``manifest.json``, as read: the typed ``Bundle`` and its lookups.

Every later step (verify, bench, eval, serve, triton) reads a bundle and nothing else, through a
``Bundle``: ``Bundle.open(path)`` reads the manifest (crash recovery, the shared lock and the schema
check as ``read_manifest`` does them) and gives typed views of it (``input``, ``outputs``, ``model``,
``artifacts``) and the lookups every command needs (``artifact``, ``path_of``, ``check_integrity``).
A ``Bundle`` is read-only: changes go through ``transaction.BundleUpdate``, whose ``add_artifact``
makes an artifact's record (name, file, sha256, size) from the one naming scheme (``manifest``). An artifact
whose file no longer matches the sha256 in the manifest is refused, so a half-finished write can
never be trusted.
"""

from __future__ import annotations

import functools
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .errors import CbamDeployError
from .fsutil import sha256_file
from .manifest import MANIFEST_NAME, fixed_batch, read_manifest_file
from .transaction import bundle_lock, recover_if_needed


def read_manifest(bundle_dir: str | Path) -> dict:
    """The bundle's committed manifest. Whatever a killed command left is finished or discarded first
    (see ``transaction``), and the read happens under the bundle's shared lock, so it never sees a
    commit half-applied."""
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        return read_manifest_file(bundle_dir)
    recover_if_needed(bundle_dir)  # may complete a first export killed after its commit point
    if not (bundle_dir / MANIFEST_NAME).is_file():
        raise CbamDeployError(f"{bundle_dir} is not a bundle: no {MANIFEST_NAME} (make one with 'cbam-deploy export')")
    with bundle_lock(bundle_dir, shared=True):
        return read_manifest_file(bundle_dir / MANIFEST_NAME)


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
    weights: Weights | None = None
    init: dict | None = None
    outputs_mode: str | None = None
    attention_modules: list = field(default_factory=list)
    parameters: int | None = None
    notes: list = field(default_factory=list)
    raw: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dict(cls, raw: dict) -> ModelInfo:
        weights = raw.get("weights")
        return cls(raw["name"], raw.get("source", "zoo"), raw.get("stem", "imagenet"), raw.get("num_classes"),
                   raw.get("factory"), Weights(weights["path"], weights["sha256"]) if weights else None,
                   raw.get("init"), raw.get("outputs_mode"), list(raw.get("attention_modules") or []),
                   raw.get("parameters"), list(raw.get("notes") or []), raw)

    @property
    def spec(self) -> str:
        """What ``models.build_model`` takes: the factory (absolute path) or the zoo name."""
        return self.factory or self.name

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
        return fixed_batch(self.input.shape)

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

    def path_of(self, name: str | None = None, verify_hash: bool = True) -> Path:
        """The file of artifact ``name`` (the first when None), present and, with ``verify_hash``, its
        file and companions matching the sha256 in the manifest."""
        artifact = self.artifact(name)
        folder = self._folder()
        path = folder / artifact.path
        if not path.is_file():
            raise CbamDeployError(f"artifact {artifact.name} is missing its file {path}; re-export the bundle")
        if verify_hash:
            for relative, digest in artifact.files.items():
                file = folder / relative
                if not file.is_file() or sha256_file(file) != digest:
                    raise CbamDeployError(
                        f"artifact {artifact.name} ({file}) does not match the sha256 in the manifest: it was "
                        "changed or its write did not finish; rebuild it"
                    )
        return path

    def check_integrity(self) -> dict[str, str]:
        """Per artifact: 'ok', 'changed' (a file no longer matches its sha256) or 'missing'."""
        folder = self._folder()
        states = {}
        for artifact in self.artifacts:
            paths = [folder / f for f in artifact.files]
            try:
                if not all(p.is_file() for p in paths):
                    states[artifact.name] = "missing"
                elif any(sha256_file(p) != digest for p, digest in zip(paths, artifact.files.values())):
                    states[artifact.name] = "changed"
                else:
                    states[artifact.name] = "ok"
            except OSError:  # unreadable: as good as missing
                states[artifact.name] = "missing"
        return states

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
        path = self.path_of(name, verify_hash=False)
        # its own folder, files under their own names: an ONNX finds its external-data companions
        # beside it, and nothing here is a file the commit would move into the bundle
        folder = update.path(".source-" + name)
        folder.mkdir(exist_ok=True)
        for relative, digest in artifact.files.items():
            source, copy = self._folder() / relative, folder / relative
            copy.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(source, copy)
            except FileNotFoundError:
                raise CbamDeployError(f"artifact {name}: {source} is missing; run the command that built it again") from None
            except OSError:
                shutil.copyfile(source, copy)
            if sha256_file(copy) != digest:
                raise CbamDeployError(f"artifact {name} ({source}) does not match the sha256 in the manifest: it was "
                                      "changed or replaced meanwhile; run the command again")
        return artifact, folder / artifact.path

    def _folder(self) -> Path:
        if self.directory is None:
            raise CbamDeployError("this manifest was given without its bundle folder, so its files cannot be found")
        return self.directory


def check_artifact_names(manifest, names: list[str] | None, bundle: str | Path, option: str = "--artifact") -> None:
    """Every requested artifact exists in the bundle (checked before any measuring)."""
    if not names:
        return
    have = Bundle.of(manifest).artifact_names
    unknown = [n for n in names if n not in have]
    if unknown:
        raise CbamDeployError(
            f"{option}: bundle {bundle} has no artifact {', '.join(repr(u) for u in unknown)}; "
            f"it has {', '.join(have) or 'none'}"
        )
