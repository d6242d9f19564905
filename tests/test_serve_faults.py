"""Server chaos: what a hostile or unlucky client can send, and that the server answers it and stays
ready. Mixed HxW on a dynamic-HxW bundle (answers equal to a direct onnxruntime run), thin and huge
images, 16-bit images, malformed and type-confused JSON (with hypothesis fuzzing the parser), slow
clients, a batch loop that fails or dies, SIGTERM under traffic, bind failures and bad ports.
Servers run on 127.0.0.1 and are stopped by the tests."""

import asyncio
import http.client
import io
import json
import os
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

pytest.importorskip("starlette", reason="serving is the 'serve' extra")
pytest.importorskip("hypothesis", reason="hypothesis is in the test extra")
psutil = pytest.importorskip("psutil", reason="psutil is in the test extra")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from PIL import Image  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from cbam_deploy.data import preprocess_image  # noqa: E402
from cbam_deploy.cli import app as cli_app  # noqa: E402
from cbam_deploy.export_job import ExportOptions, export_bundle, make_input_spec  # noqa: E402
from cbam_deploy.serve.app import ServeConfig, create_app  # noqa: E402
from cbam_deploy.serve.batcher import BatcherError, DynamicBatcher  # noqa: E402
from serving import running_server  # noqa: E402
from cbam_deploy.serve.protocol import DATATYPES, ProtocolError, decode_input, parse_infer_request, wants_binary  # noqa: E402
from reference.digits import CHECKPOINT  # noqa: E402

MODEL = "resnet10_half_cbam"
INFER = f"/v2/models/{MODEL}/infer"


# ---------------------------------------------------------------- fixtures and helpers

@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("faults") / "bundle"
    export_bundle(ExportOptions(model=MODEL, stem="cifar", weights=str(CHECKPOINT), output=str(out), dynamic_hw=True,
                                parity=False))
    return out


@pytest.fixture(scope="module")
def session(bundle):
    import onnxruntime as ort

    return ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def server(bundle):
    app = create_app(ServeConfig(str(bundle), max_batch=8, batch_timeout_ms=20, max_body_mb=2,
                                 max_image_pixels=20_000_000, request_timeout_s=20))
    with running_server(app) as url:
        yield {"url": url, "app": app}


def request(url: str, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
            timeout: float = 30) -> tuple[int, bytes, dict]:
    host, port = url.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read(), dict(response.getheaders())
    finally:
        connection.close()


def post(url: str, path: str, body: bytes, headers: dict | None = None, timeout: float = 30) -> tuple[int, bytes]:
    status, data, _ = request(url, "POST", path, body, headers, timeout)
    return status, data


def infer_json(x: np.ndarray) -> bytes:
    return json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                                   "data": x.ravel().tolist()}]}).encode()


def infer_binary(x: np.ndarray) -> tuple[bytes, dict]:
    head = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                                   "parameters": {"binary_data_size": x.nbytes}}],
                       "outputs": [{"name": "logits", "parameters": {"binary_data": True}}]}).encode()
    return head + x.tobytes(), {"Inference-Header-Content-Length": str(len(head))}


def logits_of(body: bytes, headers: dict) -> np.ndarray:
    size = headers.get("inference-header-content-length") or headers.get("Inference-Header-Content-Length")
    if size:
        return np.frombuffer(body[int(size):], dtype=np.float32)
    return np.asarray(json.loads(body)["outputs"][0]["data"], dtype=np.float32)


def assert_serving(url: str, session=None) -> None:
    """Live, ready (server and model), and a real inference gives the right answer."""
    for path in ("/v2/health/live", "/v2/health/ready", f"/v2/models/{MODEL}/ready"):
        status, body, _ = request(url, "GET", path, timeout=10)
        assert status == 200, (path, body)
    x = np.random.default_rng(7).standard_normal((1, 3, 32, 32), dtype=np.float32)
    status, body, headers = request(url, "POST", INFER, infer_json(x), timeout=30)
    assert status == 200, body
    if session is not None:
        np.testing.assert_allclose(logits_of(body, headers).reshape(1, -1), session.run(None, {"input": x})[0],
                                   rtol=1e-4, atol=1e-4)


