"""The inference server: Starlette on uvicorn, Open Inference Protocol (KServe v2) over HTTP/JSON with
Triton's binary tensor extension, ``/v1/classify`` for images, Prometheus ``/metrics``.

Client errors (wrong shape, datatype or element count, malformed JSON, undecodable image, unknown
model) are 4xx with a message; a body over ``max_body_mb`` is 413. No request names a file: the
server only ever reads the bundle it was started with.
"""

from __future__ import annotations

import contextlib
import io
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..bundle import fixed_batch, read_manifest
from ..calib.data import preprocess_image
from ..errors import BackendUnavailable, CbamDeployError
from ..runners import open_artifact
from .batcher import DynamicBatcher
from .protocol import HEADER_LENGTH, ProtocolError, decode_input, encode_response, parse_infer_request, wants_binary


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


def _require_serving():
    try:
        import prometheus_client  # noqa: F401
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
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
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
    output_spec = manifest["outputs"][0]
    shape = input_spec["shape"]
    batch_size = fixed_batch(manifest)
    classes = manifest["model"].get("num_classes") or output_spec["shape"][-1]
    labels = _labels(config, manifest, classes)
    max_body = int(config.max_body_mb * 1024 * 1024)

    registry = CollectorRegistry()
    requests_total = Counter("cbam_requests_total", "Requests by endpoint and status code", ["endpoint", "code"], registry=registry)
    errors_total = Counter("cbam_errors_total", "Requests answered with an error", ["endpoint"], registry=registry)
    latency = Histogram("cbam_request_latency_seconds", "Request latency", ["endpoint"], registry=registry,
                        buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
    batch_sizes = Histogram("cbam_batch_size", "Samples per executed batch", registry=registry,
                            buckets=(1, 2, 4, 8, 16, 32, 64, 128))
    batcher = DynamicBatcher(runner.run, 1 if batch_size else config.max_batch, config.batch_timeout_ms,
                             on_batch=batch_sizes.observe)

    def error(endpoint: str, status: int, message: str) -> JSONResponse:
        errors_total.labels(endpoint).inc()
        return JSONResponse({"error": message}, status_code=status)

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > max_body:
            raise ProtocolError(f"request body over the {config.max_body_mb:g} MB limit", 413)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body:
                raise ProtocolError(f"request body over the {config.max_body_mb:g} MB limit", 413)
            chunks.append(chunk)
        return b"".join(chunks)

    def check_model(request: Request) -> None:
        name = request.path_params["model"]
        if name != model_name:
            raise ProtocolError(f"unknown model {name!r}; this server serves {model_name!r}", 404)
        version = request.path_params.get("version")
        if version not in (None, "", "1"):
            raise ProtocolError(f"model {name!r} has only version 1", 404)

    def validate_batch(array: np.ndarray) -> np.ndarray:
        if array.dtype != np.float32:
            array = array.astype(np.float32)
        side = int(input_spec["preprocess"]["center_crop"])
        expected_chw = [shape[1], shape[2] if isinstance(shape[2], int) else None, shape[3] if isinstance(shape[3], int) else None]
        if array.ndim != 4 or array.shape[1] != expected_chw[0] or any(
                e is not None and a != e for a, e in zip(array.shape[2:], expected_chw[1:])):
            raise ProtocolError(f"input shape {list(array.shape)} does not match the model's {shape} "
                                f"(e.g. [1, {shape[1]}, {side}, {side}])")
        if array.shape[0] < 1 or (batch_size and array.shape[0] != batch_size):
            raise ProtocolError(f"batch {array.shape[0]} is not accepted: the model takes {batch_size or 'any positive'}")
        if not np.isfinite(array).all():
            raise ProtocolError("input holds NaN or Inf")
        return np.ascontiguousarray(array)

    async def timed(endpoint: str, handler, request: Request) -> Response:
        started = time.perf_counter()
        try:
            response = await handler(request)
        except ProtocolError as exc:
            response = error(endpoint, exc.status, str(exc))
        except CbamDeployError as exc:
            response = error(endpoint, 400, str(exc))
        latency.labels(endpoint).observe(time.perf_counter() - started)
        requests_total.labels(endpoint, str(response.status_code)).inc()
        return response

    async def live(request: Request) -> Response:
        return JSONResponse({"live": True})

    async def ready(request: Request) -> Response:
        return JSONResponse({"ready": True})

    async def server_metadata(request: Request) -> Response:
        from .. import __version__

        return JSONResponse({"name": "cbam-deploy", "version": __version__, "extensions": ["binary_tensor_data"]})

    def tensor_shape(dims: list) -> list:
        return [d if isinstance(d, int) else -1 for d in dims]

    async def model_metadata(request: Request) -> Response:
        async def handler(request):
            check_model(request)
            return JSONResponse({
                "name": model_name, "versions": ["1"], "platform": f"cbam-deploy/{runner.backend}",
                "inputs": [{"name": input_spec["name"], "datatype": "FP32", "shape": tensor_shape(shape)}],
                "outputs": [{"name": output_spec["name"], "datatype": "FP32", "shape": tensor_shape(output_spec["shape"])}],
                "parameters": {"artifact": artifact, "precision": runner.precision, "device": runner.device},
            })
        return await timed("metadata", handler, request)

    async def model_ready(request: Request) -> Response:
        async def handler(request):
            check_model(request)
            return JSONResponse({"name": model_name, "ready": True})
        return await timed("ready", handler, request)

    async def infer(request: Request) -> Response:
        async def handler(request):
            check_model(request)
            body = await read_body(request)
            parsed, binary = parse_infer_request(body, request.headers.get(HEADER_LENGTH))
            if len(parsed["inputs"]) != 1:
                raise ProtocolError(f"the model has one input ({input_spec['name']!r}); got {len(parsed['inputs'])}")
            array, _ = decode_input(parsed["inputs"][0], binary, 0)
            if parsed["inputs"][0]["name"] != input_spec["name"]:
                raise ProtocolError(f"unknown input {parsed['inputs'][0]['name']!r}; the model's input is {input_spec['name']!r}")
            if parsed["inputs"][0]["datatype"] != "FP32":
                raise ProtocolError(f"input datatype {parsed['inputs'][0]['datatype']} is not accepted; send FP32")
            for out in parsed.get("outputs") or []:
                if not isinstance(out, dict) or out.get("name") != output_spec["name"]:
                    raise ProtocolError(f"unknown output {out.get('name') if isinstance(out, dict) else out!r}; "
                                        f"the model's output is {output_spec['name']!r}")
            output = await batcher.infer(validate_batch(array))
            payload, headers = encode_response(model_name, parsed.get("id"), output_spec["name"], output,
                                               wants_binary(parsed, output_spec["name"]))
            media = headers.pop("content-type")
            return Response(payload, media_type=media, headers=headers)
        return await timed("infer", handler, request)

    async def classify(request: Request) -> Response:
        async def handler(request):
            from PIL import Image, UnidentifiedImageError

            content_type = request.headers.get("content-type", "")
            if content_type.startswith("multipart/form-data"):
                declared = request.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > max_body:
                    raise ProtocolError(f"request body over the {config.max_body_mb:g} MB limit", 413)
                try:
                    form = await request.form(max_files=1, max_fields=4, max_part_size=max_body)
                except Exception as exc:
                    raise ProtocolError(f"malformed multipart body: {exc}") from None
                upload = next((v for v in form.values() if hasattr(v, "read")), None)
                if upload is None:
                    raise ProtocolError("multipart body has no file part")
                data = await upload.read()
            else:
                data = await read_body(request)
            if not data:
                raise ProtocolError("empty body: send an image (raw bytes or multipart)")
            try:
                with Image.open(io.BytesIO(data)) as image:
                    image.load()
                    array = preprocess_image(image, input_spec)[None]
            except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
                raise ProtocolError("the body is not a decodable image", 415) from None
            if batch_size:
                array = np.repeat(array, batch_size, axis=0)
            logits = (await batcher.infer(array))[0].astype(np.float64)
            probs = np.exp(logits - logits.max())
            probs /= probs.sum()
            try:
                k = max(1, min(int(request.query_params.get("top_k", config.top_k)), len(probs)))
            except ValueError:
                raise ProtocolError("top_k must be an integer") from None
            top = np.argsort(-probs)[:k]
            return JSONResponse({"model": model_name, "top_k": [
                {"index": int(i), "label": labels[i], "score": float(probs[i])} for i in top]})
        return await timed("classify", handler, request)

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    async def not_found(request: Request, exc) -> Response:
        return JSONResponse({"error": f"no route {request.url.path}"}, status_code=getattr(exc, "status_code", 404))

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
        batcher.start()
        yield
        await batcher.stop()

    app = Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found}, lifespan=lifespan)
    app.state.model_name = model_name
    app.state.runner = runner
    app.state.artifact = artifact
    return app


def serve(config: ServeConfig, host: str = "127.0.0.1", port: int = 8000) -> None:
    import uvicorn

    app = create_app(config)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)


__all__ = ["ServeConfig", "create_app", "serve"]
