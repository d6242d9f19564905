"""ExecuTorch artifacts (``.pte`` with the XNNPACK delegate), made from the PyTorch model through
``torch.export``: the exporter (with the ``xnnpack-pools`` rewrite of the ATen graph), the PT2E INT8
recipe, the runner over ExecuTorch's Python runtime and the build job."""