def metric(url: str, name: str) -> float:
    _, body, _ = request(url, "GET", "/metrics", timeout=10)
    values = [float(line.rsplit(" ", 1)[1]) for line in body.decode().splitlines() if line.startswith(name)]
    return sum(values)


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A ~70-byte PNG whose header declares width x height: a decompression bomb as the server first sees it."""
    data = bytearray(png(Image.new("L", (1, 1))))
    data[16:24] = struct.pack(">II", width, height)  # IHDR payload starts at byte 16
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # CRC over chunk type + payload
    return bytes(data)


class PeakRSS:
    """Peak resident memory of this process while the block runs (sampled every 2 ms)."""

    def __enter__(self):
        self.process, self.start, self.peak, self.done = psutil.Process(), psutil.Process().memory_info().rss, 0, False
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.done:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc):
        self.done = True
        self.thread.join()
        self.growth_mb = (self.peak - self.start) / 1e6


# ---------------------------------------------------------------- 1. mixed shapes, the batch loop

SHAPES = [(1, 3, 32, 32), (2, 3, 32, 32), (1, 3, 40, 48), (1, 3, 24, 24), (3, 3, 17, 33), (1, 3, 64, 16)]


def test_mixed_shapes_concurrently_match_onnxruntime(server, session):
    """24 clients at once, six different HxW and batch sizes, JSON and binary: every answer equals a
    direct onnxruntime run of that request alone (concatenating requests of different shapes would fail the
    whole batch)."""
    url, answers, failures = server["url"], [], []
    lock = threading.Lock()

    def client(worker: int) -> None:
        for i in range(4):
            x = np.random.default_rng(worker * 10 + i).standard_normal(SHAPES[(worker + i) % len(SHAPES)], dtype=np.float32)
            body, headers = infer_binary(x) if (worker + i) % 2 else (infer_json(x), {})
            try:
                status, data, response_headers = request(url, "POST", INFER, body, headers)
                assert status == 200, data
                got = logits_of(data, response_headers).reshape(len(x), -1)
                np.testing.assert_allclose(got, session.run(None, {"input": x})[0], rtol=1e-4, atol=1e-4)
            except Exception as exc:  # collected: an assertion in a thread would be lost
                with lock:
                    failures.append(f"{x.shape}: {exc!r}"[:300])
                continue
            with lock:
                answers.append(x.shape)

    threads = [threading.Thread(target=client, args=(w,)) for w in range(24)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not failures, failures[:3]
    assert len(answers) == 96 and len(set(answers)) == len(SHAPES)
    assert_serving(url, session)


def _batcher_case(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 20))


def test_batcher_merges_only_same_shape_and_dtype():
    seen = []

    def run(batch):
        seen.append((batch.shape, batch.dtype))
        return batch.reshape(len(batch), -1).sum(axis=1, keepdims=True).astype(np.float64)

    async def scenario():
        batcher = DynamicBatcher(run, max_batch=8, timeout_ms=30)
        batcher.start()
        inputs = [np.full((1, 3, 8, 8), 1, np.float32), np.full((2, 3, 8, 9), 2, np.float32),
                  np.full((1, 3, 8, 8), 3, np.float64), np.full((1, 3, 8, 8), 4, np.float32),
                  np.full((12, 3, 8, 8), 5, np.float32)]  # larger than max_batch: runs alone
        results = await asyncio.gather(*(batcher.infer(x) for x in inputs))
        await batcher.stop()
        return inputs, results

    inputs, results = _batcher_case(scenario())
    for x, y in zip(inputs, results):
        assert y.shape == (len(x), 1) and np.allclose(y[:, 0], x.reshape(len(x), -1).sum(axis=1))
    # the two (1, 3, 8, 8) float32 requests ran together; nothing else was merged
    assert sorted(seen, key=str) == sorted([((2, 3, 8, 8), np.float32), ((2, 3, 8, 9), np.float32),
                                            ((1, 3, 8, 8), np.float64), ((12, 3, 8, 8), np.float32)], key=str)


def test_batcher_bounds_its_queue_and_every_wait():
    async def scenario():
        batcher = DynamicBatcher(lambda b: (time.sleep(0.5), b)[1], max_batch=1, timeout_ms=0, max_queue=2, wait_s=0.2)
        batcher.start()
        x = np.zeros((1, 3, 4, 4), np.float32)
        tasks = [asyncio.ensure_future(batcher.infer(x))]
        await asyncio.sleep(0.05)  # that one runs (for 0.5 s) ...
        tasks += [asyncio.ensure_future(batcher.infer(x)) for _ in range(2)]
        await asyncio.sleep(0)  # ... and two wait: the queue is full
        with pytest.raises(BatcherError) as full:
            await batcher.infer(x)
        running_at_refusal = not tasks[0].done()  # refused at once: the first batch is still running
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        await batcher.stop()
        return full.value, running_at_refusal, outcomes

    full, running_at_refusal, outcomes = _batcher_case(scenario())
    assert full.status == 503 and "queue is full" in str(full) and running_at_refusal
    assert all(isinstance(o, BatcherError) and o.status == 504 for o in outcomes)


def test_batcher_survives_a_failing_batch_and_fails_everyone_if_its_loop_dies():
    class Fatal(BaseException):
        pass

    calls = {"n": 0}

    def run(batch):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("runner exploded")
        return batch

    async def scenario():
        batcher = DynamicBatcher(run, max_batch=1, timeout_ms=0)
        batcher.start()
        x = np.zeros((1, 2), np.float32)
        with pytest.raises(RuntimeError, match="exploded"):
            await batcher.infer(x)
        ok = await batcher.infer(x)  # the loop survived
        healthy = batcher.not_ready()

        def die(size):
            raise Fatal()
        batcher.on_batch = die  # something the loop does not catch
        waiting = await asyncio.gather(*(batcher.infer(x) for _ in range(3)), return_exceptions=True)
        dead = batcher.not_ready()
        with pytest.raises(BatcherError) as refused:
            await batcher.infer(x)
        return ok, healthy, waiting, dead, refused.value

    ok, healthy, waiting, dead, refused = _batcher_case(scenario())
    assert ok.shape == (1, 2) and healthy is None
    assert all(isinstance(w, BatcherError) and w.status == 503 for w in waiting), waiting
    # refused at once: a request that waited would end in the 504 of wait_s, not this 503
    assert "batch loop stopped" in dead and refused.status == 503 and "batch loop stopped" in str(refused)


def test_unexpected_errors_are_counted_500s_and_a_dead_loop_makes_the_server_unready(bundle):
    app = create_app(ServeConfig(str(bundle), max_batch=4, batch_timeout_ms=1))
    batcher, body = app.state.batcher, infer_json(np.zeros((1, 3, 32, 32), np.float32))
    good_run = batcher.run

    def get(url, path):
        return request(url, "GET", path, timeout=10)[0]

    def broken(batch):
        raise RuntimeError("onnxruntime said no")

    class Fatal(BaseException):
        pass

    def die(size):
        raise Fatal()

    with running_server(app) as url:
        batcher.run = broken
        status, answer = post(url, INFER, body)
        assert status == 500 and "internal error" in json.loads(answer)["error"]
        assert metric(url, 'cbam_unhandled_errors_total{endpoint="infer"}') == 1
        assert metric(url, 'cbam_requests_total{code="500",endpoint="infer"}') == 1
        assert get(url, "/v2/health/ready") == 200
        batcher.run = good_run
        assert post(url, INFER, body)[0] == 200

        batcher.on_batch = die  # something the batch loop does not catch: it ends
        status, answer = post(url, INFER, body, timeout=10)
        assert status == 503 and "batch loop stopped" in json.loads(answer)["error"]
        assert get(url, "/v2/health/ready") == 503 and get(url, f"/v2/models/{MODEL}/ready") == 503
        assert get(url, "/v2/health/live") == 200 and metric(url, "cbam_ready") == 0
        status, answer = post(url, INFER, body)  # refused at once: a request left waiting ends in a 504
        assert status == 503 and "batch loop stopped" in json.loads(answer)["error"]


def test_a_hung_model_times_out_turns_unready_and_does_not_hold_up_shutdown(bundle):
    app = create_app(ServeConfig(str(bundle), request_timeout_s=1, shutdown_timeout_s=1))
    release, returned = threading.Event(), threading.Event()

    def hung(batch):
        release.wait(60)
        returned.set()
        return batch

    app.state.batcher.run = hung
    body = infer_json(np.zeros((1, 3, 32, 32), np.float32))
    try:
        with running_server(app) as url:
            started = time.perf_counter()
            status, answer = post(url, INFER, body)
            # not before the 1 s timeout, and while the model is still hung (it is never released in here)
            assert status == 504 and time.perf_counter() - started > 0.9 and not returned.is_set(), answer
            time.sleep(0.1)
            status, answer, _ = request(url, "GET", "/v2/health/ready", timeout=5)
            assert status == 503 and "running for" in json.loads(answer)["error"]
            assert request(url, "GET", "/v2/health/live", timeout=5)[0] == 200
            threading.Thread(target=post, args=(url, INFER, body), daemon=True).start()  # in flight at the stop
            time.sleep(0.2)
        # running_server fails when the server has not stopped; it stopped with the model still hung
        assert not returned.is_set(), "the shutdown waited for the hung inference"
    finally:
        release.set()


# ---------------------------------------------------------------- 2. images: thin, huge, 16-bit

@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_thin_and_huge_images_are_4xx_quickly_without_memory_growth(server):
    url = server["url"]
    thin = png(Image.new("L", (1, 60000)))
    assert len(thin) < 300
    cases = [(thin, 422, "aspect ratio"), (png(Image.new("L", (60000, 1))), 422, "aspect ratio"),
             (png_declaring(10_000, 10_000), 413, "pixels"),    # over the server's cap, under PIL's bomb limit
             (png_declaring(200_000, 200_000), 413, "pixels"),  # over PIL's own bomb limit
             (png_declaring(0, 5), 415, "image"),
             (png(Image.new("L", (64, 64)))[:60], 415, "image"),  # truncated
             (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", 415, "image")]  # EPS: never handed to Ghostscript
    yy, xx = np.mgrid[0:1000, 0:1000]
    photo = png(Image.fromarray(np.stack([xx % 256, yy % 256, (xx + yy) % 256], -1).astype(np.uint8)))  # 1 MP

    def seconds(data: bytes, status: int) -> float:
        """The quickest of three answers (a moment of other work on the machine hits one, not all)."""
        times = []
        for _ in range(3):
            started = time.perf_counter()
            code, body = post(url, "/v1/classify", data, {"Content-Type": "image/png"})
            times.append(time.perf_counter() - started)
            assert code == status, (code, body)
        return min(times)

    with PeakRSS() as rss:
        for data, status, needle in cases:
            code, body = post(url, "/v1/classify", data, {"Content-Type": "image/png"})
            assert code == status and needle in json.loads(body)["error"], (code, body)
            # refused without decoding: quicker than an ordinary photo decoded and run, timed next to it
            refused_in, photo_in = seconds(data, status), seconds(photo, 200)
            assert refused_in < photo_in, f"refused in {refused_in:.2f} s; a 1-megapixel photo took {photo_in:.2f} s"
    assert rss.growth_mb < 100, f"RSS grew {rss.growth_mb:.0f} MB"
    # thin, but within the aspect limit: answered, at the cost of a square
    code, body = post(url, "/v1/classify", png(Image.new("L", (20, 900), 128)), {"Content-Type": "image/png"})
    assert code == 200 and len(json.loads(body)["top_k"]) == 5
    assert_serving(url)


def test_health_answers_while_big_images_are_processed(server):
    """Decoding and preprocessing run off the event loop: liveness answers while the images are being
    worked on. Judged by order and against the image work itself, measured in the same run (so a busy
    machine slows both sides alike): health answers keep arriving before the first image is answered,
    and each takes a small part of what one image takes. Were decoding on the event loop, a health
    request would wait for the decode in progress: as long as an image's own work."""
    url = server["url"]
    big = png(Image.new("RGB", (4200, 4200), (90, 140, 200)))  # 17.6 MP: ~0.5 s of work each, on 2 cores
    results, spans, live = [], [], []

    def classify():
        started = time.perf_counter()
        results.append(post(url, "/v1/classify", big, {"Content-Type": "image/png"})[0])
        spans.append((started, time.perf_counter()))

    threads = [threading.Thread(target=classify) for _ in range(4)]
    for thread in threads:
        thread.start()
    while any(t.is_alive() for t in threads):
        started = time.perf_counter()
        assert request(url, "GET", "/v2/health/live", timeout=30)[0] == 200
        live.append((started, time.perf_counter()))
    for thread in threads:
        thread.join()
    assert results == [200] * 4
    first_answer = min(end for _, end in spans)
    during = [end - start for start, end in live if end < first_answer]
    assert len(during) >= 3, f"{len(during)} health answers before the first image was answered"
    shortest_image = min(end - start for start, end in spans)
    assert max(during) < shortest_image / 4, \
        f"liveness took up to {max(during):.2f} s while one image took {shortest_image:.2f} s"


