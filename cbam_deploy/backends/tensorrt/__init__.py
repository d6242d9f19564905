"""The TensorRT engine format: ``exporter`` holds the build plan per TensorRT version, the Q/DQ form,
the engine build with its metadata sidecar and profiles; ``runner`` runs an engine;
``build`` commits an engine to the bundle."""
