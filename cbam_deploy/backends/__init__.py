"""The built-in format plug-ins, one package per artifact format (``backends/<format>/``), each with the
same modules on the same floors (``.importlinter``):

- ``exporter``: makes the format's files from what it is given (a model, an ONNX file), and its
  install probes (``formats.Extra``);
- ``gates``: the gate finder's adapter for its graph, where the format has one;
- ``recipe``: its INT8 recipe(s), where the format has one of its own;
- ``runner``: its ``Runner`` (``cbam_deploy.runners.base``);
- ``peers``: what the engine's own documented path gives, for ``bench --peers``;
- ``plugin``: its row (``formats.Format``), the one object the rest of the tool reaches it through.

``base`` holds what every format's build and recipe share (their jobs, options, outcome, and the one
build skeleton). Format packages never import each other, and no module outside them imports one:
the registry (``cbam_deploy.formats``) finds them. docs/design.md says how to add a format.
"""
