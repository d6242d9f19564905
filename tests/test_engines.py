"""OpenVINO IR artifacts, verify (with first-divergence location), bench, and the one-command export."""

import json
import sys
from pathlib import Path

import onnx
import pytest
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cbam_deploy.bench import bench_bundle  # noqa: E402
from cbam_deploy.build import build_artifacts  # noqa: E402
from cbam_deploy.bundle import read_manifest  # noqa: E402
from cbam_deploy.cli import app  # noqa: E402
from cbam_deploy.errors import CbamDeployError  # noqa: E402
from cbam_deploy.export_job import ExportOptions, export_bundle  # noqa: E402
from cbam_deploy.verify import verify_bundle  # noqa: E402
from reference.digits import CHECKPOINT, write_image_folder  # noqa: E402

pytest.importorskip("openvino", reason="OpenVINO is the 'openvino' extra")


@pytest.fixture
def bundle(tmp_path):
    """The trained reference model (real weights, so every check means something)."""
    export_bundle(ExportOptions(model="resnet10_half_cbam", stem="cifar", weights=str(CHECKPOINT), output=str(tmp_path / "b")))
    return tmp_path / "b"


def test_openvino_ir_artifacts_record_their_real_precision(bundle):
    outcomes = build_artifacts(bundle, "openvino", "fp32,fp16")
    assert [o.name for o in outcomes] == ["openvino-fp32", "openvino-fp16"]
    manifest = read_manifest(bundle)
    for name in ("openvino-fp32", "openvino-fp16"):
        artifact = next(a for a in manifest["artifacts"] if a["name"] == name)
        assert (bundle / artifact["path"]).is_file() and (bundle / artifact["path"]).with_suffix(".bin").is_file()
    result = verify_bundle(bundle)
    rows = {r["artifact"]: r for r in result["results"]}
    assert result["passed"], [(r["artifact"], r.get("reason")) for r in result["results"]]
    assert rows["openvino-fp32"]["candidate"]["inference_precision"] == "float32"
    # what OpenVINO really computes in is recorded, whatever was asked for
    assert rows["openvino-fp16"]["candidate"]["inference_precision"] in ("float16", "float32", "bfloat16")
    # onnxruntime's CPU provider computes an fp32 graph in fp32, and says so
    assert (rows["onnx-fp32"]["precision"], rows["onnx-fp32"]["computed_in"], rows["onnx-fp32"]["judged_by"]) == \
        ("fp32", "fp32", "fp32")
    assert "verify" in next(a for a in read_manifest(bundle)["artifacts"] if a["name"] == "openvino-fp32")


def _reported(compiled) -> str:
    """OpenVINO's INFERENCE_PRECISION_HINT of a compiled model, as verify names precisions."""
    reported = str(compiled.get_property("INFERENCE_PRECISION_HINT"))
    return next(p for name, p in (("bfloat16", "bf16"), ("float16", "fp16"), ("float32", "fp32"), ("f16", "fp16"),
                                  ("bf16", "bf16"), ("f32", "fp32")) if name in reported)


def test_verify_judges_an_fp16_ir_by_its_weights_and_by_what_openvino_ran(bundle):
    """An fp16 IR stores fp16 weights and, compiled with the f16 hint, runs in what the CPU has: fp16 with
    fp16 arithmetic, bf16 with AVX-512 BF16 but no fp16 arithmetic, f32 with neither (AVX2, AVX-512
    without BF16). verify judges it by the looser of the two: the fp16 bounds where it ran in f32 or
    fp16, the bf16 bounds where it ran in bf16. What ran is asked of OpenVINO here independently."""
    import openvino as ov

    from cbam_deploy.attention import THRESHOLDS
    from cbam_deploy.parity import TOLERANCES

    build_artifacts(bundle, "openvino", "fp16")
    xml = bundle / next(a["path"] for a in read_manifest(bundle)["artifacts"] if a["name"] == "openvino-fp16")
    ran = _reported(ov.Core().compile_model(str(xml), "CPU", {"INFERENCE_PRECISION_HINT": "f16"}))
    judged = "bf16" if ran == "bf16" else "fp16"
    result = verify_bundle(bundle, artifacts=["openvino-fp16"])
    row = result["results"][0]
    assert row["passed"], row.get("reason")
    assert (row["precision"], row["computed_in"], row["judged_by"]) == ("fp16", ran, judged)
    assert row["tolerance"] == {k: getattr(TOLERANCES[judged], k) for k in row["tolerance"]}
    thresholds = row["attention"]["thresholds"]  # the attention parity is judged by the same precision
    assert (thresholds["min_correlation"], thresholds["min_top_iou"]) == THRESHOLDS[judged]
    cli = CliRunner().invoke(app, ["verify", str(bundle), "--artifact", "openvino-fp16"])
    assert cli.exit_code == 0, cli.output
    text = " ".join(cli.output.split())
    assert "ran in" in text and f"openvino-fp16 │ fp16 │ {ran} │" in text  # the table shows both
    assert (f"a fp16 artifact that ran in {ran} (the runtime's own report), judged with the {judged} bounds" in text) \
        == (ran != "fp16")


