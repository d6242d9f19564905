"""The Open Inference Protocol over gRPC: KServe v2's ``inference.GRPCInferenceService``.

The service definition is the protocol's published one, as compiled by Triton for its own client
(``tritonclient.grpc.service_pb2`` / ``service_pb2_grpc`` / ``model_config_pb2``): the same
messages Triton and KServe servers speak, so ``tritonclient.grpc`` and KServe's
``InferenceGRPCClient`` work unchanged. Nothing of the protocol is written here by hand.

Served on the HTTP server's event loop (``grpc.aio``), over the same ``ModelRepository``: the same
models, the same batchers (a gRPC and an HTTP request of the same shape can share a batch), the
same decode workers, the same metrics (``endpoint`` labels ``grpc_*``, ``code`` the gRPC code).

- ServerLive, ServerReady, ServerMetadata, ModelReady, ModelMetadata, ModelConfig (Triton's
  ``ModelConfig`` message: what perf_analyzer and model navigators read), RepositoryIndex.
- ModelInfer and ModelStreamInfer: inputs as ``raw_input_contents`` (little-endian bytes, what
  tritonclient sends) or typed ``fp32_contents``; the answer mirrors the request (raw outputs for
  raw inputs, as Triton; typed for typed, as KServe). A stream runs its requests concurrently and
  answers each as it completes (``id`` matches them), an error as that response's error_message.
- Errors are status codes: a bad request INVALID_ARGUMENT, an unknown model or version NOT_FOUND,
  a full queue, a stopped batch loop or a server shutting down UNAVAILABLE, a result later than
  ``request_timeout_s`` DEADLINE_EXCEEDED, a message over ``max_body_mb`` RESOURCE_EXHAUSTED (grpc
  itself), more than ``limit_concurrency`` RPCs in flight RESOURCE_EXHAUSTED, anything unexpected
  INTERNAL (counted in ``cbam_unhandled_errors_total``). Methods not listed are UNIMPLEMENTED.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
import numpy as np
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from ..errors import CbamDeployError
from ..options import shorten
from .batcher import BatcherError
from .protocol import ProtocolError
from .service import ModelRepository, ModelService

logger = logging.getLogger("cbam_deploy.serve")

_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 404: grpc.StatusCode.NOT_FOUND, 408: grpc.StatusCode.DEADLINE_EXCEEDED,
          413: grpc.StatusCode.RESOURCE_EXHAUSTED, 415: grpc.StatusCode.INVALID_ARGUMENT,
          422: grpc.StatusCode.INVALID_ARGUMENT, 503: grpc.StatusCode.UNAVAILABLE, 504: grpc.StatusCode.DEADLINE_EXCEEDED}


MAX_MESSAGE = 1024


class _Failed(Exception):
    """An RPC's outcome other than OK: a status code and its message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        # the message travels as grpc-message metadata: a client's 20 KB name quoted in it must not
        # break the stream (metadata is limited to 16 KB), so it is bounded here whatever it quotes
        if len(message) > MAX_MESSAGE:
            message = message[:MAX_MESSAGE - 30] + f"... ({len(message)} characters)"
        super().__init__(message)
        self.code = code


