# Two entry points, each doing its whole set-up from a fresh clone:
#   make demo   create .venv, install (torch 2.13.0 and torchvision 0.28.0 first), export resnet50_cbam, print parity
#   make test   create .venv, install with the test extra, check the import floors, run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.cbam-deploy-installed
# torch and torchvision as one release pair (their native ops load only beside the torch they were built for);
# make TORCH_REQUIREMENTS=requirements/torch-cpu-pair.txt install takes the CPU pair from PyTorch's index
TORCH_REQUIREMENTS ?= requirements/torch.txt

.PHONY: install demo test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch (with torchvision) is pinned and installed before anything that depends on it, so pip never
# resolves another torch for a package that asks for one.
$(STAMP): $(BIN)/python pyproject.toml $(TORCH_REQUIREMENTS) requirements/edge.txt
	$(BIN)/python -m pip install --quiet -r $(TORCH_REQUIREMENTS)
	$(BIN)/python -m pip install --quiet -e ".[test,openvino,serve,explain,peers,ultralytics,timm]"
	# the edge runtimes, pinned, without their heavy dependency sets (see requirements/edge.txt)
	$(BIN)/python -m pip install --quiet --no-deps -r requirements/edge.txt
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/cbam-deploy export --model resnet50_cbam

# lint-imports: every module imports only the floors below it (.importlinter); the suite in two worker
# processes (pytest-xdist), whole files per worker so that a file's shared exports are made once
TEST_WORKERS ?= 2
test: install
	$(BIN)/lint-imports && $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

bench: install
	$(BIN)/python benchmarks/onnx_vs_torch.py

clean:
	rm -rf $(VENV) bundles .pytest_cache
