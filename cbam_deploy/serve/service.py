"""The model service: what serving a model means, without HTTP or gRPC.

``ModelService`` is one model: its runner, its own dynamic batcher, the checks every request must
pass (input name, datatype, shape, finite values, outputs asked for), inference and classification.
``ModelRepository`` is the models one server serves, by name, plus what they share: the decode
worker threads, the shutdown flag and the Prometheus metrics. The HTTP routes (``app.py``) and
the gRPC endpoint (``grpc_server.py``) are thin layers over these two: they decode their wire
format, call the service, encode the answer. Both protocols reach the same batcher, so requests
from either are batched together.

Model names are stable and clash-free: a model is named after its bundle's model (a factory
file's stem and function for a bring-your-own model; ``--name`` overrides it when one bundle is
served); when several bundles would get the same name, each of
those is named after its bundle folder instead, then ``<model>-<artifact>``, then
``<model>-<first 8 hex of the artifact's sha256>``. A name depends only on the bundles served,
never on the order they were given in.
"""

from __future__ import annotations

import asyncio
import collections
from pathlib import Path

import numpy as np

from ..bundle import Bundle
from ..checks import check_name, safe_name, shorten
from ..errors import CbamDeployError
from ..batching import fit_batch
from ..loaders import open_artifact
from ..manifest import MANIFEST_NAME
from .batcher import BatcherError, DynamicBatcher
from .config import ServeConfig
from .images import decode_image
from .protocol import MAX_DIMS, MAX_ELEMENTS, ProtocolError, decode_input, parse_infer_request
from .threads import DaemonThreads