def test_an_fp16_ir_computed_in_bf16_is_judged_by_the_bf16_bounds(bundle):
    """The bf16 path on any x86 CPU where oneDNN has AVX-512 (bf16 is emulated without AVX-512 BF16): the
    same fp16 IR compiled with the bf16 hint. Where OpenVINO cannot (AVX2 only, or ONEDNN_MAX_CPU_ISA=AVX2),
    it compiles to f32 and the fp16 bounds hold. The fp32 bounds alone would fail it either way: its
    weights are fp16."""
    from cbam_deploy.backends.openvino.runner import OpenVINORunner
    from cbam_deploy.bundle import Bundle
    from cbam_deploy.loaders import reference_runner
    from cbam_deploy.parity import bound_precision, plan_cases, run_parity

    build_artifacts(bundle, "openvino", "fp16")
    opened = Bundle.open(bundle)
    runner = OpenVINORunner(opened.path_of("openvino-fp16"), precision="fp16", inference_precision="bf16")
    computed = runner.computed_precision()
    assert computed == _reported(runner.compiled)
    assert computed in ("bf16", "fp32")
    judged = bound_precision("fp16", computed)
    assert judged == ("bf16" if computed == "bf16" else "fp16")
    reference = reference_runner(opened)[0]
    cases = plan_cases(opened.input.side, None, False, 8)
    result = run_parity(reference, runner, cases, judged)
    assert result["passed"], [c.get("reason") for c in result["cases"]]
    assert run_parity(reference, runner, cases, "fp32")["passed"] is False


@pytest.mark.parametrize("stored,computed,judged", [
    ("fp16", "fp32", "fp16"), ("fp16", "bf16", "bf16"), ("fp16", "fp16", "fp16"), ("fp16", None, "fp16"),
    ("fp32", "bf16", "bf16"), ("fp32", "fp32", "fp32"), ("fp32", None, "fp32"), ("int8", "bf16", "int8"),
    ("int8", None, "int8"), ("bf16", "fp16", "bf16")])
def test_the_bound_is_the_looser_of_what_is_stored_and_what_ran(stored, computed, judged):
    from cbam_deploy.parity import bound_precision

    assert bound_precision(stored, computed) == judged


def test_verify_locates_the_first_layer_that_departs(bundle):
    path = bundle / "model.onnx"
    proto = onnx.load(str(path))
    target = next(i for i in proto.graph.initializer
                  if list(i.dims)[:2] == [1, 2] and len(i.dims) == 4 and
                  any(i.name in n.input and n.name.startswith("/layer3/") for n in proto.graph.node))
    weights = onnx.numpy_helper.to_array(target) * -3.0
    target.CopyFrom(onnx.numpy_helper.from_array(weights, target.name))
    onnx.save(proto, str(path))
    manifest = read_manifest(bundle)
    from cbam_deploy.fsutil import sha256_file
    manifest["artifacts"][0]["sha256"] = sha256_file(path)  # a wrong model, not a torn file
    from helpers import write_manifest
    write_manifest(bundle, manifest)
    result = verify_bundle(bundle)
    row = result["results"][0]
    assert result["passed"] is False and row["passed"] is False
    assert row["first_divergence"]["module"].startswith("layer3.0.cbam.SpatialGate")
    cli = CliRunner().invoke(app, ["verify", str(bundle)])
    assert cli.exit_code == 3 and "first departs at module" in cli.stdout


def test_verify_int8_uses_images(bundle, tmp_path):
    train = write_image_folder(tmp_path / "train", "train")
    build_artifacts(bundle, "onnx,openvino", "int8", calib_data=str(train), calib_size=32)
    result = verify_bundle(bundle, artifacts=["int8-ort-cpu", "int8-openvino"])
    for row in result["results"]:
        assert row["passed"] and row["inputs"].startswith("images") and row["top1_agreement"] >= 0.9


