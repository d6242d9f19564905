"""The gRPC endpoint (KServe v2 GRPCInferenceService) and several models behind one server, on
127.0.0.1: tritonclient.grpc health, metadata, config, index and infer (raw tensors, a stream)
equal to the runner; typed contents through the protocol's own stub; bad requests as gRPC status
codes; one batcher for both protocols; two (three) bundles at once with stable, clash-free names;
the ModelService without any transport; the command with --grpc-port, its bind failure, SIGTERM."""

import asyncio
import json
import os
import queue
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

pytest.importorskip("starlette", reason="serving is the 'serve' extra")
grpc = pytest.importorskip("grpc", reason="grpcio is in the serve extra")
grpcclient = pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is in the test extra")
httpclient = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is in the test extra")

from tritonclient.grpc import service_pb2 as pb  # noqa: E402
from tritonclient.grpc import service_pb2_grpc as pb_grpc  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from cbam_deploy.cli import app as cli_app  # noqa: E402
from cbam_deploy.errors import CbamDeployError  # noqa: E402
from cbam_deploy.export_job import ExportOptions, export_bundle  # noqa: E402
from cbam_deploy.serve.app import ServeConfig, create_app  # noqa: E402
from serving import free_port, running_server  # noqa: E402
from cbam_deploy.serve.service import Metrics, load_repository, model_names  # noqa: E402

MODEL = "resnet10_half_cbam"
HEADS = Path(__file__).parent / "data" / "cbam_heads.py"


@pytest.fixture(scope="module")
def bundle(digits_bundle):
    return digits_bundle


@pytest.fixture(scope="module")
def server(bundle):
    app = create_app(ServeConfig(str(bundle), max_batch=8, batch_timeout_ms=10, max_body_mb=1, grpc_port=0))
    with running_server(app) as url:
        yield {"url": url, "grpc": app.state.grpc_address, "app": app, "runner": app.state.runner}


def inputs(n: int, seed: int = 0, hw: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, hw, hw), dtype=np.float32)


def tensor(x: np.ndarray, name: str = "input", datatype: str = "FP32"):
    t = grpcclient.InferInput(name, list(x.shape), datatype)
    t.set_data_from_numpy(x)
    return t


def stub(address: str):
    channel = grpc.insecure_channel(address)
    return channel, pb_grpc.GRPCInferenceServiceStub(channel)


# ---------------------------------------------------------------- tritonclient.grpc against serve

def test_health_metadata_config_and_index_with_tritonclient_grpc(server):
    client = grpcclient.InferenceServerClient(server["grpc"])
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL)
    assert client.is_model_ready(MODEL, "1") and client.get_server_metadata().name == "cbam-deploy"
    meta = client.get_model_metadata(MODEL, as_json=True)
    http_meta = httpclient.InferenceServerClient(server["url"]).get_model_metadata(MODEL)
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": ["-1", "3", "32", "32"]}]  # int64 in JSON
    assert [o["name"] for o in meta["outputs"]] == [o["name"] for o in http_meta["outputs"]] == ["logits"]
    assert meta["platform"] == http_meta["platform"] == "cbam-deploy/onnxruntime"
    config = client.get_model_config(MODEL).config
    assert config.max_batch_size == 8 and list(config.input[0].dims) == [3, 32, 32] and list(config.output[0].dims) == [10]
    index = client.get_model_repository_index().models
    assert [(m.name, m.version, m.state) for m in index] == [(MODEL, "1", "READY")]


