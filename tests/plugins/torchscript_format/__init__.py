"""A format written outside cbam-deploy, as a third-party package would: TorchScript programs."""
