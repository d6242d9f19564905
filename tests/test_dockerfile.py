"""No Docker engine runs on these machines, so the Dockerfile is checked statically: the three
targets exist, each ends with the cbam-deploy entrypoint, and every install line takes its packages
from the project's own definitions (pyproject extras, requirements/), not from a second list."""

import re
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10
    import pytest

    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]


def stages() -> dict[str, str]:
    text = (ROOT / "Dockerfile").read_text()
    parts = re.split(r"^FROM\s+", text, flags=re.M)[1:]
    out = {}
    for part in parts:
        header = part.splitlines()[0]
        match = re.search(r"\bAS\s+(\S+)", header, re.I)
        assert match, f"unnamed stage: FROM {header}"
        out[match.group(1)] = "FROM " + part
    return out


def test_targets_and_entrypoints():
    found = stages()
    assert set(found) == {"cpu", "cuda", "jetson"}
    for name, body in found.items():
        assert 'ENTRYPOINT ["cbam-deploy"]' in body, name
    assert "l4t-jetpack:r36" in found["jetson"]  # JetPack 6: TensorRT 10.3, Python 3.10
    assert "nvidia/cuda" in found["cuda"]


def test_install_lines_use_the_project_definitions():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = set(project["optional-dependencies"])
    torch_pin = (ROOT / "requirements" / "torch-cpu.txt").read_text().strip()
    assert torch_pin == "torch==2.13.0"
    for name, body in stages().items():
        for extra_list in re.findall(r'"\.\[([^\]]+)\]"', body):
            assert set(extra_list.split(",")) <= extras, (name, extra_list)
        assert re.search(r'pip3? install "\.\[', body), f"{name} does not install the package itself"
        for line in re.findall(r"pip3? install ([^\\&\n]+)", body):
            tokens = [t for t in line.split() if not t.startswith("-")]
            for token in tokens:
                allowed = (token.startswith('".[') or token.startswith("requirements/") or token.startswith('"${')
                           or token.startswith('"onnxruntime-gpu==${') or token.startswith("https://download.pytorch.org"))
                assert allowed, f"{name}: '{token}' is a package list outside pyproject/requirements"
    assert "requirements/torch-cpu.txt" in stages()["cpu"] and "requirements/torch-cpu.txt" in stages()["cuda"]
