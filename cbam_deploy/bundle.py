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
import posixpath
from dataclasses import dataclass, field
from pathlib import Path

from .checks import shorten
from .errors import CbamDeployError
from .formats import get as get_format
from .fsutil import UnsafePath, copy_checked, file_signature, resolve_inside, sha256_no_follow, written_digest
from .manifest import MANIFEST_NAME, ROOT_ARTIFACT, fixed_batch, read_manifest_file
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
        """What ``models.build_model`` takes: the factory (absolute path), a library's file (``spec``, absolute), or
        the zoo name."""
        return self.factory or self.raw.get("spec") or self.name

    @property
    def gate_list(self) -> list[dict] | None:
        """The model's gates as the finder recorded them; None when the manifest has no record (an
        model was not searched) or could not be traced: the exported graphs are then searched alone."""
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
    of ``backends.tensorrt.exporter`` and ``serve.triton``)."""

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
        # what one command has checked or opened already, so that nothing is done twice: a file's
        # (relative path, sha256) -> the stat of the file that matched; and whatever the floors above
        # keep per artifact version (its graph, its gates, its runners: ``memo``)
        self._verified: dict[tuple[str, str], tuple] = {}
        self._memo: dict[tuple, object] = {}

    @classmethod
    def open(cls, path: str | Path) -> Bundle:
        """The bundle in folder ``path`` (or of the manifest file ``path``): recovered from a killed
        command if need be, read under the shared lock, checked against the schema."""
        path = Path(path)
        manifest = read_manifest(path)
        return cls(manifest, path if path.is_dir() else path.parent)

    def refresh(self) -> Bundle:
        """The bundle as committed now (after this command's own commits), sharing what this object has
        checked and opened (``memo``, keyed by content, so what was opened before a commit is reused after it)."""
        return self.derived(Bundle.open(self._folder()).manifest, self._folder())

    def derived(self, manifest: dict, directory: str | Path) -> Bundle:
        """Another view (a newer manifest, a staging folder) sharing this one's checks and ``memo``."""
        other = Bundle(manifest, directory)
        other._verified, other._memo = self._verified, self._memo
        other._companions_checked = self._companions_checked
        return other

    def memo(self, kind: str, name: str, make, *extra):
        """What the floors above made once per artifact version (``kind``: "graph", "gates", "runner",
        ...; ``extra``: what else the thing depends on, e.g. the runtime): ``make()`` the first time, the
        same object after that. Keyed by the artifact's sha256: its content, whatever its path or name."""
        key = (kind, self.artifact(name).sha256, *extra)
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    def remember(self, kind: str, name: str, value, *extra) -> None:
        """Keep ``value`` as what ``memo`` would make (a graph or runner the command already has)."""
        if value is not None:
            self._memo.setdefault((kind, self.artifact(name).sha256, *extra), value)

    def graph(self, name: str):
        """The artifact's graph as its format reads it (``formats.Format.read_graph``), parsed once."""
        artifact = self.artifact(name)
        return self.memo("graph", name, lambda: get_format(artifact.format).read_graph(self.path_of(name)))

    def found_gates(self, name: str) -> list:
        """The gates the finder finds in the artifact's graph, named after the model's, found once."""
        artifact = self.artifact(name)
        return self.memo("gates", name, lambda: get_format(artifact.format).gates(self.graph(name),
                                                                                 self.model.gate_list))

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
        """What ``--cbam-opt`` rewrote at export (``cbam_opt.optimize_for_export``'s record, kept with the
        bundle's first artifact)."""
        source = next((a for a in self.artifacts if a.name == ROOT_ARTIFACT), None)
        record = (source.export or {}).get("cbam_opt") if source else None
        return record or {"mode": "off", "rewrites": []}

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
                intact = not verify_hash or self._intact(file, relative, digest)
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

    def _intact(self, file: Path, relative: str, digest: str) -> bool:
        """Whether ``file`` holds the bytes of sha256 ``digest``: hashed once per command, then trusted
        while the file is the same one (device, inode, size and modification time unchanged: a bundle's
        files are only ever replaced by a rename, never written in place)."""
        signature = file_signature(file)
        if self._verified.get((relative, digest)) == signature or written_digest(signature) == digest:
            self._verified[(relative, digest)] = signature
            return True
        if sha256_no_follow(file) != digest:
            return False
        self._verified[(relative, digest)] = signature
        return True

    def _check_companions(self, artifact: ArtifactRecord, path: Path) -> None:
        problems = self._undeclared_companions(artifact, path)
        if problems:
            raise CbamDeployError(f"artifact {artifact.name}: {problems[0]}; a bundle's files must be plain files "
                                  "inside it, each with its sha256 (re-export the bundle)")

    def _undeclared_companions(self, artifact: ArtifactRecord, path: Path) -> list[str]:
        """What is wrong with the files the artifact's runtime opens beside its own (an ONNX's external
        data, an IR's or an ncnn model's .bin, a sidecar), as the formats table names them (relative to
        the artifact's folder): one that exists but that the manifest does not record with a sha256
        under that same place (a crafted ONNX could point anywhere; a manifest could check one file
        while the runtime reads another beside the artifact), or a recorded companion that does not
        lie where the runtime reads it. Read once per artifact version."""
        key = (artifact.name, artifact.sha256)
        if key not in self._companions_checked:
            try:
                wanted = get_format(artifact.format).companions(path)
            except CbamDeployError:
                raise
            except Exception as exc:  # a file the format's reader cannot parse: the runtime would fail too
                raise CbamDeployError(f"artifact {artifact.name}: cannot read {path}: {str(exc)[:200]}") from None
            folder = posixpath.dirname(artifact.path)
            beside = {c: posixpath.normpath(posixpath.join(folder, c)) for c in wanted}
            # one that is not there cannot be read (the runtime will say it is missing); one that is there
            # (a file, a link) but not recorded with its sha256, where the runtime reads it, is refused
            problems = [f"its file refers to {shorten(c)}, which the manifest does not record" for c in wanted
                        if beside[c] not in artifact.companion_files and os.path.lexists(path.parent / c)]
            reads = ", ".join(shorten(b) for b in sorted(set(beside.values()))) or "none"
            problems += [f"the manifest records its companion {shorten(c)}, which is not one its runtime reads beside "
                         f"it ({reads})" for c in artifact.companion_files if c not in beside.values()]
            self._companions_checked[key] = problems
        return self._companions_checked[key]

    def check_integrity(self) -> dict[str, str]:
        """Per artifact: 'ok', 'changed' (a file no longer matches its sha256), 'missing', or 'unsafe'
        (a file is a symbolic link, or not a regular file: ``resolve`` refuses it)."""
        states = {}
        for artifact in self.artifacts:
            state = "ok"
            for relative, digest in artifact.files.items():
                try:
                    if not self._intact(self.resolve(relative), relative, digest):
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
                intact = self._intact(copy, relative, digest)  # the same inode: checked once per command
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
