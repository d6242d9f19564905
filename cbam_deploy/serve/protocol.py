"""Open Inference Protocol (KServe v2) request/response encoding, including Triton's binary tensor
data extension (what tritonclient sends by default). Pure functions: no HTTP here.

The request schema is a set of strict pydantic models read by pydantic's own JSON parser: a field of
the wrong JSON type (``"shape": "abc"``, ``true`` for an integer, ``{}`` for the id), nesting
deeper than the parser's limit, numbers out of range and invalid UTF-8 are all a ``ProtocolError``
(400) with a message naming the field, never another exception.
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..options import shorten

HEADER_LENGTH = "inference-header-content-length"

DATATYPES = {
    "FP32": np.float32, "FP64": np.float64, "FP16": np.float16, "INT8": np.int8, "INT16": np.int16,
    "INT32": np.int32, "INT64": np.int64, "UINT8": np.uint8, "BOOL": np.bool_,
}
MAX_DIMS = 16
MAX_ELEMENTS = 2**31 - 1  # per tensor; the body limit keeps real requests far below this


class ProtocolError(Exception):
    """A client error: becomes a 4xx with this message."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, frozen=True)


class _Parameters(_Strict):
    model_config = ConfigDict(extra="allow")  # other parameters (Triton's, a client's own) are ignored


class TensorParameters(_Parameters):
    binary_data_size: Annotated[int, Field(ge=0)] | None = None
    binary_data: bool | None = None


class RequestParameters(_Parameters):
    binary_data_output: bool | None = None


class InputTensor(_Strict):
    name: str
    datatype: Literal[tuple(DATATYPES)]  # type: ignore[valid-type]
    shape: Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=MAX_DIMS)]
    parameters: TensorParameters | None = None
    data: Any = None  # a (nested) list of numbers; checked against shape and datatype by decode_input


class OutputTensor(_Strict):
    name: str
    parameters: TensorParameters | None = None


class InferRequest(_Strict):
    id: str | None = None
    inputs: Annotated[list[InputTensor], Field(min_length=1)]
    outputs: list[OutputTensor] | None = None
    parameters: RequestParameters | None = None


def _describe(exc: ValidationError, shown: int = 3) -> str:
    errors = exc.errors(include_url=False, include_input=False, include_context=False)
    if errors and errors[0]["type"] == "json_invalid":
        return f"malformed JSON: {errors[0]['msg'].removeprefix('Invalid JSON: ')}"
    parts = [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" if e["loc"] else e["msg"] for e in errors[:shown]]
    more = f" (and {len(errors) - shown} more)" if len(errors) > shown else ""
    return "malformed request: " + "; ".join(parts) + more


def parse_infer_request(body: bytes, header_length: str | None) -> tuple[InferRequest, bytes]:
    """Split the JSON part from the binary part (if any) and validate the JSON."""
    if header_length is not None:
        try:
            size = int(header_length)
        except ValueError:
            raise ProtocolError("Inference-Header-Content-Length must be an integer") from None
        if not 0 < size <= len(body):
            raise ProtocolError(f"Inference-Header-Content-Length {size} does not fit a body of {len(body)} bytes")
        head, binary = body[:size], body[size:]
    else:
        head, binary = body, b""
    try:
        return InferRequest.model_validate_json(head), binary
    except ValidationError as exc:
        raise ProtocolError(_describe(exc)) from None


def decode_input(spec: InputTensor, binary: bytes, offset: int) -> tuple[np.ndarray, int]:
    """One input tensor from JSON 'data' or from the binary section; returns it and the new offset."""
    name, shape, datatype = spec.name, spec.shape, spec.datatype
    dtype = np.dtype(DATATYPES[datatype])
    count = math.prod(shape)  # a Python int: [2**40, 2**40] cannot overflow
    if count > MAX_ELEMENTS:
        raise ProtocolError(f"input {shorten(name)}: shape {shape} has {count} elements (at most {MAX_ELEMENTS})")
    size = spec.parameters.binary_data_size if spec.parameters else None
    if size is not None:
        if offset + size > len(binary):
            raise ProtocolError(f"input {shorten(name)}: binary_data_size {size} runs past the request body")
        if size != count * dtype.itemsize:
            raise ProtocolError(f"input {shorten(name)}: {size} bytes of binary data for shape {shape} {datatype} "
                                f"(needs {count * dtype.itemsize})")
        array = np.frombuffer(memoryview(binary)[offset:offset + size], dtype=dtype).reshape(shape)
        return array, offset + size
    if "data" not in spec.model_fields_set:
        raise ProtocolError(f"input {shorten(name)} has neither 'data' nor binary_data_size")
    return _data_array(spec.data, name, shape, datatype, count), offset


# Which numpy kinds the JSON numbers of each datatype may parse to (ints are fine in a float tensor).
_KINDS = {"b": "b", "i": "iu", "u": "iu", "f": "iuf"}


def _data_array(data: Any, name: str, shape: list[int], datatype: str, count: int) -> np.ndarray:
    dtype = np.dtype(DATATYPES[datatype])
    noun = {"b": "booleans", "i": "integers", "u": "integers", "f": "numbers"}[dtype.kind]
    try:
        array = np.asarray(data)
    except (ValueError, TypeError, OverflowError, RecursionError):  # ragged nesting, > 64 dims, ...
        raise ProtocolError(f"input {shorten(name)}: 'data' is not a list of {datatype} {noun} of one shape") from None
    if array.dtype.kind not in _KINDS[dtype.kind]:
        raise ProtocolError(f"input {shorten(name)}: 'data' is not a list of {datatype} {noun}")
    if array.size != count:
        raise ProtocolError(f"input {shorten(name)}: {array.size} elements for shape {shape} (needs {count})")
    if array.ndim > 1 and list(array.shape) != shape:
        raise ProtocolError(f"input {shorten(name)}: 'data' is nested as {list(array.shape)}; send it flat or nested as {shape}")
    if dtype.kind in "iu" and array.size:
        info = np.iinfo(dtype)
        if array.min() < info.min or array.max() > info.max:
            raise ProtocolError(f"input {shorten(name)}: a value is outside the {datatype} range")
    with np.errstate(over="ignore"):  # 1e300 as FP32 is inf; the caller decides whether that is allowed
        return array.astype(dtype).reshape(shape)


def wants_binary(request: InferRequest, output_name: str) -> bool:
    for out in request.outputs or []:
        if out.name == output_name:
            return bool(out.parameters and out.parameters.binary_data)
    return bool(request.parameters and request.parameters.binary_data_output)


def encode_response(model: str, request_id: str | None, outputs: list[tuple[str, np.ndarray, bool]]) -> tuple[bytes, dict]:
    """The response body and extra headers for (name, array, binary?) outputs, in order; binary
    outputs follow the JSON header, in the same order."""
    entries, payloads = [], []
    for name, output, binary in outputs:
        entry = {"name": name, "datatype": "FP32", "shape": list(output.shape)}
        if binary:
            payloads.append(np.ascontiguousarray(output, dtype=np.float32).tobytes())
            entry["parameters"] = {"binary_data_size": len(payloads[-1])}
        else:
            entry["data"] = output.astype(np.float32).ravel().tolist()
        entries.append(entry)
    response = {"model_name": model, "model_version": "1", "outputs": entries}
    if request_id is not None:
        response["id"] = request_id
    head = json.dumps(response).encode()
    if payloads:
        return head + b"".join(payloads), {HEADER_LENGTH: str(len(head)), "content-type": "application/octet-stream"}
    return head, {"content-type": "application/json"}
