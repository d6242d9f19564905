"""One package per artifact format (``backends/<format>/``), each with the same modules on the same
floors (``.importlinter``):

- ``exporter``: makes the format's files from what it is given (a model, an ONNX file);
- ``recipe``: its INT8 recipe, where the format has one of its own;
- ``runner``: its ``Runner`` (``cbam_deploy.runners.base``), opened through ``cbam_deploy.runtimes``;
- ``build``: ``build(bundle_dir, precision, options) -> BuildOutcome``, the write job that commits
  the format's artifacts to a bundle (``base``: what every build shares).

The formats table (``cbam_deploy.formats``) holds each format's facts as data; ``cbam_deploy.build``
maps each format to its build. Format packages never import each other. Adding a format means adding
a folder here, a row in the formats table, a line in ``cbam_deploy.build.BUILDERS`` and the runtime
that opens it in ``cbam_deploy.runtimes``.
"""
