"""The inference server: Starlette on uvicorn, Open Inference Protocol (KServe v2) over HTTP/JSON with
Triton's binary tensor extension, the same protocol over gRPC (``grpc_server.py``), ``/v1/classify``
for images, ``/v2/repository/index``, Prometheus ``/metrics``. One or several models (``serve B1
B2 ...`` or a folder of bundles), each with its own batcher; the endpoints here (``HttpServer``, one
method each) are thin: they read and write HTTP, ``service.ModelService`` does the rest.

Client errors (wrong shape, datatype or element count, malformed or type-confused JSON, undecodable
image, unknown model) are 4xx with a JSON message; a body over ``max_body_mb`` is 413. No request
names a file: the server only ever reads the bundles it was started with.

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
  beyond it) and a bounded graceful shutdown; the gRPC endpoint stops with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..errors import BackendUnavailable, CbamDeployError
from .batcher import BatcherError
from .config import ServeConfig, ServeError, format_address, server_info
from .protocol import HEADER_LENGTH, ProtocolError, encode_response, wants_binary
from .service import Metrics, ModelRepository, load_repository

if TYPE_CHECKING:  # the serve extra's types, for the annotations only
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response

logger = logging.getLogger("cbam_deploy.serve")


def _require_serving(grpc: bool = False):
    try:
        import prometheus_client  # noqa: F401  (lazy: the optional serve extra, checked here)
        import pydantic  # noqa: F401  (lazy: as above)
        import starlette  # noqa: F401  (lazy: as above)
        import uvicorn  # noqa: F401  (lazy: as above)
    except ImportError:
        raise BackendUnavailable("serving needs the serve extra: pip install 'cbam-deploy[serve]'") from None
    if grpc:
        try:
            import grpc as _grpc  # noqa: F401  (lazy: the optional serve extra, checked here)
            from tritonclient.grpc import service_pb2_grpc  # noqa: F401  (lazy: as above)
        except ImportError:
            raise BackendUnavailable("the gRPC endpoint needs grpcio and tritonclient[grpc] (the serve extra: "
                                     "pip install 'cbam-deploy[serve]'); --grpc-port 0 turns it off") from None


def create_app(config: ServeConfig):
    """Build the ASGI app (the bundles and their runners are loaded here, before the first request).
    With ``config.grpc_port`` set, the gRPC endpoint starts and stops with the app (its lifespan),
    on ``app.state.grpc_host`` (127.0.0.1 unless ``serve`` says otherwise); once it listens,
    ``app.state.grpc_address`` is 'host:port'."""
    _require_serving(grpc=config.grpc_port is not None)
    config.check()
    metrics = Metrics()
    return HttpServer(config, load_repository(config, metrics), metrics).app


class HttpServer:
    """The HTTP side of the server: one method per endpoint, over the state they share (the config,
    the model repository, the metrics); ``app`` is the Starlette app that routes to them."""

    def __init__(self, config: ServeConfig, repository: ModelRepository, metrics: Metrics) -> None:
        from starlette.applications import Starlette  # lazy: the optional serve extra
        from starlette.responses import JSONResponse, Response  # lazy: as above

        self._json, self._response = JSONResponse, Response
        self.config = config
        self.repository = repository
        self.metrics = metrics
        self.max_body = int(config.max_body_mb * 1024 * 1024)
        self.grpc_stop: asyncio.Task | None = None
        self.app = Starlette(routes=self.routes(), lifespan=self.lifespan,
                             exception_handlers={404: self.not_found, 405: self.not_found, Exception: self.server_error})
        first = repository.first
        state = self.app.state
        state.config = config
        state.repository = repository
        state.metrics = metrics
        state.model_name = first.name  # the first (or only) model
        state.runner = first.runner
        state.artifact = first.artifact
        state.batcher = first.batcher
        state.begin_shutdown = self.begin_shutdown
        state.grpc_host = "127.0.0.1"
        state.grpc_address = None
        state.startup_error = None

    def routes(self) -> list:
        from starlette.routing import Route  # lazy: the optional serve extra

        def route(path: str, name: str, handler: Callable, methods: list[str] | None = None) -> Route:
            return Route(path, self._counted(name, handler), methods=methods)

        return [
            route("/v2", "server_metadata", self.server_metadata), route("/v2/health/live", "live", self.live),
            route("/v2/health/ready", "server_ready", self.ready),
            route("/v2/repository/index", "repository_index", self.repository_index, ["GET", "POST"]),
            route("/v2/models/{model}", "metadata", self.model_metadata),
            route("/v2/models/{model}/versions/{version}", "metadata", self.model_metadata),
            route("/v2/models/{model}/ready", "ready", self.model_ready),
            route("/v2/models/{model}/versions/{version}/ready", "ready", self.model_ready),
            route("/v2/models/{model}/infer", "infer", self.infer, ["POST"]),
            route("/v2/models/{model}/versions/{version}/infer", "infer", self.infer, ["POST"]),
            route("/v1/classify", "classify", self.classify, ["POST"]),
            route("/metrics", "metrics", self.metrics_text),
        ]

    # --- answers ------------------------------------------------------------------------------------

    def error(self, endpoint: str, status: int, message: str) -> JSONResponse:
        self.metrics.errors.labels(endpoint).inc()
        headers = {"retry-after": "1"} if status == 503 else None
        return self._json({"error": message}, status_code=status, headers=headers)

    def unexpected(self, endpoint: str, exc: BaseException) -> JSONResponse:
        self.metrics.unhandled.labels(endpoint).inc()
        logger.error("unhandled error in %s", endpoint, exc_info=exc)
        return self.error(endpoint, 500, f"internal error ({type(exc).__name__}); the server log has the details")

    def _counted(self, name: str, handler: Callable) -> Callable:
        """``handler`` timed and counted as endpoint ``name``; every exception becomes a JSON answer
        (never a dead connection)."""
        async def endpoint(request: Request) -> Response:
            started = time.perf_counter()
            try:
                response = await handler(request)
            except (ProtocolError, BatcherError) as exc:
                response = self.error(name, exc.status, str(exc))
            except CbamDeployError as exc:
                response = self.error(name, 400, str(exc))
            except Exception as exc:
                response = self.unexpected(name, exc)
            self.metrics.latency.labels(name).observe(time.perf_counter() - started)
            self.metrics.requests.labels(name, str(response.status_code)).inc()
            return response
        return endpoint

    async def not_found(self, request: Request, exc) -> Response:
        return self._json({"error": f"no route {request.url.path}"}, status_code=getattr(exc, "status_code", 404))

    async def server_error(self, request: Request, exc: Exception) -> Response:  # outside any route (middleware, routing)
        return self.unexpected("-", exc)

    # --- reading requests ---------------------------------------------------------------------------

    async def receive(self, awaitable):
        """The body (or form) unless it takes over request_timeout_s (408) or the server begins to stop (503)."""
        body, stop = asyncio.ensure_future(awaitable), asyncio.ensure_future(self.repository.stopping.wait())
        try:
            done, _ = await asyncio.wait({body, stop}, timeout=self.config.request_timeout_s,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            body.cancel()
            stop.cancel()
        if body in done:
            return body.result()
        if stop in done:
            raise ProtocolError("the server is shutting down", 503)
        raise ProtocolError(f"the request body did not arrive within {self.config.request_timeout_s:g} s", 408)

    def check_declared_length(self, request: Request) -> None:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_body:
            raise ProtocolError(f"request body over the {self.config.max_body_mb:g} MB limit", 413)

    async def read_body(self, request: Request) -> bytes:
        self.check_declared_length(request)
        return await self.receive(self._read_stream(request))

    async def _read_stream(self, request: Request) -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body:
                raise ProtocolError(f"request body over the {self.config.max_body_mb:g} MB limit", 413)
            chunks.append(chunk)
        return b"".join(chunks)

    async def read_upload(self, request: Request) -> bytes:
        """The image of /v1/classify: the raw body, or the file part of a multipart form."""
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            return await self.read_body(request)
        self.check_declared_length(request)
        try:
            form = await self.receive(request.form(max_files=1, max_fields=4, max_part_size=self.max_body))
        except ProtocolError:
            raise
        except Exception as exc:
            raise ProtocolError(f"malformed multipart body: {exc}") from None
        upload = next((v for v in form.values() if hasattr(v, "read")), None)
        if upload is None:
            raise ProtocolError("multipart body has no file part")
        return await upload.read()

    def model_of(self, request: Request):
        return self.repository.get(request.path_params["model"], request.path_params.get("version"))

    # --- the endpoints ------------------------------------------------------------------------------

    async def live(self, request: Request) -> Response:
        return self._json({"live": True})

    async def ready(self, request: Request) -> Response:
        self.repository.check_ready()
        return self._json({"ready": True})

    async def server_metadata(self, request: Request) -> Response:
        return self._json(server_info())

    async def model_metadata(self, request: Request) -> Response:
        return self._json(self.model_of(request).metadata())

    async def model_ready(self, request: Request) -> Response:
        service = self.model_of(request)
        self.repository.check_ready(service)
        return self._json({"name": service.name, "ready": True})

    async def repository_index(self, request: Request) -> Response:
        ready_only = False
        if request.method == "POST":
            body = await self.read_body(request)
            if body.strip():
                try:
                    options = json.loads(body)
                except (ValueError, RecursionError):
                    raise ProtocolError("malformed JSON in the repository index request") from None
                if not isinstance(options, dict) or not isinstance(options.get("ready", False), bool):
                    raise ProtocolError('the repository index request is {"ready": true|false}')
                ready_only = options.get("ready", False)
        return self._json(self.repository.index(ready_only))

    async def infer(self, request: Request) -> Response:
        service = self.model_of(request)
        code = "500"
        try:
            body = await self.read_body(request)
            parsed, batch, wanted = await self.repository.workers.run(service.parse_rest, body,
                                                                      request.headers.get(HEADER_LENGTH))
            outputs = await service.infer(batch)
            payload, headers = encode_response(service.name, parsed.id,
                                               [(name, outputs[name], wants_binary(parsed, name)) for name in wanted])
            code = "200"
        except (ProtocolError, BatcherError) as exc:
            code = str(exc.status)
            raise
        except CbamDeployError:
            code = "400"
            raise
        finally:
            service.count("http", code)
        media = headers.pop("content-type")
        return self._response(payload, media_type=media, headers=headers)

    async def classify(self, request: Request) -> Response:
        try:
            top_k = int(request.query_params.get("top_k", self.config.top_k))
        except ValueError:
            raise ProtocolError("top_k must be an integer") from None
        name = request.query_params.get("model")
        repository = self.repository
        if name is None and len(repository.models) > 1:
            raise ProtocolError(f"several models are served ({', '.join(repository.models)}); name one: "
                                "/v1/classify?model=NAME")
        service = repository.get(name) if name is not None else repository.first
        if service.classifier is None:  # before reading the body
            raise ProtocolError(f"/v1/classify serves classifiers; {service.name} has the outputs "
                                f"{', '.join(service.output_names)} (use /v2/models/{service.name}/infer)", 404)
        data = await self.read_upload(request)
        result = await service.classify(data, top_k, repository.workers)
        service.count("http", "200")
        return self._json(result)

    async def metrics_text(self, request: Request) -> Response:
        payload, media = self.metrics.text()
        return self._response(payload, media_type=media)

    # --- start and stop -----------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        await self.repository.start()
        grpc_server = None
        try:
            if self.config.grpc_port is not None:
                from .grpc_server import start_grpc  # lazy: the gRPC endpoint imports grpc, an optional extra

                try:
                    grpc_server, port = await start_grpc(self.repository, app.state.grpc_host, self.config.grpc_port)
                except ServeError as exc:
                    app.state.startup_error = exc
                    raise
                app.state.grpc_server = grpc_server
                app.state.grpc_address = format_address(app.state.grpc_host, port)
            yield
        finally:
            self.repository.begin_shutdown()
            if grpc_server is not None:
                await (self.grpc_stop or grpc_server.stop(self.config.shutdown_timeout_s))
                app.state.grpc_server, self.grpc_stop = None, None
            await self.repository.stop()

    def begin_shutdown(self) -> None:  # make_server calls it, on the event loop
        self.repository.begin_shutdown()
        server = getattr(self.app.state, "grpc_server", None)
        if server is not None and self.grpc_stop is None:  # the gRPC endpoint drains alongside HTTP
            self.grpc_stop = asyncio.ensure_future(server.stop(self.config.shutdown_timeout_s))


def bind_socket(host: str, port: int, option: str = "--port") -> socket.socket:
    """A socket bound to host:port (port 0: any free one), or one clear ServeError naming the address."""
    if not 0 <= port <= 65535:
        raise CbamDeployError(f"{option} must be 0 to 65535, got {port}")
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
    return format_address(host, port)


def make_server(app, on_started: Callable[[], None] | None = None):
    """A uvicorn.Server for ``app`` with the limits of its ServeConfig; ``on_started`` runs once it listens."""
    import uvicorn  # lazy: the optional serve extra

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

    # the standard asyncio loop, also where uvloop is installed: the gRPC endpoint (grpc.aio) shares it
    return Server(uvicorn.Config(app, loop="asyncio", log_level="warning", access_log=False,
                                 timeout_keep_alive=config.keep_alive_s, limit_concurrency=config.limit_concurrency,
                                 timeout_graceful_shutdown=config.shutdown_timeout_s))


def serve(config: ServeConfig, host: str = "127.0.0.1", port: int = 8000,
          on_started: Callable[[str], None] | None = None, on_app: Callable[[object], None] | None = None) -> None:
    """Bind, load the models, serve until SIGINT/SIGTERM. ``on_app(app)`` once the models are loaded,
    ``on_started('host:port')`` once it listens (then ``app.state.grpc_address`` names the gRPC
    endpoint, if any)."""
    config.check()
    if config.grpc_port and config.grpc_port == port:
        raise CbamDeployError(f"--port and --grpc-port are both {port}")
    sock = bind_socket(host, port)  # before the models load: a taken port fails at once
    try:
        if config.grpc_port:  # the same for the gRPC port (it is bound again, by grpc, once the models are loaded)
            if config.grpc_port == sock.getsockname()[1]:
                raise CbamDeployError(f"--port and --grpc-port are both {config.grpc_port}")
            bind_socket(host, config.grpc_port, "--grpc-port").close()
        app = create_app(config)
        app.state.grpc_host = host
        if on_app:
            on_app(app)
        address = socket_address(sock)
        server = make_server(app, (lambda: on_started(address)) if on_started else None)
        try:
            server.run(sockets=[sock])
        except SystemExit:  # uvicorn's own startup failure (it would exit 3, the code for a failed check)
            raise ServeError(f"the server on {address} failed to start; the log above says why") from None
        if app.state.startup_error is not None:
            raise app.state.startup_error
        if not server.started:
            raise ServeError(f"the server on {address} failed to start; the log above says why")
    finally:
        sock.close()


__all__ = ["HttpServer", "ModelRepository", "ServeConfig", "ServeError", "bind_socket", "create_app", "format_address", "make_server",
           "serve", "socket_address"]
