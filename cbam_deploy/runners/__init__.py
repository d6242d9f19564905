"""The Runner interface (``base``) and the PyTorch original's runner (``torch``).

Each artifact format's runner lives in its package (``backends/<format>/runner.py``); which runner
opens which artifact is ``cbam_deploy.runtimes``; opening a bundle's artifact, and rebuilding the
PyTorch original a bundle was made from, is ``cbam_deploy.loaders``.
"""
