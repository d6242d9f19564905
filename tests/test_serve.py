"""The inference server, tested with the standard tritonclient over HTTP on 127.0.0.1: health,
metadata, infer (binary and JSON), /v1/classify, bad input, limits, metrics, and a bounded load run."""

import io
import json
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

pytest.importorskip("starlette", reason="serving is the 'serve' extra")
httpclient = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is in the test extra")

from cbam_deploy.export_job import ExportOptions, export_bundle  # noqa: E402
from cbam_deploy.serve.app import ServeConfig, create_app  # noqa: E402
from serving import running_server  # noqa: E402
from reference.digits import CHECKPOINT  # noqa: E402


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("serve") / "bundle"
    export_bundle(ExportOptions(model="resnet10_half_cbam", stem="cifar", weights=str(CHECKPOINT), output=str(out)))
    return out


@pytest.fixture(scope="module")
def server(bundle):
    labels = bundle.parent / "labels.txt"
    labels.write_text("\n".join(f"digit-{i}" for i in range(10)) + "\n")
    app = create_app(ServeConfig(str(bundle), max_batch=8, batch_timeout_ms=10, max_body_mb=1, labels=str(labels)))
    with running_server(app) as url:
        yield {"url": url, "app": app, "name": app.state.model_name, "runner": app.state.runner}


def post(url: str, path: str, body: bytes, headers: dict | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(f"http://{url}{path}", data=body, headers=headers or {}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def inputs(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 32, 32), dtype=np.float32)


def test_health_and_metadata_with_tritonclient(server):
    client = httpclient.InferenceServerClient(url=server["url"])
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(server["name"])
    meta = client.get_model_metadata(server["name"])
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 3, 32, 32]}]
    assert meta["outputs"][0]["name"] == "logits" and meta["outputs"][0]["shape"] == [-1, 10]


@pytest.mark.parametrize("binary", [True, False])
def test_infer_binary_and_json_match_the_runner(server, binary):
    client = httpclient.InferenceServerClient(url=server["url"])
    x = inputs(3, seed=int(binary))
    tensor = httpclient.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    result = client.infer(server["name"], [tensor], outputs=[httpclient.InferRequestedOutput("logits", binary_data=binary)])
    np.testing.assert_allclose(result.as_numpy("logits"), server["runner"].run(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("payload,status,needle", [
    ({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 16, 16], "data": [0.0] * 768}]}, 400, "shape"),
    ({"inputs": [{"name": "input", "datatype": "INT32", "shape": [1, 3, 32, 32], "data": [0] * 3072}]}, 400, "datatype"),
    ({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 32, 32], "data": [0.0] * 10}]}, 400, "elements"),
    ({"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 3, 32, 32], "data": [0.0] * 3072}]}, 400, "unknown input"),
    ({"inputs": []}, 400, "inputs"),
    ({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 32, 32], "data": ["x"] * 3072}]}, 400, "not a list"),
])
def test_bad_requests_are_4xx_and_the_server_keeps_serving(server, payload, status, needle):
    code, body = post(server["url"], f"/v2/models/{server['name']}/infer", json.dumps(payload).encode())
    assert code == status and needle in json.loads(body)["error"]
    assert httpclient.InferenceServerClient(url=server["url"]).is_server_ready()


def test_malformed_json_unknown_model_and_binary_header(server):
    name = server["name"]
    code, body = post(server["url"], f"/v2/models/{name}/infer", b"{not json")
    assert code == 400 and "malformed JSON" in json.loads(body)["error"]
    code, _ = post(server["url"], "/v2/models/resnet50/infer", b"{}")
    assert code == 404
    code, _ = post(server["url"], "/v2/models/..%2F..%2Fetc%2Fpasswd/infer", b"{}")
    assert code == 404
    code, body = post(server["url"], f"/v2/models/{name}/infer", b'{"inputs": []}', {"Inference-Header-Content-Length": "999"})
    assert code == 400
    header = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 32, 32],
                                     "parameters": {"binary_data_size": 4 * 3072}}]}).encode()
    code, body = post(server["url"], f"/v2/models/{name}/infer", header + b"\x00" * 100,
                      {"Inference-Header-Content-Length": str(len(header))})
    assert code == 400 and "runs past" in json.loads(body)["error"]