class Metrics:
    """The server's Prometheus registry: request counters and latency by endpoint (both protocols),
    per-model batch sizes, queue depth and answered requests, readiness."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram  # lazy: the optional serve extra

        self.registry = registry = CollectorRegistry()
        self.requests = Counter("cbam_requests_total", "Requests by endpoint and status code (HTTP status or gRPC code)",
                                ["endpoint", "code"], registry=registry)
        self.errors = Counter("cbam_errors_total", "Requests answered with an error", ["endpoint"], registry=registry)
        self.unhandled = Counter("cbam_unhandled_errors_total", "Unexpected exceptions, answered with 500 (gRPC INTERNAL)",
                                 ["endpoint"], registry=registry)
        self.latency = Histogram("cbam_request_latency_seconds", "Request latency", ["endpoint"], registry=registry,
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.batch_sizes = Histogram("cbam_batch_size", "Samples per executed batch", ["model"], registry=registry,
                                     buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.model_requests = Counter("cbam_model_requests_total", "Inference requests by model, protocol and status",
                                      ["model", "protocol", "code"], registry=registry)
        self.queue_depth = Gauge("cbam_queue_depth", "Requests waiting for or in inference", ["model"], registry=registry)
        self.ready = Gauge("cbam_ready", "1 while inference requests are served (every model)", registry=registry)

    def text(self) -> tuple[bytes, str]:
        from prometheus_client import generate_latest  # lazy: the optional serve extra
        from prometheus_client.exposition import CONTENT_TYPE_LATEST  # lazy: as above

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def _labels(path: str | None, bundle: Bundle, classes: int, model: str) -> list[str]:
    if path:
        try:
            names = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            raise CbamDeployError(f"cannot read labels file {path}: {exc}") from None
        if len(names) != classes:
            raise CbamDeployError(f"labels file {path} has {len(names)} lines; the model {model} has {classes} classes")
        return names
    return list(bundle.labels or [str(i) for i in range(classes)])


def default_name(bundle: Bundle) -> str:
    """The bundle's model name; for a bring-your-own factory ('path/to/heads.py:detector') the file's
    stem and the factory ('heads_detector'), not a path that differs from machine to machine."""
    name = bundle.model.name
    path, colon, factory = name.rpartition(":")
    if colon and path.endswith(".py"):
        return f"{Path(path).stem}_{factory}"
    return name


class ModelService:
    """One model: runner, batcher, request checks, infer, classify. No transport here."""

    def __init__(self, name: str, bundle: Bundle, artifact: str, runner, config: ServeConfig,
                 metrics: Metrics, labels: str | None = None) -> None:
        self.name, self.bundle, self.artifact, self.runner = name, bundle, artifact, runner
        self.config, self.metrics = config, metrics
        self.input_spec = bundle.input
        self.shape = self.input_spec.shape
        self.output_specs = bundle.outputs
        self.output_names = [o.name for o in self.output_specs]
        self.classifier = bundle.classification_output  # /v1/classify serves classifiers only
        self.batch_size = bundle.fixed_batch
        classes = bundle.model.num_classes or (self.classifier.shape[-1] if self.classifier else 0)
        self.labels = _labels(labels, bundle, classes, name) if self.classifier else []
        self.side = self.input_spec.side
        self.max_side = 8 * self.side  # for a dynamic height/width: bounds the activations one request can cost
        self.max_batch = 1 if self.batch_size else config.max_batch
        if not self.batch_size:  # never batch past what the artifact runs in one call (an engine's profile, ...)
            self.max_batch = fit_batch(bundle, bundle.artifact(artifact), self.max_batch)
        self.batcher = DynamicBatcher(runner.infer, self.max_batch, config.batch_timeout_ms,
                                      on_batch=metrics.batch_sizes.labels(name).observe, max_queue=config.max_queue,
                                      wait_s=config.request_timeout_s)
        metrics.queue_depth.labels(name).set_function(lambda: self.batcher.depth)

    # ------------------------------------------------------------ description

    @staticmethod
    def tensor_shape(dims: list) -> list[int]:
        return [d if isinstance(d, int) else -1 for d in dims]

    def metadata(self) -> dict:
        """The Open Inference Protocol's model metadata (the gRPC endpoint sends the same fields)."""
        return {
            "name": self.name, "versions": ["1"], "platform": f"cbam-deploy/{self.runner.backend}",
            "inputs": [{"name": self.input_spec.name, "datatype": "FP32", "shape": self.tensor_shape(self.shape)}],
            "outputs": [{"name": o.name, "datatype": "FP32", "shape": self.tensor_shape(o.shape)}
                        for o in self.output_specs],
            "parameters": {"artifact": self.artifact, "precision": self.runner.precision, "device": self.runner.device},
        }

    def check_version(self, version: str | None) -> None:
        if version not in (None, "", "1"):
            raise ProtocolError(f"model {self.name!r} has only version 1", 404)

    def not_ready(self) -> str | None:
        return self.batcher.not_ready()

    # ------------------------------------------------------------ request checks

    def check_input(self, name: str, datatype: str, count: int) -> None:
        """The request's input tensors: one, by the model's input name, FP32."""
        expected = self.input_spec.name
        if count != 1:
            raise ProtocolError(f"the model has one input ({shorten(expected)}); got {count}")
        if name != expected:
            raise ProtocolError(f"unknown input {shorten(name)}; the model's input is {shorten(expected)}")
        if datatype != "FP32":
            raise ProtocolError(f"input datatype {datatype} is not accepted; send FP32")

    def outputs_for(self, requested: list[str]) -> list[str]:
        """The outputs to answer: those asked for, in that order, or every output when none was."""
        for name in requested:
            if name not in self.output_names:
                raise ProtocolError(f"unknown output {shorten(name)}; the model's outputs are {', '.join(self.output_names)}")
        return list(requested) or list(self.output_names)

    @staticmethod
    def check_shape(shape: list[int]) -> int:
        """The element count of a declared shape (at most MAX_DIMS dims, none negative, not absurd)."""
        if len(shape) > MAX_DIMS or any(d < 0 for d in shape):
            raise ProtocolError(f"input shape {shape} is not a shape (at most {MAX_DIMS} dims, none negative)")
        count = 1
        for d in shape:
            count *= d
        if count > MAX_ELEMENTS:
            raise ProtocolError(f"input shape {shape} has {count} elements (at most {MAX_ELEMENTS})")
        return count

    def validate_batch(self, array: np.ndarray) -> np.ndarray:
        shape, side = self.shape, self.side
        fixed = [d if isinstance(d, int) else None for d in shape[1:]]
        if array.ndim != 4 or any(e is not None and a != e for a, e in zip(array.shape[1:], fixed)):
            raise ProtocolError(f"input shape {list(array.shape)} does not match the model's {shape} "
                                f"(e.g. [1, {shape[1]}, {side}, {side}])")
        if array.shape[0] < 1 or (self.batch_size and array.shape[0] != self.batch_size):
            raise ProtocolError(f"batch {array.shape[0]} is not accepted: the model takes {self.batch_size or 'any positive'}")
        if not all(1 <= d <= self.max_side for d, e in zip(array.shape[2:], fixed[1:]) if e is None):
            raise ProtocolError(f"input height and width must be 1 to {self.max_side} pixels, got {list(array.shape[2:])}")
        if not np.isfinite(array).all():
            raise ProtocolError("input holds NaN or Inf")
        return np.ascontiguousarray(array, dtype=np.float32)

    def parse_rest(self, body: bytes, header_length: str | None):
        """An Open Inference Protocol HTTP/JSON body (with or without binary tensors), checked: the
        parsed request, its input batch and the outputs to answer. Runs on a worker thread."""
        request, binary = parse_infer_request(body, header_length)
        spec = request.inputs[0]
        self.check_input(spec.name, spec.datatype, len(request.inputs))
        wanted = self.outputs_for([out.name for out in request.outputs or []])
        array, _ = decode_input(spec, binary, 0)
        return request, self.validate_batch(array), wanted

    # ------------------------------------------------------------ work

    async def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Every output of the model for a checked batch, through this model's batcher."""
        return await self.batcher.infer(batch)

    async def classify(self, data: bytes, top_k: int, workers: DaemonThreads) -> dict:
        """Top-k classes of an encoded image (decoded and preprocessed on ``workers``)."""
        if self.classifier is None:
            raise ProtocolError(f"/v1/classify serves classifiers; {self.name} has the outputs "
                                f"{', '.join(self.output_names)} (use /v2/models/{self.name}/infer)", 404)
        if not data:
            raise ProtocolError("empty body: send an image (raw bytes or multipart)")
        config = self.config
        array = (await workers.run(decode_image, data, self.input_spec.raw, config.max_image_pixels,
                                   config.max_aspect))[None]
        if self.batch_size:
            array = np.repeat(array, self.batch_size, axis=0)
        logits = (await self.infer(array))[self.classifier.name][0].astype(np.float64)
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        top = np.argsort(-probs)[:max(1, min(top_k, len(probs)))]
        return {"model": self.name, "top_k": [{"index": int(i), "label": self.labels[i], "score": float(probs[i])}
                                              for i in top]}

    def count(self, protocol: str, code: str) -> None:
        self.metrics.model_requests.labels(self.name, protocol, code).inc()