def _reference(image: Image.Image, spec: dict) -> np.ndarray:
    """The recipe preprocess_image must keep for ordinary images: resize shorter side, centre-crop."""
    pre = spec["preprocess"]
    method = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}[pre["interpolation"]]
    resize, crop = pre["resize_shorter"], pre["center_crop"]
    scale = resize / min(image.size)
    size = (max(resize, round(image.size[0] * scale)), max(resize, round(image.size[1] * scale)))
    image = image.convert("RGB").resize(size, method) if size != image.size else image.convert("RGB")
    left, top = (size[0] - crop) // 2, (size[1] - crop) // 2
    array = np.asarray(image.crop((left, top, left + crop, top + crop)), np.float32) * float(pre["scale"])
    return ((array - np.asarray(pre["mean"], np.float32)) / np.asarray(pre["std"], np.float32)).transpose(2, 0, 1)


@pytest.mark.parametrize("size,interpolation", [(32, "bilinear"), (224, "bilinear"), (64, "bicubic"), (100, "nearest")])
def test_preprocess_is_unchanged_for_ordinary_images(size, interpolation):
    spec = make_input_spec(size)
    spec["preprocess"]["interpolation"] = interpolation
    rng = np.random.default_rng(size)
    for width, height in [(40, 50), (500, 375), (375, 500), (size, size), (300, 1100), (17, 9)]:
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        assert np.array_equal(preprocess_image(image, spec), _reference(image, spec)), (width, height)