def test_bench_interleaves_pytorch_and_writes_reports(bundle, tmp_path):
    build_artifacts(bundle, "openvino", "fp32")
    result = bench_bundle(bundle, [1, 4], iters=3, warmup=1)
    runners = {(r["runner"], r["batch"]) for r in result["results"]}
    assert runners == {(n, b) for n in ("pytorch", "onnx-fp32", "openvino-fp32") for b in (1, 4)}
    for row in result["results"]:
        assert row["p50_ms"] <= row["p99_ms"] <= row["max_ms"] and row["throughput_ips"] > 0
        assert row["ratio_to_pytorch"] > 0
    assert result["machine"]["cpu_cores"] >= 1
    md, png = tmp_path / "r.md", tmp_path / "r.png"
    cli = CliRunner().invoke(app, ["bench", str(bundle), "--batch", "1,2", "--iters", "2", "--markdown", str(md),
                                   "--plot", str(png), "--json"])
    assert cli.exit_code == 0, cli.output
    assert json.loads(cli.stdout)["results"] and "| runner |" in md.read_text()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_bad_options():
    runner = CliRunner()
    assert "--batch takes" in runner.invoke(app, ["bench", "--model", "resnet18", "--batch", "a"]).stderr
    assert "one of them" in runner.invoke(app, ["bench"]).stderr


def test_one_command_builds_what_it_can_and_lists_the_rest(tmp_path):
    train = write_image_folder(tmp_path / "train", "train")
    result = CliRunner().invoke(app, [
        "export", "-m", "resnet10_half_cbam", "--stem", "cifar", "-w", str(CHECKPOINT), "-o", str(tmp_path / "b"),
        "--format", "onnx,openvino,tensorrt", "--precision", "fp32,fp16,int8", "--calib-data", str(train), "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["summary"]["rows"]
    built = {(r["format"], r["precision"]) for r in rows if r.get("artifact") and not r.get("skipped")}
    skipped = {(r["format"], r["precision"]): r["skipped"] for r in rows if r.get("skipped")}
    assert {("onnx", "fp32"), ("onnx", "int8"), ("openvino", "fp32"), ("openvino", "fp16"), ("openvino", "int8")} <= built
    assert ("onnx", "fp16") in skipped
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        assert all(("tensorrt", p) in skipped for p in ("fp32", "fp16", "int8"))
        assert "TensorRT is not installed" in skipped[("tensorrt", "fp32")]
    for row in rows:
        if row.get("artifact") and row["format"] != "pytorch":
            assert row["passed"] is True and row["latency_ms"] > 0 and row["speedup"] > 0


def test_bad_format_and_precision(tmp_path):
    with pytest.raises(CbamDeployError, match="--format"):
        build_artifacts(tmp_path, "coreml", "fp32")


def test_artifacts_whose_backend_is_missing_are_skipped_not_fatal(bundle, tmp_path):
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here; this test covers machines without it")
    except ImportError:
        pass
    from helpers import write_manifest
    from cbam_deploy.manifest import upsert_artifact
    from cbam_deploy.evaluate import evaluate_bundle
    from cbam_deploy.fsutil import sha256_file

    engine = bundle / "model.tensorrt-fp16.engine"
    engine.write_bytes(b"an engine built elsewhere")
    manifest = read_manifest(bundle)
    upsert_artifact(manifest, {"name": "tensorrt-fp16", "path": engine.name, "format": "tensorrt", "precision": "fp16",
                               "sha256": sha256_file(engine)})
    write_manifest(bundle, manifest)
    verified = {r["artifact"]: r for r in verify_bundle(bundle)["results"]}
    assert verified["tensorrt-fp16"]["passed"] is None and "TensorRT is not installed" in verified["tensorrt-fp16"]["skipped"]
    assert verified["onnx-fp32"]["passed"] is True
    test = write_image_folder(tmp_path / "test", "test")
    rows = {r["artifact"]: r for r in evaluate_bundle(bundle, test, limit=20)["results"]}
    assert "TensorRT is not installed" in rows["tensorrt-fp16"]["skipped"] and rows["onnx-fp32"]["top1"] > 0.9
    timing = bench_bundle(bundle, [1], iters=2, warmup=1)
    assert [s["artifact"] for s in timing["skipped"]] == ["tensorrt-fp16"]


def test_the_one_command_summary_says_when_the_machine_was_busy(bundle, capsys):
    """Export's summary carries bench's load verdict: with other processes keeping every core busy
    while it times, the summary says the timing is unstable and why, and marks the speed-ups."""
    import os
    import subprocess

    from cbam_deploy.cli import render
    from cbam_deploy.pipeline import build_verify_bench

    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 1)]
    try:
        summary = build_verify_bench(bundle, "openvino", "fp32", bench_iters=10)
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()
    timing = summary["timing"]
    assert timing["stable"] is False and timing["busy"] is True and timing["other_cpu_fraction"] > 0.2
    assert timing["reasons"][0].startswith("other processes used")
    timed = [r for r in summary["rows"] if r.get("latency_ms")]
    assert timed and all(isinstance(r["stable"], bool) for r in timed) and not all(r["stable"] for r in timed)
    render.summary(summary)
    printed = " ".join(capsys.readouterr().out.split())
    assert "unstable timing: the machine was busy" in printed and "other processes used" in printed
    assert "x ?" in printed  # the disturbed speed-ups are marked
