# Two entry points, each doing its whole set-up from a fresh clone:
#   make demo   create .venv, install (torch 2.13.0 CPU first), export resnet50_cbam, print parity
#   make test   create .venv, install with the test extra, check the import floors, run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.cbam-deploy-installed

.PHONY: install demo test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch is pinned and installed before anything that depends on it, so pip never resolves an
# unpinned torch (which would pull a multi-GB CUDA build).
$(STAMP): $(BIN)/python pyproject.toml requirements/torch-cpu.txt requirements/edge.txt
	$(BIN)/python -m pip install --quiet -r requirements/torch-cpu.txt
	$(BIN)/python -m pip install --quiet -e ".[test,openvino,serve,explain,peers]"
	# the edge runtimes, pinned, without their heavy dependency sets (see requirements/edge.txt)
	$(BIN)/python -m pip install --quiet --no-deps -r requirements/edge.txt
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/cbam-deploy export --model resnet50_cbam

# lint-imports: every module imports only the floors below it (.importlinter)
test: install
	$(BIN)/lint-imports && $(BIN)/python -m pytest

bench: install
	$(BIN)/python benchmarks/onnx_vs_torch.py

clean:
	rm -rf $(VENV) bundles .pytest_cache
