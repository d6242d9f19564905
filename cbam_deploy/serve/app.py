"""The inference server: Starlette on uvicorn, Open Inference Protocol (KServe v2) over HTTP/JSON with
Triton's binary tensor extension, ``/v1/classify`` for images, Prometheus ``/metrics``.

Client errors (wrong shape, datatype or element count, malformed or type-confused JSON, undecodable
image, unknown model) are 4xx with a JSON message; a body over ``max_body_mb`` is 413. No request
names a file: the server only ever reads the bundle it was started with.

What keeps it serving (each is tested in tests/test_serve_faults.py):

- Blocking work (JSON and tensor decoding, image decoding and preprocessing, inference) runs on
  daemon worker threads; the event loop only moves bytes, so health checks answer during a large
  request and SIGTERM is never held up by an inference in flight.
- The batcher merges only same-shape requests, bounds its queue (503 when full) and every wait
  (504); if its loop ever ends, readiness is 503 and every waiting request fails at once.
- Images: pixel count (413) and aspect ratio (422) are checked from the header, before decoding;
  preprocessing costs what the output needs, whatever the input's shape. A tensor for a dynamic
  height/width model may be 1 to 8x the model's input side on each (400 beyond).
- Anything unexpected is a JSON 500, counted in ``cbam_unhandled_errors_total``; the server goes on.
- A request body must arrive within ``request_timeout_s`` (else 408): a client trickling its body
  holds only its own connection. uvicorn runs with a keep-alive timeout, a concurrency limit (503
  beyond it) and a bounded graceful shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..bundle import fixed_batch, read_manifest
from ..errors import BackendUnavailable, CbamDeployError
from ..runners import open_artifact
from .batcher import BatcherError, DynamicBatcher
from .images import decode_image
from ..outputs import classification_output
from .protocol import HEADER_LENGTH, ProtocolError, decode_input, encode_response, parse_infer_request, wants_binary
from .threads import DaemonThreads

logger = logging.getLogger("cbam_deploy.serve")


class ServeError(CbamDeployError):
    """The server could not bind its address or start. Exit code 4 (2 is a bad option or bundle,
    3 a failed parity/verify check)."""

    exit_code = 4


@dataclass
class ServeConfig:
    bundle: str
    artifact: str | None = None
    name: str | None = None
    max_batch: int = 8
    batch_timeout_ms: float = 5.0
    max_body_mb: float = 32.0
    labels: str | None = None
    threads: int | None = None
    top_k: int = 5
    max_queue: int = 256               # requests waiting for inference; more get 503 at once
    request_timeout_s: float = 30.0    # to receive a body (408) and to wait for a result (504)
    max_image_pixels: int = 24_000_000  # /v1/classify, from the image header (413); PIL's own bomb limit is ~89M
    max_aspect: float = 50.0           # /v1/classify: longer side / shorter side (422)
    decode_threads: int = 2            # worker threads for request decoding and image preprocessing
    limit_concurrency: int = 256       # uvicorn: connections + requests in flight; more get 503
    keep_alive_s: int = 5              # uvicorn: idle keep-alive connections are closed after this
    shutdown_timeout_s: int = 3        # uvicorn: requests still running this long after SIGTERM are cancelled

    def check(self) -> None:
        bad = [f"--{name.replace('_', '-')} {value}" for name, value in vars(self).items()
               if isinstance(value, (int, float)) and not (value >= 0 if name == "batch_timeout_ms" else value > 0)]
        if bad:
            raise CbamDeployError("these serve settings must be positive: " + ", ".join(bad))


def _require_serving():
    try:
        import prometheus_client  # noqa: F401
        import pydantic  # noqa: F401
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise BackendUnavailable("serving needs the serve extra: pip install 'cbam-deploy[serve]'") from None


def _labels(config: ServeConfig, manifest: dict, classes: int) -> list[str]:
    if config.labels:
        try:
            names = [line.strip() for line in Path(config.labels).read_text().splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            raise CbamDeployError(f"cannot read labels file {config.labels}: {exc}") from None
        if len(names) != classes:
            raise CbamDeployError(f"labels file {config.labels} has {len(names)} lines; the model has {classes} classes")
        return names
    return list(manifest.get("labels") or [str(i) for i in range(classes)])


def create_app(config: ServeConfig):
    """Build the ASGI app (the bundle and its runner are loaded here, before the first request)."""
    _require_serving()
    config.check()
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
    from prometheus_client.exposition import CONTENT_TYPE_LATEST
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    manifest = read_manifest(config.bundle)
    artifact = config.artifact or manifest["artifacts"][0]["name"]
    runner = open_artifact(config.bundle, manifest, artifact, threads=config.threads)
    model_name = config.name or manifest["model"]["name"].replace(":", "_").replace("/", "_")
    input_spec = manifest["input"]
    output_specs = manifest["outputs"]
    output_names = [o["name"] for o in output_specs]
    classifier = classification_output(manifest)  # /v1/classify serves classifiers only
    shape = input_spec["shape"]
    batch_size = fixed_batch(manifest)
    labels = _labels(config, manifest, manifest["model"].get("num_classes") or classifier["shape"][-1]) if classifier else []
    max_body = int(config.max_body_mb * 1024 * 1024)
    side = int(input_spec["preprocess"]["center_crop"])
    max_side = 8 * side  # for a dynamic height/width: bounds the activations one request can cost

    registry = CollectorRegistry()
    requests_total = Counter("cbam_requests_total", "Requests by endpoint and status code", ["endpoint", "code"], registry=registry)
    errors_total = Counter("cbam_errors_total", "Requests answered with an error", ["endpoint"], registry=registry)
    unhandled_total = Counter("cbam_unhandled_errors_total", "Unexpected exceptions, answered with 500",
                              ["endpoint"], registry=registry)
    latency = Histogram("cbam_request_latency_seconds", "Request latency", ["endpoint"], registry=registry,
                        buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
    batch_sizes = Histogram("cbam_batch_size", "Samples per executed batch", registry=registry,
                            buckets=(1, 2, 4, 8, 16, 32, 64, 128))
    batcher = DynamicBatcher(runner.infer, 1 if batch_size else config.max_batch, config.batch_timeout_ms,
                             on_batch=batch_sizes.observe, max_queue=config.max_queue, wait_s=config.request_timeout_s)
    Gauge("cbam_queue_depth", "Requests waiting for or in inference", registry=registry).set_function(lambda: batcher.depth)
    Gauge("cbam_ready", "1 while inference requests are served", registry=registry).set_function(
        lambda: 0 if not_ready() else 1)
    workers: DaemonThreads | None = None  # both made when the app starts (lifespan)
    stopping: asyncio.Event | None = None  # set when the server begins to shut down

    def error(endpoint: str, status: int, message: str) -> JSONResponse:
        errors_total.labels(endpoint).inc()
        headers = {"retry-after": "1"} if status == 503 else None
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    def unexpected(endpoint: str, exc: BaseException) -> JSONResponse:
        unhandled_total.labels(endpoint).inc()
        logger.error("unhandled error in %s", endpoint, exc_info=exc)
        return error(endpoint, 500, f"internal error ({type(exc).__name__}); the server log has the details")

    def endpoint(name: str):
        """Time and count the handler; every exception becomes a JSON answer (never a dead connection)."""
        def wrap(handler: Callable) -> Callable:
            async def route(request: Request) -> Response:
                started = time.perf_counter()
                try:
                    response = await handler(request)
                except (ProtocolError, BatcherError) as exc:
                    response = error(name, exc.status, str(exc))
                except CbamDeployError as exc:
                    response = error(name, 400, str(exc))
                except Exception as exc:
                    response = unexpected(name, exc)
                latency.labels(name).observe(time.perf_counter() - started)
                requests_total.labels(name, str(response.status_code)).inc()
                return response
            return route
        return wrap

    async def receive(awaitable):
        """The body (or form) unless it takes over request_timeout_s (408) or the server begins to stop (503)."""
        body, stop = asyncio.ensure_future(awaitable), asyncio.ensure_future(stopping.wait())
        try:
            done, _ = await asyncio.wait({body, stop}, timeout=config.request_timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            body.cancel()
            stop.cancel()
        if body in done:
            return body.result()
        if stop in done:
            raise ProtocolError("the server is shutting down", 503)
        raise ProtocolError(f"the request body did not arrive within {config.request_timeout_s:g} s", 408)

    def check_declared_length(request: Request) -> None:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > max_body:
            raise ProtocolError(f"request body over the {config.max_body_mb:g} MB limit", 413)

    async def read_body(request: Request) -> bytes:
        check_declared_length(request)

        async def read() -> bytes:
            chunks, size = [], 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_body:
                    raise ProtocolError(f"request body over the {config.max_body_mb:g} MB limit", 413)
                chunks.append(chunk)
            return b"".join(chunks)
        return await receive(read())

    async def read_upload(request: Request) -> bytes:
        """The image of /v1/classify: the raw body, or the file part of a multipart form."""
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            return await read_body(request)
        check_declared_length(request)
        try:
            form = await receive(request.form(max_files=1, max_fields=4, max_part_size=max_body))
        except ProtocolError:
            raise
        except Exception as exc:
            raise ProtocolError(f"malformed multipart body: {exc}") from None
        upload = next((v for v in form.values() if hasattr(v, "read")), None)
        if upload is None:
            raise ProtocolError("multipart body has no file part")
        return await upload.read()

    def check_model(request: Request) -> None:
        name = request.path_params["model"]
        if name != model_name:
            raise ProtocolError(f"unknown model {name!r}; this server serves {model_name!r}", 404)
        version = request.path_params.get("version")
        if version not in (None, "", "1"):
            raise ProtocolError(f"model {name!r} has only version 1", 404)

    def not_ready() -> str | None:
        return "the server is shutting down" if stopping is not None and stopping.is_set() else batcher.not_ready()

    def check_ready() -> None:
        reason = not_ready()
        if reason:
            raise BatcherError(f"not ready: {reason}")

    def validate_batch(array: np.ndarray) -> np.ndarray:
        fixed = [d if isinstance(d, int) else None for d in shape[1:]]
        if array.ndim != 4 or any(e is not None and a != e for a, e in zip(array.shape[1:], fixed)):
            raise ProtocolError(f"input shape {list(array.shape)} does not match the model's {shape} "
                                f"(e.g. [1, {shape[1]}, {side}, {side}])")
        if array.shape[0] < 1 or (batch_size and array.shape[0] != batch_size):
            raise ProtocolError(f"batch {array.shape[0]} is not accepted: the model takes {batch_size or 'any positive'}")
        if not all(1 <= d <= max_side for d, e in zip(array.shape[2:], fixed[1:]) if e is None):
            raise ProtocolError(f"input height and width must be 1 to {max_side} pixels, got {list(array.shape[2:])}")
        if not np.isfinite(array).all():
            raise ProtocolError("input holds NaN or Inf")
        return np.ascontiguousarray(array, dtype=np.float32)

    def prepare_infer(body: bytes, header_length: str | None):
        """Parse and check an infer request (on a worker thread): the request and its input batch."""
        request, binary = parse_infer_request(body, header_length)
        if len(request.inputs) != 1:
            raise ProtocolError(f"the model has one input ({input_spec['name']!r}); got {len(request.inputs)}")
        spec = request.inputs[0]
        if spec.name != input_spec["name"]:
            raise ProtocolError(f"unknown input {spec.name!r}; the model's input is {input_spec['name']!r}")
        if spec.datatype != "FP32":
            raise ProtocolError(f"input datatype {spec.datatype} is not accepted; send FP32")
        for out in request.outputs or []:
            if out.name not in output_names:
                raise ProtocolError(f"unknown output {out.name!r}; the model's outputs are {', '.join(output_names)}")
        array, _ = decode_input(spec, binary, 0)
        return request, validate_batch(array)

    @endpoint("live")
    async def live(request: Request) -> Response:
        return JSONResponse({"live": True})

    @endpoint("server_ready")
    async def ready(request: Request) -> Response:
        check_ready()
        return JSONResponse({"ready": True})

    @endpoint("server_metadata")
    async def server_metadata(request: Request) -> Response:
        from .. import __version__

        return JSONResponse({"name": "cbam-deploy", "version": __version__, "extensions": ["binary_tensor_data"]})

    def tensor_shape(dims: list) -> list:
        return [d if isinstance(d, int) else -1 for d in dims]

    @endpoint("metadata")
    async def model_metadata(request: Request) -> Response:
        check_model(request)
        return JSONResponse({
            "name": model_name, "versions": ["1"], "platform": f"cbam-deploy/{runner.backend}",
            "inputs": [{"name": input_spec["name"], "datatype": "FP32", "shape": tensor_shape(shape)}],
            "outputs": [{"name": o["name"], "datatype": "FP32", "shape": tensor_shape(o["shape"])} for o in output_specs],
            "parameters": {"artifact": artifact, "precision": runner.precision, "device": runner.device},
        })

    @endpoint("ready")
    async def model_ready(request: Request) -> Response:
        check_model(request)
        check_ready()
        return JSONResponse({"name": model_name, "ready": True})

    @endpoint("infer")
    async def infer(request: Request) -> Response:
        check_model(request)
        body = await read_body(request)
        parsed, batch = await workers.run(prepare_infer, body, request.headers.get(HEADER_LENGTH))
        outputs = await batcher.infer(batch)
        wanted = [out.name for out in parsed.outputs] if parsed.outputs else output_names  # none asked: all of them
        payload, headers = encode_response(model_name, parsed.id,
                                           [(name, outputs[name], wants_binary(parsed, name)) for name in wanted])
        media = headers.pop("content-type")
        return Response(payload, media_type=media, headers=headers)

    @endpoint("classify")
    async def classify(request: Request) -> Response:
        try:
            top_k = int(request.query_params.get("top_k", config.top_k))
        except ValueError:
            raise ProtocolError("top_k must be an integer") from None
        if classifier is None:
            raise ProtocolError(f"/v1/classify serves classifiers; {model_name} has the outputs "
                                f"{', '.join(output_names)} (use /v2/models/{model_name}/infer)", 404)
        data = await read_upload(request)
        if not data:
            raise ProtocolError("empty body: send an image (raw bytes or multipart)")
        array = (await workers.run(decode_image, data, input_spec, config.max_image_pixels, config.max_aspect))[None]
        if batch_size:
            array = np.repeat(array, batch_size, axis=0)
        logits = (await batcher.infer(array))[classifier["name"]][0].astype(np.float64)
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        top = np.argsort(-probs)[:max(1, min(top_k, len(probs)))]
        return JSONResponse({"model": model_name, "top_k": [
            {"index": int(i), "label": labels[i], "score": float(probs[i])} for i in top]})

    @endpoint("metrics")
    async def metrics(request: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    async def not_found(request: Request, exc) -> Response:
        return JSONResponse({"error": f"no route {request.url.path}"}, status_code=getattr(exc, "status_code", 404))

    async def server_error(request: Request, exc: Exception) -> Response:  # outside any route (middleware, routing)
        return unexpected("-", exc)

    routes = [
        Route("/v2", server_metadata), Route("/v2/health/live", live), Route("/v2/health/ready", ready),
        Route("/v2/models/{model}", model_metadata), Route("/v2/models/{model}/versions/{version}", model_metadata),
        Route("/v2/models/{model}/ready", model_ready),
        Route("/v2/models/{model}/infer", infer, methods=["POST"]),
        Route("/v2/models/{model}/versions/{version}/infer", infer, methods=["POST"]),
        Route("/v1/classify", classify, methods=["POST"]),
        Route("/metrics", metrics),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app):
        nonlocal workers, stopping
        workers, stopping = DaemonThreads(config.decode_threads, "cbam-deploy-decode"), asyncio.Event()
        batcher.start()
        try:
            yield
        finally:
            await batcher.stop()
            workers.close()

    def begin_shutdown() -> None:  # make_server calls it, on the event loop
        if stopping is not None:
            stopping.set()

    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={404: not_found, 405: not_found, Exception: server_error})
    app.state.config = config
    app.state.model_name = model_name
    app.state.runner = runner
    app.state.artifact = artifact
    app.state.batcher = batcher
    app.state.begin_shutdown = begin_shutdown
    return app


def bind_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (port 0: any free one), or one clear ServeError naming the address."""
    if not 0 <= port <= 65535:
        raise CbamDeployError(f"--port must be 0 to 65535, got {port}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise ServeError(f"cannot bind {host}:{port}: {exc.strerror or exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise ServeError(f"cannot bind {host}:{port}: {exc.strerror or exc}") from None
    return sock


def socket_address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def make_server(app, on_started: Callable[[], None] | None = None):
    """A uvicorn.Server for ``app`` with the limits of its ServeConfig; ``on_started`` runs once it listens."""
    import uvicorn

    config: ServeConfig = app.state.config

    class Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.started and on_started:
                on_started()

        async def on_tick(self, counter: int) -> bool:  # every 0.1 s; True once SIGINT/SIGTERM (or should_exit) came
            exiting = await super().on_tick(counter)
            if exiting:  # readiness turns 503 and bodies still arriving are cut off, so the drain is short
                app.state.begin_shutdown()
            return exiting

    return Server(uvicorn.Config(app, log_level="warning", access_log=False, timeout_keep_alive=config.keep_alive_s,
                                 limit_concurrency=config.limit_concurrency,
                                 timeout_graceful_shutdown=config.shutdown_timeout_s))


def serve(config: ServeConfig, host: str = "127.0.0.1", port: int = 8000,
          on_started: Callable[[str], None] | None = None) -> None:
    """Bind, load the model, serve until SIGINT/SIGTERM. ``on_started('host:port')`` once it listens."""
    config.check()
    sock = bind_socket(host, port)  # before the model loads: a taken port fails at once
    try:
        app = create_app(config)
        address = socket_address(sock)
        server = make_server(app, (lambda: on_started(address)) if on_started else None)
        try:
            server.run(sockets=[sock])
        except SystemExit:  # uvicorn's own startup failure (it would exit 3, the code for a failed check)
            raise ServeError(f"the server on {address} failed to start; the log above says why") from None
    finally:
        sock.close()


__all__ = ["ServeConfig", "ServeError", "bind_socket", "create_app", "make_server", "serve", "socket_address"]
