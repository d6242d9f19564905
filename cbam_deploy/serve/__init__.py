"""Serving: the Open Inference Protocol over HTTP and gRPC for one or several bundles (``app``,
``grpc_server``, over ``service.ModelService``), the Triton model-repository writer (``triton``)
and KServe InferenceService manifests (``kserve``) for when one machine is not enough."""