def declared_only(url: str, path: str, length: int, content_type: str = "application/json") -> int:
    """Send only the headers of a POST declaring a ``length``-byte body; the status the server answers.
    (Sending the body too races the server's early 413 and close: the client may see a reset.)"""
    import socket

    host, port = url.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {url}\r\nContent-Type: {content_type}\r\n"
                     f"Content-Length: {length}\r\n\r\n".encode())
        return int(sock.makefile("rb").readline().split()[1])


def test_body_limit_is_413(server):
    assert declared_only(server["url"], f"/v2/models/{server['name']}/infer", 2 * 1024 * 1024) == 413
    assert declared_only(server["url"], "/v1/classify", 2 * 1024 * 1024, "image/png") == 413


def _png(seed: int = 0) -> bytes:
    from PIL import Image

    from reference.digits import digits_split

    images, labels = digits_split()["test"]
    buffer = io.BytesIO()
    Image.fromarray(images[seed], mode="L").save(buffer, format="PNG")
    return buffer.getvalue(), int(labels[seed])


def test_classify_raw_and_multipart(server):
    data, label = _png(0)
    code, body = post(server["url"], "/v1/classify?top_k=3", data, {"Content-Type": "image/png"})
    result = json.loads(body)
    assert code == 200 and len(result["top_k"]) == 3
    assert result["top_k"][0]["index"] == label and result["top_k"][0]["label"] == f"digit-{label}"
    boundary = "cbamboundary"
    multipart = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"d.png\"\r\n"
                 f"Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    code, body = post(server["url"], "/v1/classify", multipart, {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert code == 200 and json.loads(body)["top_k"][0]["index"] == label
    code, body = post(server["url"], "/v1/classify", b"not an image at all", {"Content-Type": "image/png"})
    assert 400 <= code < 500 and "image" in json.loads(body)["error"]


def test_bounded_load_with_dynamic_batching(server):
    """16 concurrent clients, 240 requests in all, each answer checked against the runner."""
    url, name, runner = server["url"], server["name"], server["runner"]
    failures, checked = [], []
    lock = threading.Lock()

    def client_loop(worker: int) -> None:
        client = httpclient.InferenceServerClient(url=url, connection_timeout=30, network_timeout=60)
        for i in range(15):
            x = inputs(1 + (i % 2), seed=worker * 100 + i)
            tensor = httpclient.InferInput("input", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x)
            try:
                got = client.infer(name, [tensor]).as_numpy("logits")
                ok = np.allclose(got, runner.run(x), rtol=1e-4, atol=1e-4)
            except Exception as exc:  # any error fails the run
                with lock:
                    failures.append(repr(exc))
                continue
            with lock:
                checked.append(ok)

    threads = [threading.Thread(target=client_loop, args=(w,)) for w in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not failures and len(checked) == 240 and all(checked)
    with urllib.request.urlopen(f"http://{url}/metrics", timeout=10) as response:
        metrics = response.read().decode()
    assert 'cbam_requests_total{code="200",endpoint="infer"}' in metrics
    sizes = {}
    for line in metrics.splitlines():
        if line.startswith("cbam_batch_size_bucket"):
            bound = line.split('le="')[1].split('"')[0]
            sizes[bound] = float(line.rsplit(" ", 1)[1])
    assert sizes["+Inf"] > sizes["2.0"], "no batch larger than 2 was ever formed"


def test_serve_command_end_to_end(bundle):
    """The console script itself: starts on a loopback port, answers, stops on SIGINT (exit 0)."""
    import os
    import shutil
    import signal
    import subprocess
    import time

    from serving import free_port

    exe = shutil.which("cbam-deploy", path=os.path.dirname(sys.executable)) or shutil.which("cbam-deploy")
    port, grpc_port = free_port(), free_port()  # gRPC on a free port, not the default 8001 another run may hold
    process = subprocess.Popen([exe, "serve", str(bundle), "--port", str(port), "--grpc-port", str(grpc_port)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2) as response:
                    assert json.loads(response.read())["ready"] is True
                    break
            except (urllib.error.URLError, ConnectionError):
                assert process.poll() is None, process.stderr.read()
                assert time.monotonic() < deadline, "server did not come up"
                time.sleep(0.2)
        client = httpclient.InferenceServerClient(url=f"127.0.0.1:{port}")
        assert client.get_model_metadata("resnet10_half_cbam")["name"] == "resnet10_half_cbam"
        import tritonclient.grpc as grpcclient

        assert grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}").is_model_ready("resnet10_half_cbam")
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=30)
    assert process.returncode == 0 and "stopped" in process.stderr.read()  # Ctrl-C is the normal way to stop it
