"""The formats registry: every artifact format is a plug-in, and the core reaches it only through its row.

A format lives in one package (``backends/<format>/`` for the built-in ones, any installed package for
others) whose ``plugin`` module holds one ``Format`` object: its row. The row says, in one place,
everything the rest of the tool needs to know of the format:

- facts: name, title, file extension, the files beside the artifact (``companions``), the precisions
  its build makes, the INT8 recipe that feeds it, its install probe (``Extra``), its Triton/KServe
  mapping or the one line why it has none;
- the runtimes that run it (``Runtime``: onnxruntime's execution providers, OpenVINO, ...);
- its INT8 recipes (``Recipe``, the targets of ``quantize --target``);
- what it does: the build's ``make`` step, its gate reader (the gates in its graph and their maps,
  the gate-policy check on an INT8 graph), its per-node profile, its batch bounds for serving and
  benchmarking, its summary notes, its peers for ``bench --peers``.

A capability a format does not have raises ``Unsupported`` with the one line saying why; the caller
turns it into a skipped row, never a failure. No core module compares a format's name or imports a
format's package: each asks ``get(name)`` (or walks ``rows()``) and calls the row.

Rows are found once per process (``discover``): the built-in plug-ins, then every installed package
that declares an entry point in the group ``cbam_deploy.formats`` (``name = "pkg.module:OBJECT"``), the
way a third-party package adds a format without any change here. Discovery imports the plug-in modules
by name at the first lookup: the core depends on the plug-in interface defined here, never on a
plug-in, which is why these imports are dynamic (``importlib``) and not at the top of a core module.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import sys
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import BackendUnavailable, CbamDeployError

ENTRY_POINT_GROUP = "cbam_deploy.formats"
# the plug-ins shipped with cbam-deploy, found even when the package runs from a source tree
BUILTIN = tuple(f"cbam_deploy.backends.{name}.plugin" for name in ("onnx", "openvino", "tensorrt", "ncnn", "executorch"))
PRECISIONS = ("fp32", "fp16", "int8")
METHODS = ("minmax", "entropy", "percentile")
GATE_POLICIES = ("int8", "fp")


class Unsupported(BackendUnavailable):
    """A format lacks a capability (gate maps, a profile, ...): the message is the one line saying why."""


# ---------------------------------------------------------------------------------------------- facts

@dataclass(frozen=True)
class Extra:
    """An optional package set a format, runtime or peer needs: the modules to import and the one line a
    user reads when they are missing (``what`` is not installed: ``install``)."""

    what: str
    modules: tuple[str, ...]
    install: str

    @property
    def missing(self) -> str:
        return f"{self.what} is not installed: {self.install}"

    def probe(self) -> str | None:
        """None when every module can be found here (nothing is imported), else the one line."""
        for module in self.modules:
            try:
                if importlib.util.find_spec(module) is None:
                    return self.missing
            except (ImportError, ValueError):  # a module set to None in sys.modules, a broken package
                return self.missing
        return None

    def require(self, *modules: str) -> Any:
        """The first of ``modules`` (default: this extra's first module) imported, after importing the
        others; ``BackendUnavailable`` in one line when one is missing or cannot be imported (a broken
        or partial install)."""
        names = modules or self.modules[:1]
        missing = self.probe()
        if missing:
            raise BackendUnavailable(missing)
        imported = []
        for name in names:
            try:
                __import__(name)  # the import statement's own hook: what a test or a sandbox may block
                imported.append(sys.modules[name])
            except ImportError as exc:
                if exc.name in (None, name, name.split(".")[0]):  # the module itself is not there
                    raise BackendUnavailable(self.missing) from None
                raise BackendUnavailable(f"{self.what} cannot be imported ({type(exc).__name__}: {exc}): "
                                         f"{self.install}") from None
            except Exception as exc:  # a broken or partial install
                first = str(exc).splitlines()[0][:200] if str(exc) else ""
                raise BackendUnavailable(f"{self.what} cannot be imported ({type(exc).__name__}: {first}): "
                                         f"{self.install}") from None
        return imported[0]

    def require_all(self, *modules: str) -> list:
        """Each of ``modules`` imported (the same refusals as ``require``)."""
        self.require(*modules)
        return [sys.modules[name] for name in modules]


@dataclass(frozen=True)
class TritonFragment:
    """How Triton serves the format: the config line naming its backend, the file names in the
    model version folder, the default instance kind and the kinds that backend accepts."""

    config_line: str
    files: tuple[str, ...]
    default_kind: str
    kinds: tuple[str, ...]


@dataclass(frozen=True)
class Runtime:
    """What runs artifacts: the formats it runs, a cheap probe (None when this machine has it, else
    why not), and a factory ``(path, precision, threads) -> Runner``."""

    name: str
    formats: tuple[str, ...]
    summary: str
    probe: Callable[[], str | None]
    factory: Callable[..., Any]
    execution_provider: str | None = None  # the onnxruntime EP it asks for first, for ort-* runtimes

    def open(self, path: str | Path, precision: str = "fp32", threads: int | None = None):
        runner = self.factory(Path(path), precision, threads)
        runner.runtime = self.name
        return runner


@dataclass(frozen=True)
class Recipe:
    """An INT8 recipe (a ``quantize --target``): the format of the artifact it writes, its calibration
    methods (the first is the default) and default gate policy, and ``run(job) -> (quantization
    record, export record or None)`` (``job``: ``backends.base.RecipeJob``). ``from_pytorch``: it
    quantizes the PyTorch model (rebuilt, so only where the user trusts its code), not the FP32 ONNX.
    ``run`` returns a ``calib.recipes.RecipeResult``."""

    target: str
    writes: str
    summary: str
    run: Callable[[Any], Any]
    methods: tuple[str, ...] = ("minmax", "entropy", "percentile")
    default_gates: str = "fp"
    from_pytorch: bool = False
    refusal: str = ""  # appended to the error for a method outside ``methods``
    requires: Extra | None = None  # what it needs installed (default: what the format it writes needs)

    @property
    def default_method(self) -> str:
        return self.methods[0]

    def probe(self) -> str | None:
        """None when the recipe can run here, else the one line why not (nothing imported)."""
        return self.requires.probe() if self.requires else get(self.writes).probe()

    def resolve(self, method: str | None, gates: str | None) -> tuple[str, str]:
        """(method, gates), the defaults filled in; one error naming what is not offered."""
        method = method or self.default_method
        if method not in METHODS:
            raise CbamDeployError(f"unknown calibration method {method!r}; choose from {', '.join(METHODS)}")
        if method not in self.methods:
            raise CbamDeployError(f"target {self.target} calibrates with {' or '.join(self.methods)}, not {method}"
                                  + (f": {self.refusal}" if self.refusal else ""))
        gates = gates or self.default_gates
        if gates not in GATE_POLICIES:
            raise CbamDeployError(f"--gates must be int8 or fp, got {gates!r}")
        return method, gates


# ---------------------------------------------------------------------------------------------- the row

class Format:
    """One artifact format's row. Subclass it in the format's package and override what the format
    has; every capability left as it is raises ``Unsupported`` with the one line why. The class
    attributes are the facts; the methods take what the caller has already opened (the ``Bundle``,
    the artifact's record, its checked path, its parsed graph), so nothing is opened twice."""

    name: str = ""
    title: str = ""
    extension: str = ""
    precisions: tuple[str, ...] = ("fp32",)        # what its build makes from the bundle
    int8_recipe: str | None = None                  # the quantize target whose artifact is this format's INT8
    int8_from_recipe_artifact: bool = False         # its INT8 is built from that recipe's artifact (an engine)
    build_source: str = "onnx"                      # what its build starts from: "onnx" or "pytorch"
    made_from_pytorch: str = ""                     # "<what> is made from the PyTorch model", for skips
    root: bool = False                              # the format of the bundle's first artifact (the export)
    reference_runtime: str | None = None            # root: the runtime that runs it as a reference (exact fp32)
    extra: Extra | None = None                      # what must be installed to build and run it
    runtimes: tuple[Runtime, ...] = ()
    preferred_runtimes: tuple[str, ...] = ()         # the default runtime: the first of these available
    recipes: tuple[Recipe, ...] = ()
    triton: TritonFragment | None = None
    no_triton: str = ""                             # with triton None: why it is not served there
    needs_gpu: bool = False                         # a server for it asks for a GPU
    # the one line for each capability a format lacks (override the method, or just the line)
    no_build: str = ""
    no_gates: str = ""
    no_profile: str = ""
    # profile: {op type: "layout" | "conv" | "quantize/dequantize"}; other ops count as "other"
    op_categories: dict = {}

    # ------------------------------------------------------------------ facts

    def probe(self) -> str | None:
        """None when its build and runtime can be used here, else the one line why not."""
        return self.extra.probe() if self.extra else None

    def companions(self, path: Path) -> tuple[str, ...]:
        """The files beside the artifact's file that its runtime opens, named relative to its folder
        (each is recorded in the manifest with its sha256)."""
        return ()

    def file_name(self, name: str) -> str:
        """The artifact's file name in the bundle (the naming scheme: ``model.<name>.<extension>``)."""
        return f"model.{name}.{self.extension}"

    def skip_build(self, precision: str) -> str | None:
        """Why this format's build does not make ``precision`` (None: it does)."""
        if precision == "int8" and self.int8_recipe and not self.int8_from_recipe_artifact:
            return f"{self.title} INT8 comes from the {self.int8_recipe} quantize recipe"
        if precision not in self.precisions:
            return f"{self.title} is not built in {precision} here"
        return None

    # ------------------------------------------------------------------ the build

    def make(self, job) -> dict:
        """Write the artifact's file(s) at ``job.out_path`` (``backends.base.BuildJob``); return its
        export record. Raise ``BackendUnavailable`` for what cannot be built here."""
        raise Unsupported(self.no_build or f"{self.title} has no build")

    def export_root(self, module, out_path: Path, options) -> dict:
        """The root format only: the bundle's first artifact, exported from the PyTorch module."""
        raise Unsupported(f"{self.title} is not the bundle's root format")

    def export_options(self, **options):
        """The root format only: its export options, checked."""
        raise Unsupported(f"{self.title} is not the bundle's root format")

    # ------------------------------------------------------------------ the graph and its gates

    def read_graph(self, path: Path):
        """The artifact's graph, parsed once per command (the caller keeps it)."""
        raise Unsupported(self.no_gates or f"{self.title}: its graph cannot be read here")

    def gates(self, graph, expected: list[dict] | None) -> list:
        """The gates found in the graph (``gates.GraphGate``), matched to the model's (``expected``)."""
        raise Unsupported(self.no_gates or f"{self.title}: its gates cannot be read")

    def gate_maps(self, path: Path, graph, found: list, precision: str, x, threads: int | None = None) -> tuple:
        """({gate name: the gate's raw output for ``x``}, {output name: the model's output}), computed by
        the format's own runtime in one run (a probe of the artifact that exposes each gate too)."""
        raise Unsupported(self.no_gates or f"{self.title}: its gate maps cannot be read")

    def check_policy(self, artifact, graph, found: list | None, expected: list[dict] | None, policy: str) -> dict:
        """The INT8 gate policy the manifest states, checked on the artifact (``gates.policy_check``):
        ``graph`` and ``found`` are its graph and gates (None where the format has no gate reader)."""
        raise Unsupported(self.no_gates or f"{self.title}: its gate policy cannot be checked")

    def check_output_tail(self, artifact, graph) -> dict:
        """Whether an INT8 artifact keeps its output tail in float (``gates.tail_check`` on its graph, for a
        format that reads its graph); by default the check its recipe made when it built it
        (``quantization.output_tail``)."""
        recorded = (artifact.quantization or {}).get("output_tail")
        if isinstance(recorded, dict) and "held" in recorded:
            return {**recorded, "note": "checked at build (the artifact's graph is not read here)"}
        raise Unsupported(f"{self.title}: no output-tail check recorded with the artifact: build it again")

    # ------------------------------------------------------------------ timing

    def profile(self, path: Path, graph, found: list, precision: str, x, runs: int, warmup: int,
                threads: int | None) -> tuple[list, str]:
        """([(node name, op type, microseconds)] over ``runs`` runs, the tool's description)."""
        raise Unsupported(self.no_profile or f"{self.title}: no per-operator profile")

    bounds_name: str = "its exported batch bounds"  # what ``batch_bounds`` reads, for errors

    def batch_bounds(self, artifact: dict) -> tuple[int, int] | None:
        """(smallest, largest) batch one call may use (an engine's profile, a program's bounds), read
        from the artifact's manifest record; None: any."""
        return None

    def peers(self) -> dict[str, Callable]:
        """``bench --peers``: {peer name: builder(source) -> Runner} for what the engine's own documented
        path gives from the same PyTorch model (``peers.PeerSource``)."""
        return {}

    # ------------------------------------------------------------------ reporting

    def summary(self, artifact) -> dict:
        """Extra fields for export's summary row (layers left generic, delegate partitions, ...)."""
        return {}

    def first_divergence(self, module, path: Path, x, graph=None) -> dict | None:
        """The first module of the PyTorch model whose output the artifact departs from (None: every
        compared point agrees); ``graph``: the artifact's graph when the caller has read it."""
        raise Unsupported(f"{self.title}: no layer-by-layer comparison with PyTorch")

    # ------------------------------------------------------------------ serving elsewhere

    def triton_check(self, bundle, artifact: dict, batched: bool, max_batch: int, triton_release: str | None) -> list[str]:
        """Errors (raised) and warnings (returned) for serving the artifact (its manifest record) in Triton."""
        return []

    def triton_parameters(self, batched: bool, max_batch: int) -> tuple[dict, list[str]]:
        """Backend parameters for config.pbtxt, and the notes that go with them."""
        return {}, []

    def triton_sources(self, artifact) -> list[tuple[str, str]]:
        """(file in the bundle, name in the model version folder) for every file Triton needs."""
        files = self.triton.files if self.triton else ()
        return [(artifact.path, files[0])] + [(c, c) for c in artifact.companion_files] if files else []

    # ------------------------------------------------------------------ what it can do

    @property
    def reads_gates(self) -> bool:
        """Whether its gates' maps can be read (it overrides ``gate_maps``)."""
        return type(self).gate_maps is not Format.gate_maps

    @property
    def profiles(self) -> bool:
        """Whether it gives per-operator times (it overrides ``profile``)."""
        return type(self).profile is not Format.profile

    def why_no_gates(self) -> str:
        readers = ", ".join(r.name for r in rows() if r.reads_gates)
        return self.no_gates or f"{self.name} artifacts have no gate reader (the gates are read from {readers} artifacts)"

    def __repr__(self) -> str:
        return f"<format {self.name}>"


# ---------------------------------------------------------------------------------------------- registry

_ROWS: dict[str, Format] = {}
_FAILED: dict[str, str] = {}
_LOCK = threading.RLock()
_STATE = {"discovered": False, "discovering": False}


def register(row: Format) -> Format:
    """Add a format (a notebook, a test or a plug-in's module may call it); one error when its name is
    taken, it is incomplete, or it names a runtime or recipe that another format has."""
    with _LOCK:
        if not isinstance(row, Format):
            raise CbamDeployError(f"a format plug-in must be a cbam_deploy.formats.Format, got {type(row).__name__}")
        if not row.name or not row.extension or not row.title:
            raise CbamDeployError(f"format plug-in {row!r}: name, title and extension are required")
        if row.name in _ROWS and _ROWS[row.name] is not row:
            raise CbamDeployError(f"format {row.name!r} is registered twice ({type(_ROWS[row.name]).__name__} and "
                                  f"{type(row).__name__})")
        if row.root and any(r.root for r in _ROWS.values() if r is not row):
            raise CbamDeployError(f"format {row.name!r} claims to be the root format, which {root_row().name} is")
        taken_runtimes = {rt.name: r.name for r in _ROWS.values() if r is not row for rt in r.runtimes}
        taken_recipes = {rc.target: r.name for r in _ROWS.values() if r is not row for rc in r.recipes}
        for runtime in row.runtimes:
            if runtime.name in taken_runtimes:
                raise CbamDeployError(f"format {row.name!r}: runtime {runtime.name!r} is {taken_runtimes[runtime.name]}'s")
        for recipe in row.recipes:
            if recipe.target in taken_recipes:
                raise CbamDeployError(f"format {row.name!r}: recipe {recipe.target!r} is {taken_recipes[recipe.target]}'s")
        _ROWS[row.name] = row
        return row


def unregister(name: str) -> None:
    """Remove a format registered by ``register`` (tests; a notebook trying a plug-in twice)."""
    with _LOCK:
        _ROWS.pop(name, None)


def _load(target: str, origin: str) -> None:
    """Import one plug-in: ``pkg.module`` (its ``FORMAT``) or ``pkg.module:OBJECT``; a failure is kept
    (``failed()``) and the other formats still load."""
    module_name, _, attribute = target.partition(":")
    try:
        module = importlib.import_module(module_name)
        row = getattr(module, attribute or "FORMAT")
        register(row)
    except Exception as exc:  # a broken third-party plug-in must not break the tool
        _FAILED[origin] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"


def discover(refresh: bool = False) -> None:
    """Find every format once per process: the built-in plug-ins, then the entry points. ``refresh``:
    look at the entry points again (a plug-in installed since the first lookup); formats already
    registered stay as they are."""
    with _LOCK:
        if _STATE["discovering"] or (_STATE["discovered"] and not refresh):
            return
        _STATE["discovering"] = True
        try:
            for module in BUILTIN:
                if not _STATE["discovered"]:
                    _load(module, module)
            loaded = {type(row).__module__ for row in _ROWS.values()}
            for entry in _entry_points():
                module = entry.value.partition(":")[0]
                if module not in BUILTIN and module not in loaded:
                    _load(entry.value, f"{entry.name} ({entry.value})")
            _STATE["discovered"] = True
        finally:
            _STATE["discovering"] = False


def _entry_points() -> Iterable:
    try:
        return importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    except Exception:  # damaged metadata of some installed distribution
        return ()


def failed() -> dict[str, str]:
    """{plug-in: why it could not be loaded}."""
    discover()
    return dict(_FAILED)


def rows() -> list[Format]:
    """Every format, built-in ones first, in the order they were registered."""
    discover()
    return list(_ROWS.values())


def formats() -> tuple[str, ...]:
    return tuple(r.name for r in rows())


def get(name: str) -> Format:
    discover()
    row = _ROWS.get(name)
    if row is None:
        raise CbamDeployError(f"unknown artifact format {name!r}; known: {', '.join(_ROWS)}")
    return row


def root_row() -> Format:
    """The format of the bundle's first artifact (the export writes it; every other build starts there)."""
    discover()
    found = next((r for r in _ROWS.values() if r.root), None)
    if found is None:
        raise CbamDeployError("no root format is registered (the built-in onnx plug-in failed to load: "
                              f"{_FAILED.get(BUILTIN[0], 'unknown reason')})")
    return found


def recipes() -> dict[str, Recipe]:
    """{quantize target: its recipe}, across formats."""
    return {recipe.target: recipe for row in rows() for recipe in row.recipes}


def recipe(target: str) -> Recipe:
    found = recipes().get(target)
    if found is None:
        raise CbamDeployError(f"unknown target {target!r}; choose from {', '.join(recipes())}")
    return found


def row_for_file(path: str | Path) -> Format | None:
    """The format whose files end as ``path`` does (its extension): for a file another tool made."""
    suffix = Path(path).suffix.lstrip(".").lower()
    return next((r for r in rows() if r.extension == suffix), None)


def all_runtimes() -> dict[str, Runtime]:
    """{runtime name: Runtime}, across formats."""
    return {runtime.name: runtime for row in rows() for runtime in row.runtimes}


def int8_row(target: str) -> Format:
    """The format whose INT8 the quantize ``target`` makes (its ``int8_recipe``), else the one it writes."""
    return next((r for r in rows() if r.int8_recipe == target), get(recipe(target).writes))
