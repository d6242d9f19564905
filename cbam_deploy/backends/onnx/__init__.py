"""The ONNX format (onnxruntime): ``exporter`` writes the FP32 ONNX from the PyTorch model,
``runner`` runs it in onnxruntime (any execution provider), ``build`` reports what the export made."""