def test_preprocess_of_a_thin_strip_is_bounded_and_close_to_the_recipe():
    spec = make_input_spec(224)
    with PeakRSS() as rss:
        out = preprocess_image(Image.new("L", (1, 60000), 77), spec)  # the recipe would resize to 256 x 15.4M (12 GB)
    assert out.shape == (3, 224, 224) and rss.growth_mb < 100, f"RSS grew {rss.growth_mb:.0f} MB"
    yy, xx = np.mgrid[0:2000, 0:40]
    strip = Image.fromarray((127 + 100 * np.sin(xx / 7) * np.cos(yy / 31)).astype(np.uint8))  # small enough for the recipe
    np.testing.assert_allclose(preprocess_image(strip, spec), _reference(strip, spec), atol=2 / 255 / 0.224)


def test_sixteen_bit_images_scale_by_depth(server):
    spec = make_input_spec(32)
    gray = np.random.default_rng(3).integers(0, 256, (48, 40)).astype(np.uint8)
    eight = Image.open(io.BytesIO(png(Image.fromarray(gray))))
    sixteen = Image.open(io.BytesIO(png(Image.fromarray(gray.astype(np.uint16) * 257))))
    assert sixteen.mode == "I;16"
    np.testing.assert_allclose(preprocess_image(sixteen, spec), preprocess_image(eight, spec), atol=1 / 255 / 0.224)
    for image in (Image.fromarray(np.full((8, 8), 65535, np.uint16)), Image.fromarray(np.full((8, 8), 65535, np.int32))):
        white = preprocess_image(image, spec)  # 65535 is 1.0 after scaling, as 255 is for 8 bits
        np.testing.assert_allclose(white[:, 0, 0], (1 - np.asarray(spec["preprocess"]["mean"])) / spec["preprocess"]["std"],
                                   rtol=1e-5)
    tops = [json.loads(post(server["url"], "/v1/classify", png(im), {"Content-Type": "image/png"})[1])["top_k"][0]["index"]
            for im in (Image.fromarray(gray), Image.fromarray(gray.astype(np.uint16) * 257))]
    assert tops[0] == tops[1]


