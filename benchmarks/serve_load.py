"""Serving under load on 127.0.0.1: throughput and p50/p99 latency with dynamic batching on and off.

A bounded run: N concurrent tritonclient HTTP clients (binary tensors), R requests each, batch 1,
against `cbam-deploy serve` started in-process on a free loopback port and stopped afterwards.
Usage: python benchmarks/serve_load.py [--model resnet50_cbam] [--clients 16] [--requests 10]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tritonclient.http as httpclient  # noqa: E402

from cbam_deploy.pipeline import ExportRequest, export_bundle  # noqa: E402
from cbam_deploy.serve.app import ServeConfig, create_app  # noqa: E402
from cbam_deploy.serve.local import running_server  # noqa: E402


def load(url: str, name: str, shape: tuple, clients: int, requests: int) -> dict:
    latencies, errors = [], []
    lock = threading.Lock()

    def worker(seed: int) -> None:
        client = httpclient.InferenceServerClient(url=url, network_timeout=120)
        x = np.random.default_rng(seed).standard_normal((1, *shape), dtype=np.float32)
        tensor = httpclient.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        for _ in range(requests):
            start = time.perf_counter()
            try:
                client.infer(name, [tensor]).as_numpy("logits")
            except Exception as exc:
                with lock:
                    errors.append(repr(exc))
                continue
            with lock:
                latencies.append((time.perf_counter() - start) * 1e3)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    return {"requests": len(latencies), "errors": len(errors), "seconds": wall, "throughput": len(latencies) / wall,
            "p50": statistics.median(latencies), "p99": float(np.percentile(latencies, 99))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50_cbam")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=10)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--timeout-ms", type=float, default=5.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        export_bundle(ExportRequest(model=args.model, output=tmp, parity=False))
        for max_batch in (1, args.max_batch):
            app = create_app(ServeConfig(tmp, max_batch=max_batch, batch_timeout_ms=args.timeout_ms))
            side = 224
            with running_server(app) as url:
                result = load(url, app.state.model_name, (3, side, side), args.clients, args.requests)
            mode = "off" if max_batch == 1 else f"on (max {max_batch}, {args.timeout_ms:g} ms)"
            print(f"{args.model} onnxruntime, dynamic batching {mode:18s}: {result['requests']} requests, "
                  f"{result['errors']} errors, {result['throughput']:.1f} req/s, p50 {result['p50']:.0f} ms, "
                  f"p99 {result['p99']:.0f} ms ({args.clients} clients)")


if __name__ == "__main__":
    main()
