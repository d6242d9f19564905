"""Model libraries as model sources (``--model`` specs a library builds: timm names, Ultralytics yamls and
checkpoints): each registers a ``LibrarySource`` here, and export, verify and the rest reach it through
``source_for(spec)`` and ``library(name)``, as they reach the zoo and factories."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import CbamDeployError


@dataclass(frozen=True)
class LibrarySource:
    """One library. ``name`` is the manifest's ``model.source``; ``matches(spec)`` says whether a ``--model``
    spec is this library's; ``check(spec, stem)`` refuses a bad spec cheaply, before any work (a missing
    file, the library not installed: one line); ``build(spec, weights, num_classes, trust)`` returns the
    ``LoadedModel`` (``trust``: a ``CodeTrust``, for sources whose files hold code, such as pickles);
    ``needs_trust(spec)`` is why building it runs code from a file (None: it does not); ``peers()`` is
    {peer name: builder(source) -> LibraryPeer} for ``bench --peers`` on a bundle of this library's model: what
    the library's own exporter makes of the same model (``peers.PeerSource``)."""

    name: str
    matches: Callable[[str], bool]
    check: Callable[[str, str], None]
    build: Callable[..., object]
    needs_trust: Callable[[str], str | None] = lambda spec: None
    peers: Callable[[], dict] = dict


@dataclass
class LibraryPeer:
    """What a library's own exporter made, for ``bench --peers``: ``run`` (a batch -> the model's first
    output), the runtime that runs it (``backend``), its precision, how it was made (the library's call and
    settings) and what else it took or found (``facts``: its seconds, whether its INT8 quantized the gates)."""

    run: Callable
    backend: str
    precision: str
    made_by: str
    threads: Callable[[], int | None]
    facts: dict = field(default_factory=dict)


_SOURCES: dict[str, LibrarySource] = {}


def register_library(source: LibrarySource) -> LibrarySource:
    if source.name in _SOURCES or source.name in ("zoo", "factory", "module"):
        raise CbamDeployError(f"model source {source.name!r} is registered twice")
    _SOURCES[source.name] = source
    return source


def source_for(spec) -> LibrarySource | None:
    """The library whose spec ``spec`` is (None: a zoo name or a factory)."""
    if not isinstance(spec, str):
        return None
    return next((s for s in _SOURCES.values() if s.matches(spec)), None)


def library(name: str) -> LibrarySource | None:
    return _SOURCES.get(name)


def library_names() -> tuple[str, ...]:
    return tuple(_SOURCES)