# ---------------------------------------------------------------- 3. malformed and type-confused JSON

def _tensor(**fields) -> dict:
    return {"name": "input", "datatype": "FP32", "shape": [1, 3, 32, 32], "data": [0.0] * 3072, **fields}


def _body(**fields) -> bytes:
    return json.dumps({"inputs": [_tensor()], **fields}).encode()


DEEP = b"[" * 10000 + b"]" * 10000
BAD_JSON = {
    "shape is a string": json.dumps({"inputs": [_tensor(shape="abc")]}).encode(),
    "name is a number": json.dumps({"inputs": [_tensor(name=1)]}).encode(),
    "parameters is a list": _body(parameters=[]),
    "outputs is a number": _body(outputs=5),
    "output name is a number": _body(outputs=[{"name": 1}]),
    "id is an object": _body(id={}),
    "inputs is an object": json.dumps({"inputs": _tensor()}).encode(),
    "inputs is empty": b'{"inputs": []}',
    "no inputs": b'{"id": "x"}',
    "shape overflows": json.dumps({"inputs": [_tensor(shape=[2**40, 2**40], data=[0.0])]}).encode(),
    "shape too long": json.dumps({"inputs": [_tensor(shape=[1] * 100, data=[0.0])]}).encode(),
    "shape has a bool": json.dumps({"inputs": [_tensor(shape=[True, 3, 32, 32])]}).encode(),
    "shape has a float": json.dumps({"inputs": [_tensor(shape=[1.0, 3, 32, 32])]}).encode(),
    "shape is negative": json.dumps({"inputs": [_tensor(shape=[-1, 3, 32, 32])]}).encode(),
    "shape has a huge int": b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [' + b"9" * 5000 + b"]}]}",
    "binary size is a bool": json.dumps({"inputs": [_tensor(parameters={"binary_data_size": True})]}).encode(),
    "binary size is negative": json.dumps({"inputs": [_tensor(parameters={"binary_data_size": -4})]}).encode(),
    "data is ragged": json.dumps({"inputs": [_tensor(shape=[2, 2], data=[[1, 2], [3]])]}).encode(),
    "data nested in another shape": json.dumps({"inputs": [_tensor(data=[[0.0] * 1536] * 2)]}).encode(),
    "data holds strings": json.dumps({"inputs": [_tensor(data=["x"] * 3072)]}).encode(),
    "data holds null": json.dumps({"inputs": [_tensor(data=[None] * 3072)]}).encode(),
    "data is null": json.dumps({"inputs": [_tensor(data=None)]}).encode(),
    "data holds bools": json.dumps({"inputs": [_tensor(data=[True] * 3072)]}).encode(),
    "data holds objects": json.dumps({"inputs": [_tensor(data=[{}] * 3072)]}).encode(),
    "data holds NaN": json.dumps({"inputs": [_tensor(data=[float("nan")] * 3072)]}).encode(),
    "data holds Infinity": json.dumps({"inputs": [_tensor(data=[float("inf")] * 3072)]}).encode(),
    "data overflows FP32": json.dumps({"inputs": [_tensor(data=[1e300] * 3072)]}).encode(),
    "data nested 10000 deep": b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1], "data": ' + DEEP + b"}]}",
    "document nested 10000 deep": DEEP,
    "top level is a list": b"[1, 2]",
    "top level is null": b"null",
    "top level is a string": b'"inputs"',
    "not UTF-8": b'{"inputs": "\xff\xfe"}',
    "not JSON": b"{not json",
    "empty body": b"",
    "datatype unknown": json.dumps({"inputs": [_tensor(datatype="FP8")]}).encode(),
    "datatype a number": json.dumps({"inputs": [_tensor(datatype=32)]}).encode(),
    "height 0": json.dumps({"inputs": [_tensor(shape=[1, 3, 0, 32], data=[])]}).encode(),
    "height too large": json.dumps({"inputs": [_tensor(shape=[1, 3, 1, 4000], data=[0.0] * 12000)]}).encode(),
    "two inputs": json.dumps({"inputs": [_tensor(), _tensor()]}).encode(),
}