class ModelRepository:
    """The models of one server, by name, and what they share (decode workers, shutdown, metrics)."""

    def __init__(self, services: list[ModelService], config: ServeConfig, metrics: Metrics) -> None:
        self.models = {s.name: s for s in services}
        self.config, self.metrics = config, metrics
        self.workers: DaemonThreads | None = None  # both made when the server starts
        self.stopping: asyncio.Event | None = None  # set when the server begins to shut down
        metrics.ready.set_function(lambda: 0 if self.not_ready() else 1)

    @property
    def first(self) -> ModelService:
        return next(iter(self.models.values()))

    def get(self, name: str, version: str | None = None) -> ModelService:
        service = self.models.get(name)
        if service is None:
            served = ", ".join(repr(n) for n in self.models)
            raise ProtocolError(f"unknown model {shorten(name)}; this server serves {served}", 404)
        service.check_version(version)
        return service

    def shutting_down(self) -> bool:
        return self.stopping is not None and self.stopping.is_set()

    def not_ready(self, service: ModelService | None = None) -> str | None:
        """None while requests are served (by ``service``, or by every model), else why not."""
        if self.shutting_down():
            return "the server is shutting down"
        for model in [service] if service else self.models.values():
            reason = model.not_ready()
            if reason:
                return reason if service or len(self.models) == 1 else f"model {model.name}: {reason}"
        return None

    def check_ready(self, service: ModelService | None = None) -> None:
        reason = self.not_ready(service)
        if reason:
            raise BatcherError(f"not ready: {reason}")

    def index(self, ready_only: bool = False) -> list[dict]:
        """The repository index of the Open Inference Protocol's repository extension (Triton's form)."""
        rows = []
        for name, service in self.models.items():
            reason = self.not_ready(service)
            if ready_only and reason:
                continue
            rows.append({"name": name, "version": "1", "state": "UNAVAILABLE" if reason else "READY",
                         "reason": reason or ""})
        return rows

    async def start(self) -> None:
        self.workers, self.stopping = DaemonThreads(self.config.decode_threads, "cbam-deploy-decode"), asyncio.Event()
        for service in self.models.values():
            service.batcher.start()

    def begin_shutdown(self) -> None:
        if self.stopping is not None:
            self.stopping.set()

    async def stop(self) -> None:
        for service in self.models.values():
            await service.batcher.stop()
        if self.workers:
            self.workers.close()


