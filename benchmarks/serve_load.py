"""Serving under load on 127.0.0.1: throughput and p50/p99 latency with dynamic batching on and off,
or (--chaos) a load test with bad requests mixed in.

Default: a bounded run of N concurrent tritonclient HTTP clients (binary tensors), R requests each,
batch 1, against the server started in-process on a free loopback port and stopped afterwards.
Usage: python benchmarks/serve_load.py [--model resnet50_cbam] [--clients 16] [--requests 10]

--chaos: a --dynamic-hw bundle; N clients for --seconds, each request good (infer at one of several
HxW, JSON or binary; classify of a normal image) or, with --bad-fraction, bad (malformed or
type-confused JSON, wrong shapes, NaN, deep nesting, thin and bomb-sized images, undecodable bytes),
plus --slow-clients that trickle their bodies. Good answers are checked against a direct
onnxruntime run; readiness is polled throughout. Prints requests, statuses, wrong answers,
p50/p99 latency, and whether the server stayed ready.
Usage: python benchmarks/serve_load.py --chaos [--model resnet10_half_cbam --stem cifar] [--clients 32] [--seconds 40]

--protocols: HTTP JSON vs HTTP binary vs gRPC against one server (HTTP and gRPC endpoints, one
batcher), the same model, N clients (tritonclient.http / tritonclient.grpc), R batch-1 requests
each, --rounds rounds in rotated order; prints throughput, p50 and p99 per protocol (a Markdown table).
Usage: python benchmarks/serve_load.py --protocols [--model resnet50_cbam] [--clients 16] [--requests 10] [--rounds 2]
"""

from __future__ import annotations

import argparse
import collections
import http.client
import io
import json
import socket
import statistics
import struct
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the test helper that runs the server

import tritonclient.http as httpclient  # noqa: E402

from cbam_deploy.bundle import read_manifest  # noqa: E402
from cbam_deploy.export_job import ExportOptions, export_bundle  # noqa: E402
from cbam_deploy.serve.app import ServeConfig, create_app  # noqa: E402
from serving import running_server  # noqa: E402


PROTOCOLS = ("http-json", "http-binary", "grpc")


def load(url: str, name: str, shape: tuple, clients: int, requests: int, protocol: str = "http-binary",
         check=None) -> dict:
    """``clients`` threads, each with its own client, sending ``requests`` batch-1 requests one after
    another over ``protocol`` (http-json: JSON tensors both ways; http-binary: Triton's binary tensor
    extension, tritonclient's default; grpc: raw tensor contents). ``check(x, logits)`` verifies the
    first answer of each client."""
    import tritonclient.grpc as grpcclient

    latencies, errors, wrong = [], [], []
    lock = threading.Lock()

    def worker(seed: int) -> None:
        x = np.random.default_rng(seed).standard_normal((1, *shape), dtype=np.float32)
        if protocol == "grpc":
            client = grpcclient.InferenceServerClient(url=url)
            tensor = grpcclient.InferInput("input", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x)
            outputs = [grpcclient.InferRequestedOutput("logits")]
        else:
            binary = protocol == "http-binary"
            client = httpclient.InferenceServerClient(url=url, network_timeout=120)
            tensor = httpclient.InferInput("input", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x, binary_data=binary)
            outputs = [httpclient.InferRequestedOutput("logits", binary_data=binary)]
        for i in range(requests):
            start = time.perf_counter()
            try:
                logits = client.infer(name, [tensor], outputs=outputs).as_numpy("logits")
            except Exception as exc:
                with lock:
                    errors.append(repr(exc))
                continue
            elapsed = (time.perf_counter() - start) * 1e3
            with lock:
                latencies.append(elapsed)
                if i == 0 and check is not None and not check(x, logits):
                    wrong.append(seed)
        client.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    return {"protocol": protocol, "requests": len(latencies), "errors": len(errors), "wrong": len(wrong),
            "seconds": wall, "throughput": len(latencies) / wall, "latencies": latencies,
            "p50": statistics.median(latencies) if latencies else float("nan"),
            "p99": float(np.percentile(latencies, 99)) if latencies else float("nan")}