@pytest.mark.parametrize("case", list(BAD_JSON))
def test_malformed_json_is_400_with_a_message_and_the_server_stays_ready(server, case):
    status, body = post(server["url"], INFER, BAD_JSON[case], {"Content-Type": "application/json"})
    assert status == 400, (status, body[:300])
    assert isinstance(json.loads(body)["error"], str)
    assert request(server["url"], "GET", "/v2/health/ready", timeout=10)[0] == 200


@pytest.mark.parametrize("header", ["-5", "abc", "1e3", "0", "99999999", "4"])
def test_bad_binary_header_length_is_400(server, header):
    x = np.zeros((1, 3, 32, 32), np.float32)
    body, _ = infer_binary(x)
    assert post(server["url"], INFER, body, {"Inference-Header-Content-Length": header})[0] == 400


def test_bad_requests_leave_no_5xx_in_the_metrics(server):
    for case in ("shape overflows", "document nested 10000 deep", "data holds NaN"):
        post(server["url"], INFER, BAD_JSON[case])
    assert metric(server["url"], "cbam_unhandled_errors_total") == 0
    assert metric(server["url"], 'cbam_requests_total{code="5') == 0
    assert_serving(server["url"])


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=10)


def _maybe(good):
    """Mostly a plausible value, sometimes any JSON value at all."""
    return st.one_of(good, good, JSON_VALUES)


