"""The backend table: one module per backend, one registry that every step reads.

A backend owns one artifact format and says, in one place: the file extension and companion files
(every file beside the artifact's own, so that the manifest names every file the bundle holds),
the precisions it builds from the bundle's FP32 ONNX (and how: ``build``), the INT8 recipe that feeds
it, the runtimes it prefers (``cbam_deploy.runtimes`` says which runtimes run which format), whether it is usable on this machine
(``probe``), and its Triton fragment. ``build``, ``bundle``, ``quantize``, ``runtimes``, the Triton
writer and the CLI's help read this table; none of them lists formats of its own.

Adding a backend (TFLite, say) means one new module here that calls ``register(Backend(...))``,
its import in ``_load`` below, a runner class, and its runtime line in ``runtimes.RUNTIMES``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import CbamDeployError


@dataclass(frozen=True)
class TritonFragment:
    """How Triton serves the format: the config line naming its backend, the file names in the
    model version folder, the default instance kind and the kinds that backend accepts."""

    config_line: str
    files: tuple[str, ...]
    default_kind: str
    kinds: tuple[str, ...]


@dataclass(frozen=True)
class BuildOptions:
    """What a build may need beyond the bundle: the INT8 gate policy, TensorRT's profile options."""

    gates: str | None = None
    trt: object = None


@dataclass(frozen=True)
class Backend:
    format: str
    title: str
    extension: str
    precisions: tuple[str, ...]                     # what ``build`` makes from the FP32 ONNX
    quantize_recipe: str | None                     # the INT8 recipe for this format (quantize --target)
    preferred_runtimes: tuple[str, ...]             # the default runtime: the first of these available
    triton: TritonFragment | None
    build: Callable[[Path, str, BuildOptions], object] | None = None  # (bundle, precision, options) -> BuildOutcome
    probe: Callable[[], str | None] = lambda: None  # None when usable here, else why not
    # the files beside the artifact's file (given its path), named relative to its folder; each is in the manifest
    companions: Callable[[Path], tuple[str, ...]] = lambda path: ()


REGISTRY: dict[str, Backend] = {}


def register(backend: Backend) -> Backend:
    REGISTRY[backend.format] = backend
    return backend


def _load() -> None:
    if not REGISTRY:
        from . import onnxruntime, openvino, tensorrt  # noqa: F401  (each registers itself)


def get(fmt: str) -> Backend:
    _load()
    if fmt not in REGISTRY:
        raise CbamDeployError(f"unknown artifact format {fmt!r}; known: {', '.join(REGISTRY)}")
    return REGISTRY[fmt]


def formats() -> tuple[str, ...]:
    _load()
    return tuple(REGISTRY)


def all_backends() -> list[Backend]:
    _load()
    return list(REGISTRY.values())
