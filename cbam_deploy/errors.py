"""The one exception type for errors a user can cause (bad checkpoint, bad option, missing backend).

The CLI turns a ``CbamDeployError`` into one red line and a non-zero exit; anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations


class CbamDeployError(Exception):
    """An error the user can fix; the message says what to do."""

    exit_code = 2


class BackendUnavailable(CbamDeployError):
    """An optional backend (OpenVINO, NNCF, TensorRT, a CUDA GPU) is not on this machine; callers that
    build or run everything they can list the artifact as skipped with this message."""
