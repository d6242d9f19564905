# syntax=docker/dockerfile:1
# cbam-deploy images. Three targets, one package definition (pyproject.toml + requirements/):
#   docker build --target cpu    -t cbam-deploy:cpu .      # x86-64 and arm64: onnxruntime, OpenVINO
#   docker build --target cuda   -t cbam-deploy:cuda .     # x86-64 NVIDIA GPU: TensorRT + CUDA 12 stack of Triton 25.01
#   docker build --target jetson -t cbam-deploy:jetson .   # Jetson, JetPack 6.1/6.2 (L4T r36.4, TensorRT 10.3)
# Every target's entrypoint is the CLI (docker run --rm cbam-deploy:cpu models), runs as the non-root
# user "cbam" (uid 1000 where the base has no user 1000 yet), and records its stack in /etc/cbam-deploy/stack.json (read back by
# cbam_deploy.backends.tensorrt.exporter.image_stack). For `serve`, publish the port and bind all interfaces:
#   docker run --rm -p 8000:8000 -v $PWD:/work cbam-deploy:cpu serve bundles/m --host 0.0.0.0
# None of these images has been built yet (tests/test_dockerfile.py checks this file as text); the pins
# below are chosen from the sources named beside each, and are what to check first if a build fails.

# The Triton release the cuda image's TensorRT plans are for (an ARG before the first FROM is the
# only kind a later FROM line can use).
ARG TRITON_RELEASE=25.01

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
 && pip install ".[openvino,serve,explain]"
RUN mkdir -p /etc/cbam-deploy && python -c "import json, torch, onnxruntime, openvino; json.dump({'image': 'cpu', \
'torch': torch.__version__, 'onnxruntime': onnxruntime.__version__, 'openvino': openvino.__version__, \
'tensorrt': None, 'cuda': None, 'triton_release': None}, open('/etc/cbam-deploy/stack.json', 'w'), indent=1)"
RUN (getent passwd 1000 >/dev/null && useradd --create-home cbam || useradd --create-home --uid 1000 cbam) \
 && mkdir -p /work && chown cbam /work
USER cbam
WORKDIR /work
EXPOSE 8000
# Meaningful for `serve` (port 8000); a one-shot command (export, bench) simply ends before it matters.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=4)" || exit 1
ENTRYPOINT ["cbam-deploy"]
CMD ["--help"]

# ---------------------------------------------------------------- cuda: x86-64 with an NVIDIA GPU
# One coherent CUDA 12 stack, named after the Triton release whose tritonserver loads its plans.
# The base is NVIDIA's TensorRT container of that release: Triton's own QA builds the plan models for
# release YY.MM in nvcr.io/nvidia/tensorrt:YY.MM-py3 (qa/common/gen_qa_model_repository), so engines
# built here load in nvcr.io/nvidia/tritonserver:YY.MM-py3. TensorRT comes from the base only: the
# package's `tensorrt` extra (tensorrt>=8.5) would resolve to TensorRT 11.x for CUDA 13 today.
# torch from PyTorch's CUDA 12.8 index (PyPI's torch 2.13.0 requires the CUDA 13 wheels, nvidia-*-cu13);
# onnxruntime-gpu from PyPI (CUDA 12 + cuDNN 9 builds), pinned together with onnxruntime so the one
# `onnxruntime` module is the GPU build. Change TRITON_RELEASE and the pins together.
FROM nvcr.io/nvidia/tensorrt:${TRITON_RELEASE}-py3 AS cuda
ARG TRITON_RELEASE
ARG TORCH_SPEC="torch==2.8.0"
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ARG ORT_VERSION=1.22.0
ENV PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1 DEBIAN_FRONTEND=noninteractive \
    CBAM_DEPLOY_TRITON_RELEASE=${TRITON_RELEASE} PATH=/opt/venv/bin:$PATH
RUN apt-get update && apt-get install -y --no-install-recommends python3-venv \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv --system-site-packages /opt/venv
WORKDIR /opt/cbam-deploy
COPY pyproject.toml README.md ./
COPY requirements/ requirements/
COPY cbam_deploy/ cbam_deploy/
# The venv sees the base's TensorRT bindings (--system-site-packages); nothing below may replace them.
RUN python -c "import tensorrt; print('TensorRT', tensorrt.__version__)" \
 && pip install "${TORCH_SPEC}" --index-url "${TORCH_INDEX}" \
 && pip install ".[serve,explain]" "onnxruntime==${ORT_VERSION}" \
 && pip uninstall -y onnxruntime && pip install --no-deps --force-reinstall "onnxruntime-gpu==${ORT_VERSION}"
