"""A KServe ``InferenceService`` manifest for a bundle: the step from one machine to a cluster.

Two predictors, both speaking the Open Inference Protocol (v2) on port 8080:

- ``triton``: KServe's Triton runtime (``kserve-tritonserver``) over the Triton model repository
  ``cbam-deploy triton`` writes (``--repository DIR`` writes it here too). ``--storage-uri`` is
  where that repository is uploaded (s3://, gs://, pvc://, ...); KServe's storage initializer puts
  it in /mnt/models, Triton's ``--model-store``.
- ``cbam-deploy``: this package's own server as a custom predictor: the Dockerfile's image
  (``--image``, pushed to a registry the cluster pulls from) running ``serve /mnt/models``, with
  ``--storage-uri`` the bundle (or a folder of bundles: every one is served).

Each gets resources (requests = limits, so the pod is Guaranteed QoS and latency is not at the
mercy of neighbours), min/max replicas with a concurrency target for the autoscaler, and a
readiness probe on ``/v2/health/ready`` (no traffic until the model is loaded and the batch loop
runs), plus a liveness probe for the custom predictor.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from ..bundle import Bundle
from ..errors import CbamDeployError
from ..checks import check_plain_text
from ..formats import get as get_format
from ..formats import rows
from ..manifest import ROOT_ARTIFACT
from ..fsutil import write_bytes_atomic
from .triton import triton_model_name

PREDICTORS = ("triton", "cbam-deploy")
_NAME = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_CPU = re.compile(r"^(\d+(\.\d+)?|\d+m)$")
_MEMORY = re.compile(r"^\d+(\.\d+)?(Ki|Mi|Gi|Ti|k|M|G|T)?$")
HTTP_PORT = 8080


def service_name(model: str) -> str:
    """An InferenceService name (a DNS-1035 label) from a model name: resnet50_cbam -> resnet50-cbam."""
    name = re.sub(r"[^a-z0-9-]+", "-", model.lower()).strip("-")
    name = name if name[:1].isalpha() else f"m-{name}"
    return name[:45].rstrip("-")


def _check(options: dict) -> None:
    if options["predictor"] not in PREDICTORS:
        raise CbamDeployError(f"--predictor must be one of {', '.join(PREDICTORS)}, got {options['predictor']!r}")
    check_plain_text("--storage-uri", options["storage_uri"])  # it goes into YAML and its comment header
    check_plain_text("--image", options["image"])
    if "://" not in options["storage_uri"]:
        raise CbamDeployError(f"--storage-uri must be a URI KServe can fetch (s3://, gs://, pvc://, https://, ...), "
                              f"got {options['storage_uri']!r}")
    name = options["name"]
    if not _NAME.match(name) or len(name) > 45:
        raise CbamDeployError(f"--name {name!r} is not an InferenceService name: lowercase letters, digits and '-', "
                              "starting with a letter, at most 45 characters")
    if options["namespace"] is not None and not _NAME.match(options["namespace"]):
        raise CbamDeployError(f"--namespace {options['namespace']!r} is not a Kubernetes namespace name")
    if not _CPU.match(options["cpu"]) or float(options["cpu"].rstrip("m") or 0) <= 0:
        raise CbamDeployError(f"--cpu must be a positive CPU quantity (2, 0.5, 500m), got {options['cpu']!r}")
    if not _MEMORY.match(options["memory"]) or float(re.match(r"[\d.]+", options["memory"]).group()) <= 0:
        raise CbamDeployError(f"--memory must be a positive memory quantity (4Gi, 512Mi), got {options['memory']!r}")
    if options["gpus"] is not None and options["gpus"] < 0:
        raise CbamDeployError(f"--gpus must be 0 or more, got {options['gpus']}")
    low, high = options["min_replicas"], options["max_replicas"]
    if low < 0 or high < 1 or high < low:
        raise CbamDeployError(f"replicas: --min-replicas {low} and --max-replicas {high} need 0 <= min <= max, max >= 1")
    if options["scale_target"] < 1 or options["max_batch"] < 1:
        raise CbamDeployError("--scale-target and --max-batch must be 1 or more")
    if options["predictor"] == "cbam-deploy" and not options["image"]:
        raise CbamDeployError("the cbam-deploy predictor needs --image: the Dockerfile's image (docker build --target cpu), "
                              "pushed to a registry the cluster pulls from")


def _cores(cpu: str) -> int:
    return max(1, math.ceil(int(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu)))


def inference_service(bundle: str | Path, storage_uri: str, predictor: str = "triton", name: str | None = None,
                      namespace: str | None = None, artifact: str | None = None, image: str | None = None,
                      model_name: str | None = None, cpu: str = "2", memory: str = "4Gi", gpus: int | None = None,
                      min_replicas: int = 1, max_replicas: int = 4, scale_target: int = 8, max_batch: int = 8) -> dict:
    """The InferenceService (as a dict) serving ``bundle``'s ``artifact`` with ``predictor``."""
    opened = Bundle.open(bundle)
    chosen = artifact or (opened.artifact().name if predictor == "cbam-deploy" else ROOT_ARTIFACT)
    opened.path_of(chosen)  # present and intact
    record = opened.artifact(chosen)
    model = triton_model_name(opened, model_name, option="--model-name")
    options = {"predictor": predictor, "storage_uri": storage_uri, "name": name or service_name(model),
               "namespace": namespace, "cpu": str(cpu), "memory": str(memory), "gpus": gpus, "min_replicas": min_replicas,
               "max_replicas": max_replicas, "scale_target": scale_target, "max_batch": max_batch, "image": image}
    _check(options)
    row = get_format(record.format)
    if predictor == "triton" and row.triton is None:
        triton_formats = [r.name for r in rows() if r.triton]
        raise CbamDeployError(f"artifact {chosen} ({record.format}) {row.no_triton or 'has no Triton backend'}; choose "
                              f"one of the {', '.join(triton_formats)} artifacts")
    gpus = gpus if gpus is not None else (1 if row.needs_gpu else 0)
    quantities = {"cpu": str(cpu), "memory": str(memory)}
    resources = {"requests": dict(quantities), "limits": {**quantities, **({"nvidia.com/gpu": str(gpus)} if gpus else {})}}
    readiness = {"httpGet": {"path": "/v2/health/ready", "port": HTTP_PORT}, "initialDelaySeconds": 5,
                 "periodSeconds": 5, "timeoutSeconds": 2, "failureThreshold": 3}
    metadata = {"name": options["name"], **({"namespace": namespace} if namespace else {}),
                "labels": {"app.kubernetes.io/part-of": "cbam-deploy", "cbam-deploy/model": model[:63].strip("-_.")},
                "annotations": {"cbam-deploy/artifact": chosen, "cbam-deploy/sha256": record.sha256}}
    scaling = {"minReplicas": min_replicas, "maxReplicas": max_replicas, "scaleMetric": "concurrency",
               "scaleTarget": scale_target}
    if predictor == "triton":
        spec = {**scaling, "model": {
            "modelFormat": {"name": "triton"}, "runtime": "kserve-tritonserver", "protocolVersion": "v2",
            "storageUri": storage_uri, "resources": resources, "readinessProbe": readiness}}
    else:
        args = ["serve", "/mnt/models", "--host", "0.0.0.0", "--port", str(HTTP_PORT), "--grpc-port", "9000",
                "--max-batch", str(max_batch), "--threads", str(_cores(str(cpu)))]
        if artifact:
            args += ["--artifact", chosen]
        if model_name:
            args += ["--name", model_name]
        metadata["annotations"].update({"serving.kserve.io/enable-prometheus-scraping": "true",
                                        "prometheus.kserve.io/port": str(HTTP_PORT), "prometheus.kserve.io/path": "/metrics"})
        spec = {**scaling, "containers": [{
            "name": "kserve-container", "image": image, "args": args,
            "env": [{"name": "STORAGE_URI", "value": storage_uri}],  # KServe's storage initializer fills /mnt/models
            "ports": [{"containerPort": HTTP_PORT, "protocol": "TCP"}], "resources": resources,
            "readinessProbe": readiness,
            "livenessProbe": {"httpGet": {"path": "/v2/health/live", "port": HTTP_PORT}, "initialDelaySeconds": 10,
                              "periodSeconds": 10, "timeoutSeconds": 2, "failureThreshold": 3}}]}
    return {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService", "metadata": metadata,
            "spec": {"predictor": spec}}


def write_yaml(service: dict, path: str | Path, header: list[str]) -> Path:
    """The manifest as YAML, after a comment header; written whole or not at all."""
    import yaml  # lazy: pyyaml comes with the optional serve extra

    path = Path(path)
    text = "".join(f"# {_comment(line)}\n" for line in header) + yaml.safe_dump(service, sort_keys=False,
                                                                                default_flow_style=False)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(path, text.encode())
    except OSError as exc:
        raise CbamDeployError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path


def _comment(text: str) -> str:
    """One comment line whatever ``text`` holds: control characters (a line break) written escaped."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


__all__ = ["PREDICTORS", "inference_service", "service_name", "triton_model_name", "write_yaml"]