TENSOR_PARAMETERS = st.fixed_dictionaries({}, optional={"binary_data_size": _maybe(st.integers(0, 64)),
                                                        "binary_data": _maybe(st.booleans())})
INPUT = st.fixed_dictionaries({}, optional={
    "name": _maybe(st.sampled_from(["input", "image"])), "datatype": _maybe(st.sampled_from(list(DATATYPES))),
    "shape": _maybe(st.lists(st.integers(0, 4), max_size=4)),
    "data": _maybe(st.lists(st.floats(allow_nan=False) | st.integers(-300, 300) | st.booleans(), max_size=16)),
    "parameters": _maybe(TENSOR_PARAMETERS)})
REQUEST = st.fixed_dictionaries({}, optional={
    "inputs": _maybe(st.lists(_maybe(INPUT), max_size=3)),
    "outputs": _maybe(st.lists(_maybe(st.fixed_dictionaries({"name": _maybe(st.just("logits"))},
                                                             optional={"parameters": _maybe(TENSOR_PARAMETERS)})), max_size=2)),
    "id": _maybe(st.text(max_size=8)), "parameters": _maybe(st.fixed_dictionaries({}, optional={
        "binary_data_output": _maybe(st.booleans())}))})


HEADER_LENGTHS = st.one_of(st.none(), st.just("exact"), st.integers(-5, 400).map(str), st.text(max_size=4))