def _status(exc: Exception, repository: ModelRepository, endpoint: str) -> _Failed:
    if isinstance(exc, (ProtocolError, BatcherError)):
        return _Failed(_CODES.get(exc.status, grpc.StatusCode.INVALID_ARGUMENT), str(exc))
    if isinstance(exc, CbamDeployError):
        return _Failed(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    repository.metrics.unhandled.labels(endpoint).inc()
    logger.error("unhandled error in %s", endpoint, exc_info=exc)
    return _Failed(grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); the server log has the details")


def _rpc(endpoint: str):
    """Time and count a unary handler; its exceptions become status codes (never a dropped call)."""
    def wrap(method):
        async def handler(self: InferenceServicer, request, context: grpc.aio.ServicerContext):
            started, failure = time.perf_counter(), None
            try:
                return await method(self, request, context)
            except asyncio.CancelledError:  # the client went away or the server is stopping
                failure = _Failed(grpc.StatusCode.CANCELLED, "cancelled")
                raise
            except Exception as exc:
                failure = _status(exc, self.repository, endpoint)
            finally:
                metrics = self.repository.metrics
                metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
                metrics.requests.labels(endpoint, (failure.code if failure else grpc.StatusCode.OK).name).inc()
                if failure is not None and failure.code != grpc.StatusCode.CANCELLED:
                    metrics.errors.labels(endpoint).inc()
            await context.abort(failure.code, str(failure))
        handler.__name__ = method.__name__
        return handler
    return wrap


def decode_request(service: ModelService, request: pb.ModelInferRequest) -> tuple[np.ndarray, list[str], bool]:
    """The checked input batch of a ModelInferRequest, the outputs to answer, and whether its tensors
    came as raw bytes. Runs on a decode worker thread."""
    inputs = request.inputs
    if not inputs:
        raise ProtocolError("the request has no inputs")
    tensor = inputs[0]
    service.check_input(tensor.name, tensor.datatype, len(inputs))
    wanted = service.outputs_for([out.name for out in request.outputs])
    shape = list(tensor.shape)
    count = service.check_shape(shape)
    typed = [field.name for field, _ in tensor.contents.ListFields()]
    raw = len(request.raw_input_contents) > 0
    if raw:
        if typed:
            raise ProtocolError(f"input {shorten(tensor.name)} has both {typed[0]} and raw_input_contents; send one")
        if len(request.raw_input_contents) != len(inputs):
            raise ProtocolError(f"raw_input_contents has {len(request.raw_input_contents)} entries for {len(inputs)} input(s)")
        data = request.raw_input_contents[0]
        if len(data) != count * 4:
            raise ProtocolError(f"input {shorten(tensor.name)}: {len(data)} bytes of raw contents for shape {shape} FP32 "
                                f"(needs {count * 4})")
        array = np.frombuffer(data, dtype="<f4").reshape(shape)
    else:
        if typed and typed != ["fp32_contents"]:
            raise ProtocolError(f"input {shorten(tensor.name)} is FP32 but carries {', '.join(typed)}; send fp32_contents "
                                "or raw_input_contents")
        values = tensor.contents.fp32_contents
        if len(values) != count:
            raise ProtocolError(f"input {shorten(tensor.name)}: {len(values)} fp32_contents for shape {shape} (needs {count})")
        array = np.fromiter(values, dtype=np.float32, count=count).reshape(shape)
    return service.validate_batch(array), wanted, raw


def encode_response(service: ModelService, request: pb.ModelInferRequest, outputs: dict[str, np.ndarray],
                    wanted: list[str], raw: bool) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name=service.name, model_version="1", id=request.id)
    for name in wanted:
        array = np.ascontiguousarray(outputs[name], dtype="<f4")
        tensor = response.outputs.add(name=name, datatype="FP32", shape=array.shape)
        if raw:
            response.raw_output_contents.append(array.tobytes())
        else:
            tensor.contents.fp32_contents.extend(array.ravel().tolist())
    return response