def protocols(args) -> None:
    """HTTP JSON vs HTTP binary vs gRPC: one server (HTTP and gRPC on free loopback ports, one
    batcher), the same model and clients; ``--rounds`` rounds, each running the three in a rotated
    order (so drift and warm-up do not favour one), latencies pooled per protocol."""
    with tempfile.TemporaryDirectory() as tmp:
        export_bundle(ExportOptions(model=args.model, stem=args.stem, output=tmp, parity=False))
        app = create_app(ServeConfig(tmp, max_batch=args.max_batch, batch_timeout_ms=args.timeout_ms, grpc_port=0,
                                     threads=args.threads))
        name, runner = app.state.model_name, app.state.runner
        side = int(read_manifest(tmp)["input"]["preprocess"]["center_crop"])
        shape = (3, side, side)

        def check(x, logits):
            return np.allclose(logits, runner.run(x), rtol=1e-4, atol=1e-4)

        pooled = {p: {"requests": 0, "errors": 0, "wrong": 0, "seconds": 0.0, "latencies": []} for p in PROTOCOLS}
        with running_server(app) as url:
            addresses = {"http-json": url, "http-binary": url, "grpc": app.state.grpc_address}
            for protocol in PROTOCOLS:  # warm-up: connections, first batches, allocator
                load(addresses[protocol], name, shape, min(args.clients, 4), 2, protocol)
            for round_index in range(args.rounds):
                order = PROTOCOLS[round_index % 3:] + PROTOCOLS[:round_index % 3]
                for protocol in order:
                    result = load(addresses[protocol], name, shape, args.clients, args.requests, protocol, check)
                    for key in ("requests", "errors", "wrong", "seconds"):
                        pooled[protocol][key] += result[key]
                    pooled[protocol]["latencies"] += result["latencies"]
                    print(f"  round {round_index + 1} {protocol:11s}: {result['throughput']:6.1f} req/s, "
                          f"p50 {result['p50']:6.1f} ms, p99 {result['p99']:6.1f} ms", file=sys.stderr)
    threads = runner.threads()
    print(f"{args.model} ({args.stem} stem, {side}x{side}) onnxruntime{f' {threads} threads' if threads else ''}, "
          f"dynamic batching max {args.max_batch} / {args.timeout_ms:g} ms, {args.clients} clients x {args.requests} "
          f"batch-1 requests x {args.rounds} rounds per protocol, one server, 127.0.0.1")
    print("| protocol | requests | errors | wrong | throughput (req/s) | p50 (ms) | p99 (ms) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for protocol, row in pooled.items():
        lat = row["latencies"]
        print(f"| {protocol} | {row['requests']} | {row['errors']} | {row['wrong']} | "
              f"{row['requests'] / row['seconds']:.1f} | {statistics.median(lat):.1f} | {np.percentile(lat, 99):.1f} |")


# ---------------------------------------------------------------- --chaos

GOOD_HW = [(32, 32), (40, 48), (24, 24), (17, 33), (64, 16)]
SLOW = "bad: slow body"


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _png_declaring(width: int, height: int) -> bytes:
    from PIL import Image

    data = bytearray(_png(Image.new("L", (1, 1))))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def _tensor_json(x: np.ndarray, **extra) -> bytes:
    return json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                                   "data": x.ravel().tolist(), **extra}]}).encode()


def _bad_requests(name: str) -> dict[str, tuple[str, bytes, dict]]:
    """(path, body, headers) of each kind of bad request."""
    from PIL import Image

    infer = f"/v2/models/{name}/infer"
    x = np.zeros((1, 3, 32, 32), np.float32)
    png = {"Content-Type": "image/png"}
    return {
        "malformed JSON": (infer, b"{not json", {}),
        "shape is a string": (infer, _tensor_json(x, shape="abc"), {}),
        "bool in shape": (infer, _tensor_json(x, shape=[True, 3, 32, 32]), {}),
        "overflowing shape": (infer, json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [2**40, 2**40],
                                                              "data": [0.0]}]}).encode(), {}),
        "nested 10000 deep": (infer, b"[" * 10000 + b"]" * 10000, {}),
        "NaN data": (infer, _tensor_json(np.full_like(x, np.nan)), {}),
        "wrong channels": (infer, _tensor_json(np.zeros((1, 4, 32, 32), np.float32)), {}),
        "parameters is a list": (infer, json.dumps({"inputs": [], "parameters": []}).encode(), {}),
        "thin image": ("/v1/classify", _png(Image.new("L", (1, 60000))), png),
        "bomb image": ("/v1/classify", _png_declaring(30000, 30000), png),
        "not an image": ("/v1/classify", b"GIF89a but not really", png),
    }


