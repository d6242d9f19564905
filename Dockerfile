# syntax=docker/dockerfile:1
# cbam-deploy images. Three targets, one package definition (pyproject.toml + requirements/):
#   docker build --target cpu    -t cbam-deploy:cpu .      # x86-64 and arm64: onnxruntime, OpenVINO
#   docker build --target cuda   -t cbam-deploy:cuda .     # NVIDIA GPU: onnxruntime-gpu, TensorRT
#   docker build --target jetson -t cbam-deploy:jetson .   # Jetson, JetPack 6 (L4T r36, TensorRT 10.3)
# Every target's entrypoint is the CLI: docker run --rm cbam-deploy:cpu models

# ---------------------------------------------------------------- cpu: x86-64 and arm64
FROM python:3.11-slim AS cpu
ENV PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /opt/cbam-deploy
COPY pyproject.toml README.md ./
COPY requirements/ requirements/
COPY cbam_deploy/ cbam_deploy/
# torch first, pinned (requirements/torch-cpu.txt), from PyTorch's CPU index so that x86-64 does not
# pull the multi-GB CUDA build; arm64 wheels on that index are CPU builds too.
RUN pip install -r requirements/torch-cpu.txt --extra-index-url https://download.pytorch.org/whl/cpu \
 && pip install ".[openvino,serve]"
WORKDIR /work
ENTRYPOINT ["cbam-deploy"]
CMD ["--help"]

# ---------------------------------------------------------------- cuda: x86-64 with an NVIDIA GPU
FROM nvidia/cuda:12.6.3-cudnn-runtime-ubuntu22.04 AS cuda
ENV PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1 DEBIAN_FRONTEND=noninteractive
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-pip \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/cbam-deploy
COPY pyproject.toml README.md ./
COPY requirements/ requirements/
COPY cbam_deploy/ cbam_deploy/
# torch pinned as on every target (the default PyPI build carries CUDA); the tensorrt extra brings
# TensorRT; onnxruntime is swapped for onnxruntime-gpu at the same version (one onnxruntime module).
RUN pip3 install -r requirements/torch-cpu.txt \
 && pip3 install ".[tensorrt,serve]" \
 && ORT_VERSION=$(python3 -c "import onnxruntime; print(onnxruntime.__version__)") \
 && pip3 uninstall -y onnxruntime && pip3 install "onnxruntime-gpu==${ORT_VERSION}"
WORKDIR /work
ENTRYPOINT ["cbam-deploy"]
CMD ["--help"]

# ---------------------------------------------------------------- jetson: JetPack 6 (Python 3.10)
# The base carries CUDA 12.6 and TensorRT 10.3 with its Python bindings (python3-libnvinfer).
# torch and onnxruntime-gpu come from NVIDIA's Jetson wheels, given as build arguments:
#   docker build --target jetson --build-arg TORCH_WHEEL=<url or path> --build-arg ORT_WHEEL=<url or path> .
FROM nvcr.io/nvidia/l4t-jetpack:r36.4.0 AS jetson
ARG TORCH_WHEEL=https://developer.download.nvidia.com/compute/redist/jp/v61/pytorch/torch-2.5.0a0+872d972e41.nv24.08.17622132-cp310-cp310-linux_aarch64.whl
ARG ORT_WHEEL
ENV PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1 DEBIAN_FRONTEND=noninteractive
RUN apt-get update && apt-get install -y --no-install-recommends python3-pip python3-libnvinfer \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/cbam-deploy
COPY pyproject.toml README.md ./
COPY requirements/ requirements/
COPY cbam_deploy/ cbam_deploy/
# NVIDIA's torch first (it satisfies the package's torch range), then the package itself, then the
# Jetson onnxruntime-gpu wheel in place of PyPI's CPU onnxruntime. TensorRT stays the system one.
RUN test -n "${ORT_WHEEL}" || (echo "pass --build-arg ORT_WHEEL=<onnxruntime-gpu wheel for JetPack 6>" && exit 1) \
 && pip3 install "${TORCH_WHEEL}" \
 && pip3 install ".[serve]" \
 && pip3 uninstall -y onnxruntime && pip3 install "${ORT_WHEEL}"
WORKDIR /work
ENTRYPOINT ["cbam-deploy"]
CMD ["--help"]
