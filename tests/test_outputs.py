"""Models that are not classifiers: a CBAM detector (tuple outputs), a segmenter (one dense output)
and a dict-output model go through export (per-output parity), quantize, verify, bench, serve
(tritonclient receives every output) and the Triton writer (every output in config.pbtxt)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cbam_deploy.backends.onnx.runner import OnnxRuntimeRunner
from cbam_deploy.bench import bench_bundle
from cbam_deploy.bundle import read_manifest
from cbam_deploy.errors import CbamDeployError
from cbam_deploy.export_job import ExportOptions, export_bundle
from cbam_deploy.models import CodeTrust
from cbam_deploy.outputs import flatten_outputs, output_kind
from cbam_deploy.quantize import quantize_bundle
from cbam_deploy.runners.torch import TorchRunner
from cbam_deploy.verify import verify_bundle

HEADS = Path(__file__).parent / "data" / "cbam_heads.py"
EXPECTED = {
    "detector": [("output0", "dense", [4]), ("output1", "dense", [3])],
    "segmenter": [("output", "dense", [5, 32, 32])],
    "embedder": [("embedding", "logits", [16]), ("heatmap", "dense", [1, 16, 16])],
}


@pytest.fixture(scope="module", params=sorted(EXPECTED))
def bundle(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param) / "b"
    result = export_bundle(ExportOptions(model=f"{HEADS}:{request.param}", input_size=32, output=str(out)))
    return request.param, out, result


def test_flattening_follows_the_exporters_order():
    t = torch.zeros(2, 3)
    assert [n for n, _ in flatten_outputs(t)] == ["logits"]
    assert [n for n, _ in flatten_outputs(torch.zeros(2, 3, 4, 4))] == ["output"]
    assert [n for n, _ in flatten_outputs((t, [t, t]))] == ["output0", "output1_0", "output1_1"]
    assert [n for n, _ in flatten_outputs({"b": t, "a": (t, t)})] == ["b", "a_0", "a_1"]
    assert output_kind((2, 10)) == "logits" and output_kind((2, 4, 4)) == "dense" and output_kind((2,)) == "other"
    with pytest.raises(CbamDeployError, match="returned str"):
        flatten_outputs("nope")


def test_export_lists_every_output_and_checks_each(bundle):
    name, out, result = bundle
    manifest = read_manifest(out)
    got = [(o["name"], o["kind"], o["shape"][2 if name == "detector" else 1:]) for o in manifest["outputs"]]
    assert got == [(n, k, s) for n, k, s in EXPECTED[name]]
    assert all(o["shape"][0] == "batch" for o in manifest["outputs"])
    assert result["passed"] is True
    case = result["parity"]["cases"][0]
    if len(EXPECTED[name]) > 1:
        assert set(case["outputs"]) == {n for n, _, _ in EXPECTED[name]} and all(m["passed"] for m in case["outputs"].values())
    assert manifest["model"]["gates"]["kinds"] == {"channel": 1, "spatial": 1, "joint": 0}  # the CBAM inside, found


def test_onnx_answers_every_output_like_pytorch(bundle):
    name, out, _ = bundle
    from cbam_deploy.models import build_model

    module = build_model(f"{HEADS}:{name}").module
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32), dtype=np.float32)
    reference, candidate = TorchRunner(module).infer(x), OnnxRuntimeRunner(out / "model.onnx").infer(x)
    assert list(reference) == list(candidate) == [n for n, _, _ in EXPECTED[name]]
    for key in reference:
        np.testing.assert_allclose(candidate[key], reference[key], rtol=1e-4, atol=1e-5)


def test_a_broken_output_fails_parity_and_names_it(bundle):
    from cbam_deploy.parity import TOLERANCES, compare_all

    name, out, _ = bundle
    x = np.random.default_rng(1).standard_normal((2, 3, 32, 32), dtype=np.float32)
    good = OnnxRuntimeRunner(out / "model.onnx").infer(x)
    bad = {k: v.copy() for k, v in good.items()}
    last = list(bad)[-1]
    bad[last] = bad[last] * 1.5 + 0.1
    kinds = {o["name"]: o["kind"] for o in read_manifest(out)["outputs"]}
    verdict = compare_all(good, bad, TOLERANCES["fp32"], kinds)
    assert verdict["passed"] is False and "max abs error" in verdict["reason"]
    if len(good) > 1:  # the verdict names the output that departs, and only that one
        assert verdict["reason"].startswith(f"{last}:") and all(m["passed"] for k, m in verdict["outputs"].items() if k != last)


def test_quantize_verify_and_bench_handle_every_output(bundle):
    name, out, _ = bundle
    trust = CodeTrust(factory=f"{HEADS}:{name}")  # the factory named again: its code may run
    result = quantize_bundle(out, ["ort-cpu"], "synthetic", calib_size=8, check_samples=8, use_cache=False, trust=trust)
    parity = result["artifacts"][0]["parity"]
    assert parity["cosine_mean"] > 0.9
    if len(EXPECTED[name]) > 1:
        assert set(parity["outputs"]) == {n for n, _, _ in EXPECTED[name]}
    verified = verify_bundle(out, trust=trust)
    rows = {r["artifact"]: r for r in verified["results"]}
    assert verified["reference"] == "pytorch-fp32" and rows["onnx-fp32"]["passed"] is True  # seeded factory, rebuilt
    assert rows["int8-ort-cpu"]["cosine_mean"] > 0.9
    timing = bench_bundle(out, [1], iters=3, warmup=1, trust=trust)
    assert {r["runner"] for r in timing["results"]} == {"pytorch", "onnx-fp32", "int8-ort-cpu"}


def test_eval_refuses_a_model_that_is_not_a_classifier(bundle, tmp_path):
    from PIL import Image

    from cbam_deploy.evaluate import evaluate_bundle

    name, out, _ = bundle
    (tmp_path / "cls").mkdir()
    Image.new("RGB", (40, 40)).save(tmp_path / "cls" / "a.png")
    with pytest.raises(CbamDeployError, match="classifier"):
        evaluate_bundle(out, tmp_path)


def test_serve_answers_every_output_in_both_encodings(bundle):
    httpclient = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is in the test extra")
    from serving import running_server

    from cbam_deploy.serve.app import ServeConfig, create_app

    name, out, _ = bundle
    x = np.random.default_rng(2).standard_normal((2, 3, 32, 32), dtype=np.float32)
    expected = OnnxRuntimeRunner(out / "model.onnx").infer(x)
    with running_server(create_app(ServeConfig(str(out)))) as address:
        client = httpclient.InferenceServerClient(address)
        served = [m["name"] for m in client.get_model_repository_index()]
        assert len(served) == 1
        meta = client.get_model_metadata(served[0])
        assert [o["name"] for o in meta["outputs"]] == list(expected)
        for binary in (True, False):
            tensor = httpclient.InferInput("input", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x, binary_data=binary)
            wanted = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in expected]
            answer = client.infer(meta["name"], [tensor], outputs=wanted)
            for key, value in expected.items():
                np.testing.assert_allclose(answer.as_numpy(key), value, rtol=1e-5, atol=1e-5)
        if name == "segmenter":  # only some outputs asked for: only those come back
            tensor = httpclient.InferInput("input", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x)
            answer = client.infer(meta["name"], [tensor], outputs=[httpclient.InferRequestedOutput("output")])
            assert answer.as_numpy("output").shape == (2, 5, 32, 32)
        client.close()


def test_triton_config_lists_every_output(bundle, tmp_path):
    model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="tritonclient[grpc]")
    from google.protobuf import text_format

    from cbam_deploy.serve.triton import write_repository

    name, out, _ = bundle
    written = write_repository(out, tmp_path / "repo")
    config = text_format.Parse(Path(written[0]["config"]).read_text(), model_config_pb2.ModelConfig())
    manifest = read_manifest(out)
    assert [o.name for o in config.output] == [o["name"] for o in manifest["outputs"]]
    assert [list(o.dims) for o in config.output] == [[d if isinstance(d, int) else -1 for d in o["shape"][1:]]
                                                     for o in manifest["outputs"]]


def test_zoo_backbone_with_features_exports_quantizes_and_verifies(tmp_path):
    from typer.testing import CliRunner

    from cbam_deploy.cli import app

    out = tmp_path / "backbone"
    runner = CliRunner()
    result = runner.invoke(app, ["export", "--model", "resnet10_half_cbam", "--stem", "cifar", "--outputs", "features",
                                 "-o", str(out), "--int8", "--calib-data", "synthetic"])
    assert result.exit_code == 0, result.output
    manifest = read_manifest(out)
    assert [(o["name"], o["kind"], o["shape"][1]) for o in manifest["outputs"]] == [
        ("C2", "dense", 32), ("C3", "dense", 64), ("C4", "dense", 128), ("C5", "dense", 256)]
    assert manifest["model"]["outputs_mode"] == "features"
    verified = verify_bundle(out)
    rows = {r["artifact"]: r for r in verified["results"]}
    assert verified["reference"] == "pytorch-fp32" and rows["onnx-fp32"]["passed"] is True
    assert set(rows["int8-ort-cpu"]["outputs"]) == {"C2", "C3", "C4", "C5"} and rows["int8-ort-cpu"]["passed"] is True


# ------------------------------------------------------------------------------ per-output kinds set by hand

def test_output_kind_option_makes_verify_judge_an_embedding_by_cosine_and_bounds_not_top1(tmp_path):
    """An embedder's (N, 16) embedding is 2-D, so its kind is guessed as logits and judged on top-1;
    ``--output-kind embedding=dense`` records it as dense, and export, quantize and verify then judge
    it by cosine and element-wise bounds only."""
    import json

    from typer.testing import CliRunner

    from cbam_deploy.bundle import Bundle
    from cbam_deploy.cli import app

    guessed = tmp_path / "guessed"
    export_bundle(ExportOptions(model=f"{HEADS}:embedder", input_size=32, output=str(guessed), parity=False))
    assert Bundle.open(guessed).output_kinds == {"embedding": "logits", "heatmap": "dense"}
    trust = CodeTrust(factory=f"{HEADS}:embedder")
    row = {r["artifact"]: r for r in verify_bundle(guessed, trust=trust)["results"]}["onnx-fp32"]
    assert all("top1_agreement" in case["outputs"]["embedding"] for case in row["cases"])  # judged as a classifier

    out = tmp_path / "set"
    result = CliRunner().invoke(app, ["export", "-m", f"{HEADS}:embedder", "--input-size", "32", "-o", str(out),
                                      "--output-kind", "embedding=dense", "--json"])
    assert result.exit_code == 0, result.output
    bundle = Bundle.open(out)
    assert bundle.output_kinds == {"embedding": "dense", "heatmap": "dense"} and bundle.classification_output is None
    export_case = json.loads(result.stdout)["parity"]["cases"][0]["outputs"]["embedding"]
    assert export_case["kind"] == "dense" and "top1_agreement" not in export_case

    quantized = quantize_bundle(out, ["ort-cpu"], "synthetic", calib_size=8, check_samples=8, use_cache=False,
                                trust=trust)
    int8_embedding = quantized["artifacts"][0]["parity"]["outputs"]["embedding"]
    assert int8_embedding["kind"] == "dense" and "top1_agreement" not in int8_embedding

    verified = verify_bundle(out, trust=trust)
    rows = {r["artifact"]: r for r in verified["results"]}
    fp32 = rows["onnx-fp32"]
    assert verified["reference"] == "pytorch-fp32" and fp32["passed"] is True and "top1_agreement" not in fp32
    for case in fp32["cases"]:
        embedding = case["outputs"]["embedding"]
        assert embedding["kind"] == "dense" and "top1_agreement" not in embedding
        assert embedding["cosine_min"] >= 0.99999 and embedding["max_abs_err"] <= embedding["bound"]
    int8 = rows["int8-ort-cpu"]["outputs"]["embedding"]
    assert int8["kind"] == "dense" and "top1_agreement" not in int8 and int8["cosine_mean"] > 0.9


def test_a_factory_model_declares_its_output_kinds_and_the_option_overrides_them(tmp_path):
    from cbam_deploy.bundle import Bundle

    export_bundle(ExportOptions(model=f"{HEADS}:embedder_declared", input_size=32, output=str(tmp_path / "a"),
                                parity=False))
    assert Bundle.open(tmp_path / "a").output_kinds == {"embedding": "dense", "heatmap": "dense"}
    export_bundle(ExportOptions(model=f"{HEADS}:embedder_declared", input_size=32, output=str(tmp_path / "b"),
                                parity=False, output_kinds=["embedding=other", "heatmap=other"]))
    assert Bundle.open(tmp_path / "b").output_kinds == {"embedding": "other", "heatmap": "other"}


def test_bad_output_kinds_are_one_error_naming_the_output_or_kind(tmp_path):
    from cbam_deploy.outputs import parse_output_kinds

    with pytest.raises(CbamDeployError, match=r"--output-kind takes NAME=KIND \(KIND one of logits, dense, detections, other\), "
                                              r"got 'embedding'"):
        ExportOptions(model=f"{HEADS}:embedder", output_kinds=["embedding"])
    with pytest.raises(CbamDeployError, match=r"--output-kind 'embedding=boxes': unknown kind 'boxes'; the kinds are "
                                              r"logits, dense, detections, other"):
        ExportOptions(model=f"{HEADS}:embedder", output_kinds={"embedding": "boxes"})
    with pytest.raises(CbamDeployError, match=r"output 'a' is given two kinds \(dense, logits\)"):
        parse_output_kinds(["a=dense", "a=logits"])
    assert parse_output_kinds([" a = dense ", "b=other", "a=dense"]) == {"a": "dense", "b": "other"}

    out = tmp_path / "out"
    with pytest.raises(CbamDeployError, match=r"^--output-kind: no output 'embeding'; the model's outputs are "
                                              r"embedding, heatmap$"):
        export_bundle(ExportOptions(model=f"{HEADS}:embedder", input_size=32, output=str(out),
                                    output_kinds=["embeding=dense"]))
    assert not out.exists()  # refused before anything was written

    factory = tmp_path / "declares.py"
    factory.write_text("from torch import nn\n\n"
                       "class M(nn.Module):\n"
                       "    output_kinds = {'emb': 'dense'}\n\n"
                       "    def __init__(self):\n"
                       "        super().__init__()\n"
                       "        self.conv = nn.Conv2d(3, 4, 1)\n\n"
                       "    def forward(self, x):\n"
                       "        return {'embedding': self.conv(x).mean((2, 3))}\n\n"
                       "def make():\n"
                       "    return M()\n\n"
                       "def vector():\n"
                       "    model = M()\n"
                       "    model.output_kinds = {'embedding': 'vector'}\n"
                       "    return model\n")
    with pytest.raises(CbamDeployError, match=r"output_kinds of .*declares.py:make: no output 'emb'; the model's "
                                              r"outputs are embedding$"):
        export_bundle(ExportOptions(model=f"{factory}:make", input_size=32, output=str(out)))
    with pytest.raises(CbamDeployError, match=r"output_kinds of .*declares.py:vector 'embedding=vector': unknown kind"):
        export_bundle(ExportOptions(model=f"{factory}:vector", input_size=32, output=str(out)))
    # the option overrides what the model declares, so a wrong declaration can be set right from outside
    export_bundle(ExportOptions(model=f"{factory}:vector", input_size=32, output=str(out), parity=False,
                                output_kinds={"embedding": "dense"}))
    assert read_manifest(out)["outputs"][0]["kind"] == "dense"