def _call(url: str, path: str, body: bytes | None = None, headers: dict | None = None, timeout: float = 60):
    host, port = url.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        connection.request("POST" if body is not None else "GET", path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read(), {k.lower(): v for k, v in response.getheaders()}
    finally:
        connection.close()


def chaos(args) -> None:
    import onnxruntime as ort
    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp:
        export_bundle(ExportOptions(model=args.model, stem=args.stem, output=tmp, dynamic_hw=True, parity=False))
        session = ort.InferenceSession(str(Path(tmp) / "model.onnx"), providers=["CPUExecutionProvider"])
        app = create_app(ServeConfig(tmp, max_batch=args.max_batch, batch_timeout_ms=args.timeout_ms, max_body_mb=4,
                                     request_timeout_s=args.request_timeout_s))
        name = app.state.model_name
        bad = _bad_requests(name)
        photo = _png(Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)))
        lock = threading.Lock()
        statuses: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        latencies: dict[str, list[float]] = collections.defaultdict(list)
        wrong, failures, unready, live_ms = [], [], [], []
        stop = threading.Event()

        def record(kind: str, status: int, seconds: float) -> None:
            with lock:
                statuses[kind][status] += 1
                latencies["slow" if kind == SLOW else kind.split(":")[0]].append(seconds * 1e3)

        def client(seed: int) -> None:
            rng = np.random.default_rng(seed)
            while not stop.is_set():
                started = time.perf_counter()
                try:
                    if rng.random() < args.bad_fraction:
                        kind = list(bad)[rng.integers(len(bad))]
                        status = _call(url, *bad[kind])[0]
                        record(f"bad: {kind}", status, time.perf_counter() - started)
                        continue
                    if rng.random() < 0.1:
                        status, body, _ = _call(url, "/v1/classify", photo, {"Content-Type": "image/png"})
                        record("good: classify", status, time.perf_counter() - started)
                        continue
                    h, w = GOOD_HW[rng.integers(len(GOOD_HW))]
                    x = rng.standard_normal((int(rng.integers(1, 3)), 3, h, w), dtype=np.float32)
                    if rng.random() < 0.5:
                        head = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                                                       "parameters": {"binary_data_size": x.nbytes}}],
                                           "outputs": [{"name": "logits", "parameters": {"binary_data": True}}]}).encode()
                        status, body, headers = _call(url, f"/v2/models/{name}/infer", head + x.tobytes(),
                                                      {"Inference-Header-Content-Length": str(len(head))})
                    else:
                        status, body, headers = _call(url, f"/v2/models/{name}/infer", _tensor_json(x))
                    record("good: infer", status, time.perf_counter() - started)
                    if status == 200:
                        size = headers.get("inference-header-content-length")
                        got = (np.frombuffer(body[int(size):], np.float32) if size
                               else np.asarray(json.loads(body)["outputs"][0]["data"], np.float32)).reshape(len(x), -1)
                        expected = session.run(None, {"input": x})[0]
                        if not np.allclose(got, expected, rtol=1e-4, atol=1e-4):
                            with lock:
                                wrong.append((x.shape, float(np.abs(got - expected).max())))
                except Exception as exc:  # a dropped connection or a bad answer: counted, not fatal
                    with lock:
                        failures.append(repr(exc)[:200])

        def slow_client() -> None:
            """Sends headers and then one body byte every 0.5 s, until the server answers (408)."""
            host, port = url.rsplit(":", 1)
            while not stop.is_set():
                started = time.perf_counter()
                try:
                    with socket.create_connection((host, int(port)), timeout=60) as sock:
                        sock.sendall(f"POST /v2/models/{name}/infer HTTP/1.1\r\nHost: x\r\n"
                                     "Content-Length: 100000\r\n\r\n{".encode())
                        sock.settimeout(0.5)
                        while True:
                            try:
                                reply = sock.recv(4096)
                                break
                            except socket.timeout:
                                sock.sendall(b" ")
                    record(SLOW, int(reply.split()[1]) if reply else 0, time.perf_counter() - started)
                except OSError as exc:
                    with lock:
                        failures.append(f"slow client: {exc!r}")

        def monitor() -> None:
            while not stop.is_set():
                started = time.perf_counter()
                try:
                    ready = _call(url, "/v2/health/ready", timeout=10)[0]
                    live_ms.append((time.perf_counter() - started) * 1e3)
                    if ready != 200:
                        unready.append(ready)
                except OSError as exc:
                    unready.append(repr(exc))
                time.sleep(0.25)

        with running_server(app) as url:
            threads = ([threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
                       + [threading.Thread(target=slow_client) for _ in range(args.slow_clients)]
                       + [threading.Thread(target=monitor)])
            started = time.perf_counter()
            for thread in threads:
                thread.start()
            time.sleep(args.seconds)
            stop.set()
            for thread in threads:
                thread.join(timeout=120)
            wall = time.perf_counter() - started
            final_ready = _call(url, "/v2/health/ready")[0]
            metrics = _call(url, "/metrics")[1].decode()

    unhandled = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                    if line.startswith("cbam_unhandled_errors_total{"))
    total = sum(sum(c.values()) for c in statuses.values())
    print(f"chaos load: {args.model} ({args.stem} stem, dynamic HxW) onnxruntime, {args.clients} clients + "
          f"{args.slow_clients} slow clients, {args.bad_fraction:.0%} bad requests, {wall:.0f} s")
    print(f"requests answered: {total} ({total / wall:.1f}/s); dropped connections or client errors: {len(failures)}")
    for kind in sorted(statuses):
        print(f"  {kind:28s} " + ", ".join(f"{code}: {n}" for code, n in sorted(statuses[kind].items())))
    for kind in ("good", "bad", "slow"):
        if latencies[kind]:
            print(f"latency {kind}: p50 {statistics.median(latencies[kind]):.1f} ms, "
                  f"p99 {np.percentile(latencies[kind], 99):.1f} ms ({len(latencies[kind])} requests)")
    good_ok = sum(c[200] for k, c in statuses.items() if k.startswith("good"))
    good_all = sum(sum(c.values()) for k, c in statuses.items() if k.startswith("good"))
    print(f"good requests answered 200: {good_ok}/{good_all}; wrong answers: {len(wrong)}; "
          f"unhandled server errors (metrics): {unhandled:g}")
    print(f"readiness polls: {len(live_ms)}, not ready: {len(unready)}, slowest {max(live_ms, default=0):.0f} ms; "
          f"ready at the end: {final_ready == 200}")
    print("server stayed ready:", "yes" if not unready and final_ready == 200 else "NO")
    if failures:
        print("first client-side errors:", failures[:3])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default resnet50_cbam, or resnet10_half_cbam with --chaos")
    parser.add_argument("--stem", default=None, help="default imagenet, or cifar with --chaos")
    parser.add_argument("--clients", type=int, default=None, help="default 16, or 32 with --chaos")
    parser.add_argument("--requests", type=int, default=10)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--timeout-ms", type=float, default=5.0)
    parser.add_argument("--chaos", action="store_true", help="load with bad requests mixed in (see above)")
    parser.add_argument("--seconds", type=float, default=40.0)
    parser.add_argument("--bad-fraction", type=float, default=0.2)
    parser.add_argument("--slow-clients", type=int, default=4)
    parser.add_argument("--request-timeout-s", type=float, default=5.0)
    parser.add_argument("--protocols", action="store_true", help="HTTP JSON vs HTTP binary vs gRPC (see above)")
    parser.add_argument("--rounds", type=int, default=2, help="--protocols: rounds, each protocol once per round")
    parser.add_argument("--threads", type=int, default=None, help="--protocols: onnxruntime threads")
    args = parser.parse_args()
    if args.protocols:
        args.model, args.stem, args.clients = args.model or "resnet50_cbam", args.stem or "imagenet", args.clients or 16
        protocols(args)
        return
    if args.chaos:
        args.model, args.stem = args.model or "resnet10_half_cbam", args.stem or "cifar"
        args.clients = args.clients or 32
        chaos(args)
        return
    args.model, args.stem, args.clients = args.model or "resnet50_cbam", args.stem or "imagenet", args.clients or 16
    with tempfile.TemporaryDirectory() as tmp:
        export_bundle(ExportOptions(model=args.model, stem=args.stem, output=tmp, parity=False))
        for max_batch in (1, args.max_batch):
            app = create_app(ServeConfig(tmp, max_batch=max_batch, batch_timeout_ms=args.timeout_ms))
            side = int(read_manifest(tmp)["input"]["preprocess"]["center_crop"])
            with running_server(app) as url:
                result = load(url, app.state.model_name, (3, side, side), args.clients, args.requests)
            mode = "off" if max_batch == 1 else f"on (max {max_batch}, {args.timeout_ms:g} ms)"
            print(f"{args.model} onnxruntime, dynamic batching {mode:18s}: {result['requests']} requests, "
                  f"{result['errors']} errors, {result['throughput']:.1f} req/s, p50 {result['p50']:.0f} ms, "
                  f"p99 {result['p99']:.0f} ms ({args.clients} clients)")


if __name__ == "__main__":
    main()
