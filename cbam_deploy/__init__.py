"""cbam-deploy: ship CBAM networks to edge devices (ONNX, INT8, OpenVINO, TensorRT) with measured parity."""

__version__ = "0.1.0"