def model_config(service: ModelService, delay_ms: float) -> mc.ModelConfig:
    """Triton's ModelConfig for a served model: batch dimension, dynamic batching, tensors."""
    batched = service.batch_size is None
    dims = (lambda shape: ModelService.tensor_shape(shape[1:] if batched else shape))
    config = mc.ModelConfig(name=service.name, platform=f"cbam-deploy/{service.runner.backend}",
                            max_batch_size=service.max_batch if batched else 0)
    config.input.add(name=service.input_spec.name, data_type=mc.TYPE_FP32, dims=dims(service.shape))
    for output in service.output_specs:
        config.output.add(name=output.name, data_type=mc.TYPE_FP32, dims=dims(output.shape))
    if batched and service.max_batch > 1:
        config.dynamic_batching.max_queue_delay_microseconds = int(delay_ms * 1000)
    config.parameters["artifact"].string_value = service.artifact
    config.parameters["precision"].string_value = service.runner.precision
    return config


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, repository: ModelRepository) -> None:
        self.repository = repository

    @_rpc("grpc_live")
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    @_rpc("grpc_server_ready")
    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.repository.not_ready() is None)

    @_rpc("grpc_ready")
    async def ModelReady(self, request, context):
        service = self.repository.get(request.name, request.version)
        return pb.ModelReadyResponse(ready=self.repository.not_ready(service) is None)

    @_rpc("grpc_server_metadata")
    async def ServerMetadata(self, request, context):
        from .app import server_info

        info = server_info()
        return pb.ServerMetadataResponse(name=info["name"], version=info["version"], extensions=info["extensions"])

    @_rpc("grpc_metadata")
    async def ModelMetadata(self, request, context):
        meta = self.repository.get(request.name, request.version).metadata()
        tensors = (lambda items: [pb.ModelMetadataResponse.TensorMetadata(**t) for t in items])
        return pb.ModelMetadataResponse(name=meta["name"], versions=meta["versions"], platform=meta["platform"],
                                        inputs=tensors(meta["inputs"]), outputs=tensors(meta["outputs"]))

    @_rpc("grpc_config")
    async def ModelConfig(self, request, context):
        service = self.repository.get(request.name, request.version)
        return pb.ModelConfigResponse(config=model_config(service, self.repository.config.batch_timeout_ms))

    @_rpc("grpc_repository_index")
    async def RepositoryIndex(self, request, context):
        if request.repository_name not in ("", "models"):
            raise ProtocolError(f"unknown repository {shorten(request.repository_name)}; this server has one (name it '')", 404)
        rows = self.repository.index(request.ready)
        return pb.RepositoryIndexResponse(models=[pb.RepositoryIndexResponse.ModelIndex(**row) for row in rows])

    async def _infer(self, request: pb.ModelInferRequest, protocol: str) -> pb.ModelInferResponse:
        repository = self.repository
        service = repository.get(request.model_name, request.model_version)
        code = "INTERNAL"
        try:
            if repository.shutting_down():
                raise BatcherError("the server is shutting down")
            batch, wanted, raw = await repository.workers.run(decode_request, service, request)
            outputs = await service.infer(batch)
            if raw:
                response = encode_response(service, request, outputs, wanted, raw)
            else:  # a list of floats per element: off the event loop
                response = await repository.workers.run(encode_response, service, request, outputs, wanted, raw)
            code = "OK"
            return response
        except (ProtocolError, BatcherError, CbamDeployError) as exc:
            code = _status(exc, repository, "").code.name
            raise
        finally:
            service.count(protocol, code)

    @_rpc("grpc_infer")
    async def ModelInfer(self, request, context):
        return await self._infer(request, "grpc")

    async def ModelStreamInfer(self, request_iterator, context):
        """Each request of the stream runs as soon as it arrives (up to max_queue at once); each answer
        is sent as soon as it is ready, an error as that answer's error_message."""
        repository, endpoint = self.repository, "grpc_stream_infer"
        answers: asyncio.Queue = asyncio.Queue()
        slots = asyncio.Semaphore(repository.config.max_queue)
        running: set[asyncio.Task] = set()

        async def one(request) -> None:
            started = time.perf_counter()
            try:
                answer, code = pb.ModelStreamInferResponse(infer_response=await self._infer(request, "grpc_stream")), "OK"
            except Exception as exc:
                failure = _status(exc, repository, endpoint)
                answer = pb.ModelStreamInferResponse(
                    error_message=str(failure),
                    infer_response=pb.ModelInferResponse(model_name=request.model_name, id=request.id))
                code = failure.code.name
                repository.metrics.errors.labels(endpoint).inc()
            finally:
                slots.release()
            repository.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
            repository.metrics.requests.labels(endpoint, code).inc()
            await answers.put(answer)

        async def read() -> None:
            try:
                async for request in request_iterator:
                    await slots.acquire()
                    task = asyncio.ensure_future(one(request))
                    running.add(task)
                    task.add_done_callback(running.discard)
                while running:
                    await asyncio.wait(set(running))
            finally:
                await answers.put(None)

        reader = asyncio.ensure_future(read())
        try:
            while (answer := await answers.get()) is not None:
                yield answer
            reader.result()  # a failure of the request stream itself ends the call with its error
        finally:
            reader.cancel()
            for task in list(running):
                task.cancel()


async def start_grpc(repository: ModelRepository, host: str, port: int):
    """Start the gRPC endpoint on the running event loop; (server, bound port). A port that cannot
    be bound is a ServeError (exit code 4)."""
    from .app import ServeError, format_address

    config = repository.config
    server = grpc.aio.server(
        options=[("grpc.so_reuseport", 0),  # a second server on a taken port fails, as with HTTP
                 ("grpc.max_receive_message_length", int(config.max_body_mb * 1024 * 1024)),
                 ("grpc.max_send_message_length", -1)],
        maximum_concurrent_rpcs=config.limit_concurrency)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(repository), server)
    address = format_address(host, port)
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as exc:
        bound, reason = 0, str(exc)
    else:
        reason = "the address is in use or not available"
    if not bound:
        await server.stop(None)
        raise ServeError(f"cannot bind the gRPC port {address}: {reason}")
    await server.start()
    return server, bound


__all__ = ["InferenceServicer", "decode_request", "encode_response", "model_config", "start_grpc"]
