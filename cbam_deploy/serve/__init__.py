"""Serving: an Open Inference Protocol server over onnxruntime (or any runner), and the Triton
model-repository writer for when one machine is not enough."""