# ---------------------------------------------------------------- loading

def bundle_paths(paths: str | list[str] | tuple[str, ...]) -> list[Path]:
    """Each path is a bundle, or a folder whose sub-folders are bundles (those, sorted by name)."""
    found: list[Path] = []
    for raw in [paths] if isinstance(paths, (str, Path)) else list(paths):
        path = Path(raw)
        if path.is_dir() and not (path / MANIFEST_NAME).is_file():
            inside = sorted(p for p in path.iterdir() if p.is_dir() and (p / MANIFEST_NAME).is_file())
            linked = [p for p in inside if p.is_symlink()]
            if linked:  # the folder given is what is served: a link in it would serve a bundle from elsewhere
                raise CbamDeployError(f"{linked[0]} is a symbolic link; a folder of bundles holds the bundles "
                                      "themselves (name a linked bundle on the command line instead)")
            if not inside:
                raise CbamDeployError(f"{path} is neither a bundle nor a folder of bundles (no {MANIFEST_NAME} in it "
                                      "or in its sub-folders)")
            found += inside
        else:
            found.append(path)  # a bundle, or a manifest file; read_manifest says what is wrong with it
    if not found:
        raise CbamDeployError("no bundle to serve")
    seen = collections.Counter(p.resolve() for p in found)
    twice = [str(p) for p, n in seen.items() if n > 1]
    if twice:
        raise CbamDeployError(f"the same bundle is given twice: {', '.join(twice)}")
    return found


def model_names(entries: list[dict]) -> list[str]:
    """A distinct name for each of ``entries`` ({base, folder, artifact, sha256}); see the module doc."""
    names = [safe_name(e["base"]) for e in entries]
    tiers = (lambda e: e["folder"], lambda e: f"{e['base']}-{e['artifact']}", lambda e: f"{e['base']}-{e['sha256'][:8]}")
    for tier in tiers:
        clashing = {n for n, k in collections.Counter(names).items() if k > 1}
        if not clashing:
            break
        names = [safe_name(tier(e)) if n in clashing else n for n, e in zip(names, entries)]
    clashing = sorted(n for n, k in collections.Counter(names).items() if k > 1)
    if clashing:
        raise CbamDeployError(f"two bundles serve the same artifact as {clashing[0]!r}; give each bundle once")
    return names


def _open_runner(config: ServeConfig, bundle: Bundle, artifact: str):
    return open_artifact(bundle.directory, bundle, artifact, threads=config.threads,
                         runtime=getattr(config, "runtime", None))


def load_repository(config: ServeConfig, metrics: Metrics) -> ModelRepository:
    """Read every bundle of ``config.bundle``, name the models, open their runners."""
    paths = bundle_paths(config.bundle)
    if config.name:
        check_name("--name", config.name)
    if config.name and len(paths) > 1:
        raise CbamDeployError(f"--name names one model; {len(paths)} bundles are served (each is named after its "
                              "bundle's model, or its folder when two would clash)")
    entries = []
    for path in paths:
        bundle = Bundle.open(path)
        artifact = config.artifact or bundle.artifact().name
        if not bundle.has_artifact(artifact):
            raise CbamDeployError(f"bundle {path} has no artifact {artifact!r} (it has {', '.join(bundle.artifact_names)})")
        entries.append({"bundle": bundle, "artifact": artifact, "base": config.name or default_name(bundle),
                        "folder": bundle.directory.resolve().name, "sha256": bundle.artifact(artifact).sha256})
    names = model_names(entries)
    services = [ModelService(name, e["bundle"], e["artifact"], _open_runner(config, e["bundle"], e["artifact"]), config,
                             metrics, config.labels)
                for name, e in zip(names, entries)]
    return ModelRepository(services, config, metrics)


__all__ = ["Metrics", "ModelRepository", "ModelService", "bundle_paths", "load_repository", "model_names", "safe_name"]
