"""The ncnn format: ``.param`` + ``.bin`` pairs converted from the PyTorch model by pnnx, for ARM (and
x86) CPUs: ``exporter`` (pnnx conversion, the ``ncnn-pools`` rewrite, the INT8 writer), ``recipe``
(ncnn's own INT8 scheme and the gate policy), ``runner`` (ncnn's Python bindings, fp32 pinned),
``build`` (the fp32 pair committed to a bundle)."""
