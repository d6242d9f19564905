"""The server's settings (``ServeConfig``, checked before anything starts), its error type, and the facts
both endpoints (HTTP and gRPC) report about it."""

from __future__ import annotations

from dataclasses import dataclass

from .. import __version__
from ..errors import CbamDeployError
from ..runtimes import parse_runtimes


class ServeError(CbamDeployError):
    """The server could not bind its address or start. Exit code 4 (2 is a bad option or bundle,
    3 a failed parity/verify check)."""

    exit_code = 4


@dataclass
class ServeConfig:
    bundle: str | list[str]            # a bundle, a folder of bundles, or a list of either
    artifact: str | None = None
    name: str | None = None            # one bundle only
    max_batch: int = 8
    batch_timeout_ms: float = 5.0
    max_body_mb: float = 32.0
    labels: str | None = None
    threads: int | None = None
    runtime: str | None = None         # see cbam_deploy.runtimes; None: the best this machine has for the format
    top_k: int = 5
    max_queue: int = 256               # requests waiting for inference; more get 503 at once
    request_timeout_s: float = 30.0    # to receive a body (408) and to wait for a result (504)
    max_image_pixels: int = 24_000_000  # /v1/classify, from the image header (413); PIL's own bomb limit is ~89M
    max_aspect: float = 50.0           # /v1/classify: longer side / shorter side (422)
    decode_threads: int = 2            # worker threads for request decoding and image preprocessing
    limit_concurrency: int = 256       # uvicorn: connections + requests in flight; more get 503 (gRPC: RPCs in flight)
    keep_alive_s: int = 5              # uvicorn: idle keep-alive connections are closed after this
    shutdown_timeout_s: int = 3        # uvicorn: requests still running this long after SIGTERM are cancelled
    grpc_port: int | None = None       # the gRPC endpoint: None none (the CLI's --grpc-port 0), 0 any free port

    def check(self) -> None:
        skip = ("grpc_port",)
        bad = [f"--{name.replace('_', '-')} {value}" for name, value in vars(self).items()
               if name not in skip and isinstance(value, (int, float)) and not isinstance(value, bool)
               and not (value >= 0 if name == "batch_timeout_ms" else value > 0)]
        if bad:
            raise CbamDeployError("these serve settings must be positive: " + ", ".join(bad))
        if self.grpc_port is not None and not 0 <= self.grpc_port <= 65535:
            raise CbamDeployError(f"--grpc-port must be 0 to 65535, got {self.grpc_port}")
        if self.runtime is not None:
            if len(parse_runtimes(self.runtime)) != 1:
                raise CbamDeployError(f"--runtime: serve takes one runtime, got {self.runtime}")


def server_info() -> dict:
    return {"name": "cbam-deploy", "version": __version__, "extensions": ["binary_tensor_data", "model_repository"]}


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