@pytest.mark.parametrize("n", [1, 3])
def test_infer_raw_tensors_equal_the_runner(server, n):
    client = grpcclient.InferenceServerClient(server["grpc"])
    x = inputs(n, seed=n)
    result = client.infer(MODEL, [tensor(x)], outputs=[grpcclient.InferRequestedOutput("logits")], request_id=f"r{n}")
    assert result.get_response().id == f"r{n}" and result.get_response().raw_output_contents
    np.testing.assert_allclose(result.as_numpy("logits"), server["runner"].infer(x)["logits"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(client.infer(MODEL, [tensor(x)], model_version="1").as_numpy("logits"),
                               server["runner"].run(x), rtol=1e-5, atol=1e-5)


def test_infer_typed_contents_through_the_protocol_stub(server):
    """fp32_contents in, fp32_contents out (the answer mirrors the request, as KServe's servers do)."""
    x = inputs(2, seed=5)
    request = pb.ModelInferRequest(model_name=MODEL, id="typed")
    request.inputs.add(name="input", datatype="FP32", shape=x.shape).contents.fp32_contents.extend(x.ravel().tolist())
    channel, service = stub(server["grpc"])
    with channel:
        response = service.ModelInfer(request, timeout=30)
    assert not response.raw_output_contents and response.id == "typed" and response.model_version == "1"
    out = response.outputs[0]
    assert (out.name, out.datatype, list(out.shape)) == ("logits", "FP32", [2, 10])
    got = np.asarray(out.contents.fp32_contents, np.float32).reshape(2, 10)
    np.testing.assert_allclose(got, server["runner"].run(x), rtol=1e-5, atol=1e-5)


def test_stream_infer_answers_every_request_and_errors_in_band(server):
    client = grpcclient.InferenceServerClient(server["grpc"])
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    xs = {f"s{i}": inputs(1 + i % 2, seed=100 + i) for i in range(8)}
    try:
        for rid, x in xs.items():
            client.async_stream_infer(MODEL, [tensor(x)], request_id=rid)
        client.async_stream_infer(MODEL, [tensor(inputs(1, hw=16))], request_id="bad")  # wrong shape
        got = [answers.get(timeout=30) for _ in range(len(xs) + 1)]
    finally:
        client.stop_stream()
    errors = [e for r, e in got if e is not None]
    assert len(errors) == 1 and "does not match" in errors[0].message()
    results = {r.get_response().id: r.as_numpy("logits") for r, e in got if e is None}
    assert sorted(results) == sorted(xs)
    for rid, x in xs.items():
        np.testing.assert_allclose(results[rid], server["runner"].run(x), rtol=1e-5, atol=1e-5)


def _request(*, name="input", datatype="FP32", shape=(1, 3, 32, 32), raw=True, data=None, model=MODEL, **fields):
    x = np.zeros(shape, np.float32) if data is None else data
    request = pb.ModelInferRequest(model_name=model, **fields)
    t = request.inputs.add(name=name, datatype=datatype, shape=list(shape))
    if raw:
        request.raw_input_contents.append(x.tobytes())
    else:
        t.contents.fp32_contents.extend(x.ravel().tolist())
    return request


def _two_inputs():
    request = _request()
    request.inputs.add(name="input2", datatype="FP32", shape=[1])
    request.raw_input_contents.append(b"\0\0\0\0")
    return request


def _raw_and_typed():
    request = _request()
    request.inputs[0].contents.fp32_contents.extend([0.0] * 3072)
    return request


def _int_contents():
    request = _request(raw=False, data=np.zeros((1, 3, 32, 32), np.float32))
    request.inputs[0].contents.int_contents.extend([1])
    return request


def _unknown_output():
    request = _request()
    request.outputs.add(name="boxes")
    return request


BAD = {
    "unknown model": (lambda: _request(model="resnet50"), "NOT_FOUND", "unknown model"),
    "unknown version": (lambda: _request(model_version="2"), "NOT_FOUND", "version"),
    "unknown input": (lambda: _request(name="image"), "INVALID_ARGUMENT", "unknown input"),
    "wrong datatype": (lambda: _request(datatype="INT32"), "INVALID_ARGUMENT", "datatype"),
    "wrong shape": (lambda: _request(shape=(1, 3, 16, 16)), "INVALID_ARGUMENT", "does not match"),
    "raw size": (lambda: _request(shape=(2, 3, 32, 32), data=np.zeros((1, 3, 32, 32), np.float32)),
                 "INVALID_ARGUMENT", "bytes of raw contents"),
    "typed count": (lambda: _request(raw=False, shape=(2, 3, 32, 32), data=np.zeros(5, np.float32)),
                    "INVALID_ARGUMENT", "fp32_contents"),
    "NaN": (lambda: _request(data=np.full((1, 3, 32, 32), np.nan, np.float32)), "INVALID_ARGUMENT", "NaN"),
    "two inputs": (_two_inputs, "INVALID_ARGUMENT", "one input"),
    "no inputs": (lambda: pb.ModelInferRequest(model_name=MODEL), "INVALID_ARGUMENT", "no inputs"),
    "raw and typed": (_raw_and_typed, "INVALID_ARGUMENT", "both"),
    "int contents": (_int_contents, "INVALID_ARGUMENT", "int_contents"),
    "unknown output": (_unknown_output, "INVALID_ARGUMENT", "unknown output"),
    "negative dim": (lambda: _request(shape=(-1, 3, 32, 32), data=np.zeros(0, np.float32)), "INVALID_ARGUMENT", "shape"),
    "absurd shape": (lambda: _request(shape=(2**40, 2**40), data=np.zeros(0, np.float32)), "INVALID_ARGUMENT", "elements"),
    "batch 0": (lambda: _request(shape=(0, 3, 32, 32)), "INVALID_ARGUMENT", "batch 0"),
    "over max_body_mb": (lambda: _request(shape=(100, 3, 32, 32)), "RESOURCE_EXHAUSTED", ""),  # 1.2 MB > 1 MB
}


def test_bad_requests_get_the_right_grpc_status_and_the_server_keeps_serving(server):
    channel, service = stub(server["grpc"])
    with channel:
        for case, (make, code, needle) in BAD.items():
            with pytest.raises(grpc.RpcError) as failure:
                service.ModelInfer(make(), timeout=10)
                pytest.fail(f"{case}: answered")
            assert failure.value.code().name == code, (case, failure.value.code(), failure.value.details())
            assert needle in (failure.value.details() or ""), (case, failure.value.details())
        for call, request, code in [(service.ModelMetadata, pb.ModelMetadataRequest(name="nope"), "NOT_FOUND"),
                                    (service.ModelReady, pb.ModelReadyRequest(name=MODEL, version="7"), "NOT_FOUND"),
                                    (service.ModelConfig, pb.ModelConfigRequest(name="nope"), "NOT_FOUND"),
                                    (service.ModelStatistics, pb.ModelStatisticsRequest(name=MODEL), "UNIMPLEMENTED")]:
            with pytest.raises(grpc.RpcError) as failure:
                call(request, timeout=10)
            assert failure.value.code().name == code
        assert service.ServerReady(pb.ServerReadyRequest(), timeout=10).ready
    with urllib.request.urlopen(f"http://{server['url']}/metrics", timeout=10) as response:
        metrics = response.read().decode()
    assert 'cbam_requests_total{code="INVALID_ARGUMENT",endpoint="grpc_infer"}' in metrics
    assert 'cbam_unhandled_errors_total{endpoint="grpc_infer"}' not in metrics


def test_unavailable_deadline_and_internal_errors(bundle):
    app = create_app(ServeConfig(str(bundle), request_timeout_s=1, shutdown_timeout_s=1, grpc_port=0))
    batcher, release, returned = app.state.batcher, threading.Event(), threading.Event()
    good = batcher.run

    def hung(batch):
        release.wait(30)
        returned.set()
        return good(batch)

    def broken(batch):
        raise RuntimeError("onnxruntime said no")

    try:
        with running_server(app):
            client = grpcclient.InferenceServerClient(app.state.grpc_address)
            x = tensor(inputs(1))
            batcher.run = broken
            with pytest.raises(InferenceServerException) as failure:
                client.infer(MODEL, [x])
            assert failure.value.status() == "StatusCode.INTERNAL" and "internal error" in failure.value.message()
            batcher.run = hung
            with pytest.raises(InferenceServerException) as failure:
                client.infer(MODEL, [x])
            # the deadline, while the model is still hung: it was not waited for
            assert failure.value.status() == "StatusCode.DEADLINE_EXCEEDED" and not returned.is_set()
            release.set()
            batcher.run = good
            assert client.infer(MODEL, [x]).as_numpy("logits").shape == (1, 10)

            class Fatal(BaseException):
                pass

            def die(size):
                raise Fatal()  # something the batch loop does not catch: it ends
            batcher.on_batch = die
            for _ in range(2):  # the request in flight when the loop dies, then one refused at once
                with pytest.raises(InferenceServerException) as failure:
                    client.infer(MODEL, [x])
                assert failure.value.status() == "StatusCode.UNAVAILABLE"
            assert not client.is_server_ready() and not client.is_model_ready(MODEL) and client.is_server_live()
            assert client.get_model_repository_index().models[0].state == "UNAVAILABLE"
            assert client.get_model_repository_index(as_json=True).get("models") is not None
    finally:
        release.set()


def test_http_and_grpc_requests_share_one_batcher(bundle):
    app = create_app(ServeConfig(str(bundle), max_batch=8, batch_timeout_ms=300, grpc_port=0))
    sizes = []
    app.state.batcher.on_batch = sizes.append
    with running_server(app) as url:
        grpc_address, runner = app.state.grpc_address, app.state.runner
        results, lock = [], threading.Lock()

        def call(i: int) -> None:
            x = inputs(1, seed=200 + i)
            if i % 2:
                got = grpcclient.InferenceServerClient(grpc_address).infer(MODEL, [tensor(x)]).as_numpy("logits")
            else:
                t = httpclient.InferInput("input", list(x.shape), "FP32")
                t.set_data_from_numpy(x)
                got = httpclient.InferenceServerClient(url).infer(MODEL, [t]).as_numpy("logits")
            with lock:
                results.append(np.allclose(got, runner.run(x), rtol=1e-5, atol=1e-5))

        threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert results == [True] * 8
    assert max(sizes) > 4, f"no batch mixed HTTP and gRPC requests: {sizes}"


# ---------------------------------------------------------------- several models

@pytest.fixture(scope="module")
def models(bundle, tmp_path_factory):
    """A folder of three bundles: the digits classifier twice (same model name: a clash) and a detector."""
    folder = tmp_path_factory.mktemp("models")
    shutil.copytree(bundle, folder / "digits-a")
    shutil.copytree(bundle, folder / "digits-b")
    export_bundle(ExportOptions(model=f"{HEADS}:detector", input_size=32, output=str(folder / "detector"), parity=False))
    return folder


def test_several_bundles_at_once_over_both_protocols(models):
    app = create_app(ServeConfig(str(models), max_batch=4, batch_timeout_ms=2, grpc_port=0))
    repository = app.state.repository
    names = list(repository.models)  # bundles in folder order; the clashing pair is named by folder
    assert names == ["cbam_heads_detector", "digits-a", "digits-b"]
    detector = names[0]
    with running_server(app) as url:
        http = httpclient.InferenceServerClient(url)
        client = grpcclient.InferenceServerClient(app.state.grpc_address)
        assert [m.name for m in client.get_model_repository_index().models] == names
        assert [m["name"] for m in http.get_model_repository_index()] == names
        assert all(m["state"] == "READY" for m in http.get_model_repository_index())
        with urllib.request.urlopen(f"http://{url}/v2/repository/index", timeout=10) as response:
            assert [m["name"] for m in json.loads(response.read())] == names
        x = inputs(2, seed=9)
        for name in names:
            service = repository.models[name]
            assert client.is_model_ready(name) and http.is_model_ready(name)
            expected = service.runner.infer(x)
            got = client.infer(name, [tensor(x)])
            for output in service.output_names:
                np.testing.assert_allclose(got.as_numpy(output), expected[output], rtol=1e-5, atol=1e-5)
            assert [o["name"] for o in http.get_model_metadata(name)["outputs"]] == service.output_names
        assert repository.models["digits-a"].batcher is not repository.models["digits-b"].batcher
        with urllib.request.urlopen(f"http://{url}/metrics", timeout=10) as response:
            metrics = response.read().decode()
        for name in names:  # per-model batching, per-model counts
            assert f'cbam_batch_size_count{{model="{name}"}} 1.0' in metrics
            assert f'cbam_model_requests_total{{code="OK",model="{name}",protocol="grpc"}} 1.0' in metrics
        assert http.get_model_metadata(detector)["outputs"][0]["name"] == "output0"
        request = urllib.request.Request(f"http://{url}/v1/classify", data=b"x", method="POST")
        with pytest.raises(urllib.error.HTTPError) as refused:  # several models: /v1/classify needs ?model=
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 400 and "?model=" in json.loads(refused.value.read())["error"]


def test_model_names_are_stable_and_clash_free():
    def entry(base, folder, artifact="onnx-fp32", sha="0" * 64):
        return {"base": base, "folder": folder, "artifact": artifact, "sha256": sha}

    entries = [entry("resnet50_cbam", "r50"), entry("resnet50_cbam", "r50-int8", "int8-ort-cpu"), entry("mobilenet", "m")]
    assert model_names(entries) == ["r50", "r50-int8", "mobilenet"]
    assert model_names(entries[::-1]) == ["mobilenet", "r50-int8", "r50"]  # the same name whatever the order
    same_folder = [entry("m", "bundle", "onnx-fp32"), entry("m", "bundle", "int8-ort-cpu")]
    assert model_names(same_folder) == ["m-onnx-fp32", "m-int8-ort-cpu"]
    same_artifact = [entry("m", "bundle", sha="ab" * 32), entry("m", "bundle", sha="cd" * 32)]
    assert model_names(same_artifact) == ["m-abababab", "m-cdcdcdcd"]
    assert model_names([entry("a/b:c d", "x")]) == ["a_b_c_d"]  # safe in a URL path
    with pytest.raises(CbamDeployError, match="same artifact"):
        model_names([entry("m", "bundle"), entry("m", "bundle")])


def test_several_bundles_refuse_one_name_and_repeats(bundle, models, tmp_path):
    with pytest.raises(CbamDeployError, match="--name names one model"):
        load_repository(ServeConfig([str(models / "digits-a"), str(models / "detector")], name="x"), Metrics())
    with pytest.raises(CbamDeployError, match="given twice"):
        load_repository(ServeConfig([str(bundle), str(bundle)]), Metrics())
    (tmp_path / "not-a-bundle").mkdir()  # a folder whose sub-folders hold no manifest
    with pytest.raises(CbamDeployError, match="neither a bundle nor a folder of bundles"):
        load_repository(ServeConfig(str(tmp_path)), Metrics())


def test_the_model_service_without_any_transport(bundle):
    """Validation, infer, classify and readiness straight on ModelService / ModelRepository."""
    import io

    from PIL import Image

    from cbam_deploy.serve.protocol import ProtocolError

    repository = load_repository(ServeConfig(str(bundle), max_batch=4, batch_timeout_ms=1), Metrics())
    service = repository.get(MODEL)

    async def scenario():
        await repository.start()
        try:
            x = inputs(3)
            outputs = await service.infer(service.validate_batch(x))
            with pytest.raises(ProtocolError, match="NaN"):
                service.validate_batch(np.full((1, 3, 32, 32), np.inf, np.float32))
            with pytest.raises(ProtocolError, match="unknown output"):
                service.outputs_for(["boxes"])
            buffer = io.BytesIO()
            Image.new("RGB", (40, 30), (120, 30, 200)).save(buffer, format="PNG")
            top = await service.classify(buffer.getvalue(), 3, repository.workers)
            return x, outputs, top, repository.not_ready(), repository.index()
        finally:
            await repository.stop()

    x, outputs, top, not_ready, index = asyncio.run(asyncio.wait_for(scenario(), 60))
    np.testing.assert_allclose(outputs["logits"], service.runner.run(x), rtol=1e-5, atol=1e-5)
    assert len(top["top_k"]) == 3 and not_ready is None and index[0]["state"] == "READY"
    with pytest.raises(ProtocolError) as unknown:
        repository.get("resnet50")
    assert unknown.value.status == 404


# ---------------------------------------------------------------- the command

def test_serve_command_speaks_grpc_and_stops_on_sigterm(models):
    exe = shutil.which("cbam-deploy", path=os.path.dirname(sys.executable)) or shutil.which("cbam-deploy")
    grpc_port = free_port()
    process = subprocess.Popen([exe, "serve", str(models / "digits-a"), str(models / "detector"), "--port", "0",
                                "--grpc-port", str(grpc_port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert select.select([process.stderr], [], [], 60)[0], "no 'serving' line within 60 s"
        line = process.stderr.readline()
        match = re.search(r"serving (.*) on http://(\S+) and grpc://(\S+)", line)
        assert match and match.group(3) == f"127.0.0.1:{grpc_port}", line + process.stderr.read()
        client = grpcclient.InferenceServerClient(match.group(3))
        assert client.is_server_ready() and len(client.get_model_repository_index().models) == 2
        x = inputs(1)
        assert client.infer(MODEL, [tensor(x)]).as_numpy("logits").shape == (1, 10)
        client.start_stream(callback=lambda result, error: None)  # a stream open at the stop
        client.async_stream_infer(MODEL, [tensor(x)])
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)  # stops with a gRPC stream still open
        client.stop_stream(cancel_requests=True)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert "Traceback" not in process.stderr.read()


def test_a_taken_grpc_port_is_one_line_with_exit_4(bundle):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(cli_app, ["serve", str(bundle), "--port", "0", "--grpc-port", str(port)])
    assert result.exit_code == 4, result.output
    assert f"cannot bind 127.0.0.1:{port}" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    result = CliRunner().invoke(cli_app, ["serve", str(bundle), "--port", "8123", "--grpc-port", "8123"])
    assert result.exit_code == 2 and "both 8123" in result.stderr