RUN mkdir -p /etc/cbam-deploy && python -c "import json, tensorrt, torch, onnxruntime as ort; \
assert torch.version.cuda and torch.version.cuda.startswith('12.'), torch.version.cuda; \
assert 'CUDAExecutionProvider' in ort.get_available_providers(), ort.get_available_providers(); \
json.dump({'image': 'cuda', 'triton_release': '${TRITON_RELEASE}', 'tensorrt': tensorrt.__version__, \
'cuda': torch.version.cuda, 'torch': torch.__version__, 'onnxruntime': ort.__version__, \
'onnxruntime_providers': ort.get_available_providers()}, open('/etc/cbam-deploy/stack.json', 'w'), indent=1)"
RUN (getent passwd 1000 >/dev/null && useradd --create-home cbam || useradd --create-home --uid 1000 cbam) \
 && mkdir -p /work && chown cbam /work
USER cbam
WORKDIR /work
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=4)" || exit 1
ENTRYPOINT ["cbam-deploy"]
CMD ["--help"]

# ---------------------------------------------------------------- jetson: JetPack 6 (Python 3.10)
# The base carries CUDA 12.6 and TensorRT 10.3 with its Python bindings (python3-libnvinfer).
# NVIDIA's JetPack 6.1 torch wheel (default below) needs libopenblas and cuSPARSELt at import; the
# cuSPARSELt archive is the one PyTorch's own CI installs for CUDA 12.5-12.9 on aarch64
# (.ci/docker/common/install_cusparselt.sh: libcusparse_lt-linux-sbsa-0.7.1.0). JetPack's torch and
# onnxruntime-gpu wheels are built against numpy 1.x, so numpy stays below 2 here (PIP_CONSTRAINT,
# which also holds for anything installed later in the container). The onnxruntime-gpu wheel for
# JetPack 6 is a build argument (NVIDIA/Jetson AI Lab publish it; none is on PyPI):
#   docker build --target jetson --build-arg ORT_WHEEL=<url or path> [--build-arg TORCH_WHEEL=...] .
# JetPack 5 (Python 3.8) is not supported: cbam-deploy needs Python >= 3.10.
FROM nvcr.io/nvidia/l4t-jetpack:r36.4.0 AS jetson
ARG TORCH_WHEEL=https://developer.download.nvidia.com/compute/redist/jp/v61/pytorch/torch-2.5.0a0+872d972e41.nv24.08.17622132-cp310-cp310-linux_aarch64.whl
ARG CUSPARSELT_URL=https://developer.download.nvidia.com/compute/cusparselt/redist/libcusparse_lt/linux-sbsa/libcusparse_lt-linux-sbsa-0.7.1.0-archive.tar.xz
ARG ORT_WHEEL
ENV PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1 DEBIAN_FRONTEND=noninteractive \
    PIP_CONSTRAINT=/etc/cbam-deploy/constraints.txt
RUN apt-get update && apt-get install -y --no-install-recommends python3-pip python3-libnvinfer libopenblas-dev curl xz-utils \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /tmp/cusparselt && curl -fsSL "${CUSPARSELT_URL}" | tar -xJ -C /tmp/cusparselt --strip-components=1 \
 && cp -a /tmp/cusparselt/include/* /usr/local/cuda/include/ && cp -a /tmp/cusparselt/lib/* /usr/local/cuda/lib64/ \
 && rm -rf /tmp/cusparselt && ldconfig \
 && mkdir -p /etc/cbam-deploy && printf 'numpy<2\n' > /etc/cbam-deploy/constraints.txt
WORKDIR /opt/cbam-deploy
COPY pyproject.toml README.md ./
COPY requirements/ requirements/
COPY cbam_deploy/ cbam_deploy/
# NVIDIA's torch first (it satisfies the package's torch range), then the package itself, then the
# Jetson onnxruntime-gpu wheel in place of PyPI's CPU onnxruntime. TensorRT stays the system one.
RUN test -n "${ORT_WHEEL}" || (echo "pass --build-arg ORT_WHEEL=<onnxruntime-gpu wheel for JetPack 6>" && exit 1) \
 && pip3 install "${TORCH_WHEEL}" \
 && pip3 install ".[serve,explain]" \
 && pip3 uninstall -y onnxruntime && pip3 install --no-deps --force-reinstall "${ORT_WHEEL}"
RUN python3 -c "import json, numpy, tensorrt, torch, onnxruntime as ort; \
assert numpy.__version__.startswith('1.'), numpy.__version__; \
json.dump({'image': 'jetson', 'triton_release': None, 'tensorrt': tensorrt.__version__, 'cuda': torch.version.cuda, \
'torch': torch.__version__, 'onnxruntime': ort.__version__, 'numpy': numpy.__version__, \
'onnxruntime_providers': ort.get_available_providers()}, open('/etc/cbam-deploy/stack.json', 'w'), indent=1)"
# video: the GPU and DLA device nodes the nvidia runtime maps in belong to that group on L4T.
RUN (getent passwd 1000 >/dev/null && useradd --create-home --groups video cbam \
     || useradd --create-home --uid 1000 --groups video cbam) && mkdir -p /work && chown cbam /work
USER cbam
WORKDIR /work
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=4)" || exit 1
ENTRYPOINT ["cbam-deploy"]
CMD ["--help"]