@settings(max_examples=400, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(REQUEST, st.binary(max_size=64), HEADER_LENGTHS)
def test_fuzz_request_parser_raises_only_protocol_errors(payload, binary, header):
    head = json.dumps(payload).encode()
    header = str(len(head)) if header == "exact" else header
    try:
        request, rest = parse_infer_request(head + binary if header is not None else head, header)
        offset = 0
        for spec in request.inputs:
            array, offset = decode_input(spec, rest, offset)
            assert array.shape == tuple(spec.shape) and array.dtype == np.dtype(DATATYPES[spec.datatype])
        wants_binary(request, "logits")
    except ProtocolError as exc:
        assert 400 <= exc.status < 500 and str(exc)


@pytest.fixture(scope="module")
def fuzz_server(bundle):
    app = create_app(ServeConfig(str(bundle), max_batch=4, batch_timeout_ms=1))
    with running_server(app) as url:
        yield url


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(REQUEST)
def test_fuzz_the_infer_endpoint_never_answers_5xx(fuzz_server, payload):
    status, body = post(fuzz_server, INFER, json.dumps(payload).encode())
    assert status in (200, 400), body[:300]
    assert isinstance(json.loads(body), dict)


def test_fuzzing_left_the_server_ready(fuzz_server):
    assert_serving(fuzz_server)
    assert metric(fuzz_server, "cbam_unhandled_errors_total") == 0


# ---------------------------------------------------------------- 6. slow clients

@pytest.fixture(scope="module")
def impatient(bundle):
    app = create_app(ServeConfig(str(bundle), request_timeout_s=1.5, keep_alive_s=1))
    with running_server(app) as url:
        yield url


def test_slow_clients_do_not_block_others(impatient, session):
    """Clients that trickle their headers or their body hold only their own connection: health and
    inference go on, a trickled body is cut off with 408, an idle keep-alive connection is closed."""
    host, port = impatient.rsplit(":", 1)
    sockets = []
    try:
        for i in range(6):
            sock = socket.create_connection((host, int(port)), timeout=10)
            if i % 2:
                sock.sendall(b"POST /v2/health/live HTTP/1.1\r\nHost: x\r\n")  # headers never finished
            else:
                sock.sendall(f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n{{\"inp".encode())
            sockets.append(sock)
        for _ in range(5):
            assert request(impatient, "GET", "/v2/health/live", timeout=30)[0] == 200
        # answered while the slow clients hold their connections: the trickled body is not yet cut off
        assert not select.select([sockets[0]], [], [], 0)[0], "health waited for the slow clients"
        assert_serving(impatient, session)
        body_trickler = sockets[0]
        for _ in range(12):  # a byte every 0.25 s, until the answer comes (the body deadline is 1.5 s)
            if select.select([body_trickler], [], [], 0.25)[0]:
                break
            body_trickler.sendall(b" ")
        status_line = body_trickler.makefile("rb").readline()
        assert status_line.split()[1] == b"408", status_line
        idle = socket.create_connection((host, int(port)), timeout=10)
        sockets.append(idle)
        idle.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(0.2)
        assert b"200" in idle.recv(65536)
        time.sleep(1.6)  # past keep_alive_s: the server has closed it
        assert idle.recv(1) == b""
    finally:
        for sock in sockets:
            sock.close()
    assert_serving(impatient)


# ---------------------------------------------------------------- 5. the command: SIGTERM, bind failure, bad ports

def _console_script() -> str:
    return shutil.which("cbam-deploy", path=os.path.dirname(sys.executable)) or shutil.which("cbam-deploy")


def test_sigterm_stops_the_server_under_traffic(bundle):
    process = subprocess.Popen([_console_script(), "serve", str(bundle), "--port", "0", "--grpc-port", "0", "--max-batch", "4"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert select.select([process.stderr], [], [], 60)[0], "no 'serving' line within 60 s"
        line = process.stderr.readline()  # printed once the model is loaded and the socket listens
        match = re.search(r"serving .* on http://(\S+)", line)
        assert match, line + process.stderr.read()
        url = match.group(1)
        assert request(url, "GET", "/v2/health/ready", timeout=5)[0] == 200  # no retry needed: it is up
        host, port = url.rsplit(":", 1)
        slow = socket.create_connection((host, int(port)), timeout=10)  # a client that never finishes its body
        slow.sendall(f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n{{".encode())
        statuses = []

        def traffic(seed: int) -> None:
            for i in range(30):
                shape = SHAPES[(seed + i) % len(SHAPES)]
                try:
                    statuses.append(post(url, INFER, infer_json(np.zeros(shape, np.float32)), timeout=10)[0])
                except (OSError, http.client.HTTPException):  # the server went away: expected after SIGTERM
                    return

        threads = [threading.Thread(target=traffic, args=(s,), daemon=True) for s in range(8)]
        for thread in threads:
            thread.start()
        time.sleep(1.0)
        assert statuses and set(statuses) == {200}, statuses
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)  # stops with a client that never finishes its body still connected
        slow.close()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert "Traceback" not in process.stderr.read()


cli = CliRunner()


def test_bind_failure_is_one_line_with_exit_4(bundle):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = cli.invoke(cli_app, ["serve", str(bundle), "--port", str(port)])
    assert result.exit_code == 4, result.output
    assert f"cannot bind 127.0.0.1:{port}" in result.stderr and "serving" not in result.stderr
    assert "Traceback" not in result.output and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args,needle", [
    (["--port", "70000"], "--port must be 0 to 65535"),
    (["--port", "-1"], "--port must be 0 to 65535"),
    (["--max-batch", "0"], "--max-batch 0"),
    (["--request-timeout-s", "nan"], "--request-timeout-s nan"),
])
def test_bad_serve_options_are_one_line_with_exit_2(bundle, args, needle):
    result = cli.invoke(cli_app, ["serve", str(bundle), "--port", "0", *args])
    assert result.exit_code == 2, result.output
    assert needle in result.stderr and "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1
