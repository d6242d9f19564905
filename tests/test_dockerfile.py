"""No Docker engine runs on these machines, so the Dockerfile is checked statically: the three
targets exist, each ends with the cbam-deploy entrypoint as a non-root user with a health check and
the serve port, every install line takes its packages from the project's own definitions
(pyproject extras, requirements/) or from an exact pin declared as a build argument, each GPU image
pins one coherent stack (the cuda image: the TensorRT of the Triton release it names, CUDA 12
torch, onnxruntime-gpu; never the `tensorrt` extra, which resolves to TensorRT 11 for CUDA 13), and
the build context keeps out what the images do not need. Building the images is not tested here."""

import re
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10
    import pytest

    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
TEXT = (ROOT / "Dockerfile").read_text()


def stages() -> dict[str, str]:
    parts = re.split(r"^FROM\s+", TEXT, flags=re.M)[1:]
    out = {}
    for part in parts:
        header = part.splitlines()[0]
        match = re.search(r"\bAS\s+(\S+)", header, re.I)
        assert match, f"unnamed stage: FROM {header}"
        out[match.group(1)] = "FROM " + part
    return out


def args(body: str) -> dict[str, str | None]:
    """ARG name -> default (None when the argument has no default), in a stage or before the first FROM."""
    out = {}
    for name, default in re.findall(r"^ARG\s+(\w+)(?:=(\S+))?", body, flags=re.M):
        out[name] = default.strip('"') if default else None
    return out


GLOBAL_ARGS = args(re.split(r"^FROM\s", TEXT, maxsplit=1, flags=re.M)[0])  # only these reach a FROM line


def test_targets_entrypoints_user_healthcheck_and_port():
    found = stages()
    assert set(found) == {"cpu", "cuda", "jetson"}
    for name, body in found.items():
        assert 'ENTRYPOINT ["cbam-deploy"]' in body, name
        users = re.findall(r"^USER\s+(\S+)", body, flags=re.M)
        assert users and users[-1] not in ("root", "0"), f"{name} runs as root"
        assert re.search(r"^EXPOSE\s+8000\b", body, flags=re.M), name
        health = re.search(r"^HEALTHCHECK .*?\n(?:\s+.*\n)*", body, flags=re.M)
        assert health and "/v2/health/ready" in health.group(0), name
        assert "/etc/cbam-deploy/stack.json" in body, f"{name} does not record its stack"
    assert "l4t-jetpack:r36" in found["jetson"]  # JetPack 6: TensorRT 10.3, Python 3.10


def test_install_lines_use_the_project_definitions_or_declared_exact_pins():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = set(project["optional-dependencies"])
    torch_pin = (ROOT / "requirements" / "torch-cpu.txt").read_text().strip()
    assert torch_pin == "torch==2.13.0"
    for name, body in stages().items():
        declared = {**GLOBAL_ARGS, **args(body)}
        for extra_list in re.findall(r'"\.\[([^\]]+)\]"', body):
            assert set(extra_list.split(",")) <= extras, (name, extra_list)
        assert re.search(r'pip3? install "\.\[', body), f"{name} does not install the package itself"
        for line in re.findall(r"pip3? install ([^\\&\n]+)", body):
            tokens = [t for t in line.split() if not t.startswith("-")]
            for token in tokens:
                if token.startswith('".[') or token.startswith("requirements/") or token.startswith("https://download.pytorch.org"):
                    continue
                used = re.findall(r"\$\{(\w+)\}", token)
                assert used, f"{name}: '{token}' is a package list outside pyproject/requirements"
                for arg in used:
                    assert arg in declared, f"{name}: {token} uses undeclared ARG {arg}"
                    default = declared[arg]
                    if default is not None and not default.startswith("http"):
                        assert "==" in default or re.fullmatch(r"[\d.]+", default), f"{name}: {arg}={default} is not an exact pin"
    assert "requirements/torch-cpu.txt" in stages()["cpu"]


def test_cuda_image_is_one_coherent_stack_named_after_its_triton_release():
    cuda = stages()["cuda"]
    declared = {**GLOBAL_ARGS, **args(cuda)}
    assert re.fullmatch(r"\d{2}\.\d{2}", GLOBAL_ARGS["TRITON_RELEASE"])  # global: the FROM line can use it
    assert "TRITON_RELEASE" in args(cuda)  # and redeclared, so the stage's RUN lines see it
    # TensorRT comes from the TensorRT container of that release (what Triton's QA builds its plans in)
    assert cuda.startswith("FROM nvcr.io/nvidia/tensorrt:${TRITON_RELEASE}-py3 AS cuda")
    assert "CBAM_DEPLOY_TRITON_RELEASE=${TRITON_RELEASE}" in cuda
    assert not re.search(r'"\.\[[^\]]*tensorrt', cuda), "the tensorrt extra would pull TensorRT 11 (CUDA 13) over the base"
    assert "--system-site-packages" in cuda  # the venv sees the base's TensorRT bindings
    # torch: a CUDA 12 build from PyTorch's index, not PyPI's CUDA 13 default
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu12\d", declared["TORCH_INDEX"])
    assert re.fullmatch(r"torch==[\d.]+", declared["TORCH_SPEC"])
    assert "torch.version.cuda.startswith('12.')" in cuda
    # onnxruntime and onnxruntime-gpu at one version, the GPU build left as the module
    assert '"onnxruntime==${ORT_VERSION}"' in cuda and '"onnxruntime-gpu==${ORT_VERSION}"' in cuda
    assert cuda.index("pip uninstall -y onnxruntime") < cuda.index('"onnxruntime-gpu==${ORT_VERSION}"')
    assert "CUDAExecutionProvider" in cuda


def test_jetson_image_has_what_nvidias_torch_needs_and_numpy_1():
    jetson = stages()["jetson"]
    declared = args(jetson)
    assert "jp/v61/pytorch" in declared["TORCH_WHEEL"] and "cp310" in declared["TORCH_WHEEL"]
    assert "libopenblas" in jetson
    assert "libcusparse_lt-linux-sbsa" in declared["CUSPARSELT_URL"]
    assert "PIP_CONSTRAINT=/etc/cbam-deploy/constraints.txt" in jetson and "numpy<2" in jetson
    assert jetson.index("numpy<2") < jetson.index('pip3 install ".[')
    assert "numpy.__version__.startswith('1.')" in jetson
    assert declared["ORT_WHEEL"] is None and 'test -n "${ORT_WHEEL}"' in jetson


def test_no_jetpack5_claims():
    # JetPack 5 is Python 3.8; the package needs >= 3.10: the images say so instead of claiming it
    for line in TEXT.splitlines():
        if re.search(r"JetPack 5|r35\.|L4T r35", line):
            assert "not supported" in line, line


def test_dockerignore_keeps_the_context_to_what_the_images_copy():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert patterns[0] == "*"  # everything out, then the few things the COPY lines need back in
    kept = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    copied = {src.rstrip("/") for line in re.findall(r"^COPY\s+(.+?)\s+\S+$", TEXT, flags=re.M) for src in line.split()}
    assert copied and copied <= kept, copied - kept
    assert not kept & {".venv", ".git", "bundles", "tests", ".hypothesis"}


def test_every_image_can_run_every_command():
    """serve for the server, explain (captum) for the attention maps, openvino where it installs."""
    for name, body in stages().items():
        extras = re.findall(r'pip3? install "\.\[([\w,]+)\]"', body)
        assert extras, f"stage {name} does not install the package"
        assert {"serve", "explain"} <= set(extras[0].split(",")), (name, extras)
