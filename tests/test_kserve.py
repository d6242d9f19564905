"""cbam-deploy kserve: the InferenceService manifests (Triton runtime over the Triton repository this
tool writes; this server as a custom predictor) validate against the InferenceService schema
derived from the KServe SDK's models (tests/data/make_kserve_schema.py: every field, its type,
required fields, no unknown field, as kubectl --validate=strict), carry resources, replicas and a
readiness probe, and their command line is one `cbam-deploy serve` accepts."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is in the test extra")
yaml = pytest.importorskip("yaml", reason="pyyaml is in the serve extra")

import typer  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from cbam_deploy.cli import app as cli_app  # noqa: E402

SCHEMA = Path(__file__).parent / "data" / "kserve_inferenceservice_v1beta1.schema.json"
MODEL = "resnet10_half_cbam"
cli = CliRunner()


@pytest.fixture(scope="module")
def bundle(digits_bundle):
    return digits_bundle


@pytest.fixture(scope="module")
def validator():
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def errors(validator, document) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]


def kserve(*args) -> tuple[int, str]:
    result = cli.invoke(cli_app, ["kserve", *map(str, args)])
    return result.exit_code, result.output + (result.stderr or "")


def test_triton_manifest_validates_and_its_repository_is_written(bundle, tmp_path, validator):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    out, repo = tmp_path / "isvc.yaml", tmp_path / "model_repository"
    code, output = kserve(bundle, "-o", out, "--storage-uri", "s3://models/digits", "--repository", repo,
                          "--min-replicas", 2, "--max-replicas", 6, "--cpu", "4", "--memory", "2Gi", "--namespace", "ml")
    assert code == 0, output
    text = out.read_text()
    assert text.startswith("# KServe InferenceService") and "kubectl apply -f isvc.yaml" in text
    service = yaml.safe_load(text)
    assert errors(validator, service) == []
    assert service["metadata"] == {**service["metadata"], "name": "resnet10-half-cbam", "namespace": "ml"}
    predictor = service["spec"]["predictor"]
    assert (predictor["minReplicas"], predictor["maxReplicas"], predictor["scaleMetric"]) == (2, 6, "concurrency")
    model = predictor["model"]
    assert model["modelFormat"] == {"name": "triton"} and model["runtime"] == "kserve-tritonserver"
    assert model["storageUri"] == "s3://models/digits" and model["protocolVersion"] == "v2"
    assert model["resources"] == {"requests": {"cpu": "4", "memory": "2Gi"}, "limits": {"cpu": "4", "memory": "2Gi"}}
    assert model["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": 8080}
    config = model_config_pb2.ModelConfig()
    text_format.Parse((repo / MODEL / "config.pbtxt").read_text(), config)  # what Triton will load from storageUri
    assert config.name == MODEL and (repo / MODEL / "1" / "model.onnx").is_file()


def test_custom_predictor_manifest_validates_and_runs_cbam_deploy_serve(bundle, tmp_path, validator):
    out = tmp_path / "custom.yaml"
    code, output = kserve(bundle, "-o", out, "--predictor", "cbam-deploy", "--image", "registry.example/cbam-deploy:cpu",
                          "--storage-uri", "gs://bucket/bundles/digits", "--cpu", "500m", "--max-batch", 16,
                          "--min-replicas", 0, "--gpus", 1)
    assert code == 0, output
    service = yaml.safe_load(out.read_text())
    assert errors(validator, service) == []
    predictor = service["spec"]["predictor"]
    assert predictor["minReplicas"] == 0 and predictor["maxReplicas"] == 4
    container = predictor["containers"][0]
    assert container["name"] == "kserve-container" and container["image"] == "registry.example/cbam-deploy:cpu"
    assert {"name": "STORAGE_URI", "value": "gs://bucket/bundles/digits"} in container["env"]
    assert container["resources"]["limits"] == {"cpu": "500m", "memory": "4Gi", "nvidia.com/gpu": "1"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": 8080}
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert container["ports"] == [{"containerPort": 8080, "protocol": "TCP"}]
    args = container["args"]
    assert args[:2] == ["serve", "/mnt/models"] and args[args.index("--port") + 1] == "8080"
    assert args[args.index("--host") + 1] == "0.0.0.0" and args[args.index("--max-batch") + 1] == "16"
    serve = typer.main.get_command(cli_app).get_command(None, "serve")
    context = serve.make_context("serve", list(args[1:]))  # the image's entrypoint is cbam-deploy: parses as-is
    assert context.params["port"] == 8080 and context.params["bundles"] == ["/mnt/models"] and context.params["threads"] == 1
    assert service["metadata"]["annotations"]["serving.kserve.io/enable-prometheus-scraping"] == "true"


def test_the_schema_is_strict(bundle, tmp_path, validator):
    out = tmp_path / "isvc.yaml"
    assert kserve(bundle, "-o", out, "--storage-uri", "pvc://models/digits")[0] == 0
    good = yaml.safe_load(out.read_text())
    predictor = good["spec"]["predictor"]
    cases = {
        "misspelt field": {**good, "spec": {"predictor": {**predictor, "minReplica": 1}}},
        "replicas as text": {**good, "spec": {"predictor": {**predictor, "maxReplicas": "4"}}},
        "probe in the wrong place": {**good, "spec": {"predictor": {**predictor, "readinessProbe": {}}}},
        "no modelFormat": {**good, "spec": {"predictor": {**predictor, "model": {
            k: v for k, v in predictor["model"].items() if k != "modelFormat"}}}},
        "wrong kind": {**good, "kind": "Deployment"},
        "a container without a name": {**good, "spec": {"predictor": {"containers": [{"image": "x"}]}}},
    }
    for case, document in cases.items():
        assert errors(validator, document), f"{case} passed the schema"


@pytest.mark.parametrize("args,needle", [
    (["--predictor", "cbam-deploy"], "needs --image"),
    (["--predictor", "onnx"], "--predictor must be one of"),
    (["--min-replicas", "5", "--max-replicas", "2"], "min <= max"),
    (["--cpu", "two"], "--cpu must be"),
    (["--memory", "-1Gi"], "--memory must be"),
    (["--name", "Digits_Model"], "not an InferenceService name"),
    (["--artifact", "int8-nope"], "int8-nope"),
])
def test_bad_options_are_one_line_with_exit_2(bundle, tmp_path, args, needle):
    out = tmp_path / "isvc.yaml"
    result = cli.invoke(cli_app, ["kserve", str(bundle), "-o", str(out), "--storage-uri", "s3://m/d", *args])
    assert result.exit_code == 2, result.output
    assert needle in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()
    bad_uri = cli.invoke(cli_app, ["kserve", str(bundle), "-o", str(out), "--storage-uri", "models/digits"])
    assert bad_uri.exit_code == 2 and "--storage-uri" in bad_uri.stderr
