"""The OpenVINO IR format: ``exporter`` converts the FP32 ONNX to IR (fp32/fp16), ``runner`` runs it
on OpenVINO's CPU (or other) plugin, ``build`` commits the IR to the bundle."""
