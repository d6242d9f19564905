"""Open Inference Protocol (KServe v2) request/response encoding, including Triton's binary tensor
data extension (what tritonclient sends by default). Pure functions: no HTTP here."""

from __future__ import annotations

import json

import numpy as np

HEADER_LENGTH = "inference-header-content-length"

DATATYPES = {
    "FP32": np.float32, "FP64": np.float64, "FP16": np.float16, "INT8": np.int8, "INT16": np.int16,
    "INT32": np.int32, "INT64": np.int64, "UINT8": np.uint8, "BOOL": np.bool_,
}


class ProtocolError(Exception):
    """A client error: becomes a 4xx with this message."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def parse_infer_request(body: bytes, header_length: str | None) -> tuple[dict, bytes]:
    """Split the JSON part from the binary part (if any) and parse the JSON."""
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
        request = json.loads(head)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"malformed JSON: {exc}") from None
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list) or not request["inputs"]:
        raise ProtocolError("the request needs a non-empty 'inputs' list")
    return request, binary


def decode_input(spec: dict, binary: bytes, offset: int) -> tuple[np.ndarray, int]:
    """One input tensor from JSON 'data' or from the binary section; returns it and the new offset."""
    if not isinstance(spec, dict):
        raise ProtocolError("each input must be an object")
    name, datatype, shape = spec.get("name"), spec.get("datatype"), spec.get("shape")
    if not isinstance(name, str) or not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ProtocolError("each input needs 'name' (string) and 'shape' (list of non-negative integers)")
    if datatype not in DATATYPES:
        raise ProtocolError(f"input {name!r}: unsupported datatype {datatype!r}")
    dtype = np.dtype(DATATYPES[datatype])
    count = int(np.prod(shape)) if shape else 1
    params = spec.get("parameters") or {}
    if "binary_data_size" in params:
        size = params["binary_data_size"]
        if not isinstance(size, int) or size < 0 or offset + size > len(binary):
            raise ProtocolError(f"input {name!r}: binary_data_size {size} runs past the request body")
        if size != count * dtype.itemsize:
            raise ProtocolError(f"input {name!r}: {size} bytes of binary data for shape {shape} {datatype} "
                                f"(needs {count * dtype.itemsize})")
        array = np.frombuffer(binary, dtype=dtype, count=count, offset=offset).reshape(shape)
        return array, offset + size
    if "data" not in spec:
        raise ProtocolError(f"input {name!r} has neither 'data' nor binary_data_size")
    try:
        array = np.asarray(spec["data"], dtype=dtype)
    except (ValueError, TypeError):
        raise ProtocolError(f"input {name!r}: 'data' is not a list of {datatype} numbers") from None
    if array.size != count:
        raise ProtocolError(f"input {name!r}: {array.size} elements for shape {shape} (needs {count})")
    return array.reshape(shape), offset


def wants_binary(request: dict, output_name: str) -> bool:
    for out in request.get("outputs") or []:
        if isinstance(out, dict) and out.get("name") == output_name:
            return bool((out.get("parameters") or {}).get("binary_data", False))
    return bool((request.get("parameters") or {}).get("binary_data_output", False))


def encode_response(model: str, request_id: str | None, output_name: str, output: np.ndarray, binary: bool) -> tuple[bytes, dict]:
    """The response body and extra headers; binary outputs follow the JSON header."""
    entry = {"name": output_name, "datatype": "FP32", "shape": list(output.shape)}
    payload = b""
    if binary:
        payload = np.ascontiguousarray(output, dtype=np.float32).tobytes()
        entry["parameters"] = {"binary_data_size": len(payload)}
    else:
        entry["data"] = output.astype(np.float32).ravel().tolist()
    response = {"model_name": model, "model_version": "1", "outputs": [entry]}
    if request_id is not None:
        response["id"] = request_id
    head = json.dumps(response).encode()
    if binary:
        return head + payload, {HEADER_LENGTH: str(len(head)), "content-type": "application/octet-stream"}
    return head, {"content-type": "application/json"}
