"""Bring-your-own model: ``--model path/to/file.py:factory`` where ``factory()`` returns an nn.Module."""

from __future__ import annotations

import importlib.util
import inspect
import sys
from pathlib import Path

from torch import nn

from ..errors import CbamDeployError


def is_factory_spec(spec: str) -> bool:
    """True for 'file.py:factory' (a path to a .py file, a colon, a name)."""
    path, sep, name = spec.rpartition(":")
    return bool(sep) and path.endswith(".py") and name.isidentifier()


def load_factory_model(spec: str, num_classes: int | None = None) -> nn.Module:
    """Import the file, call the factory (with num_classes if it takes it and one is given)."""
    path_text, _, name = spec.rpartition(":")
    path = Path(path_text)
    if not path.is_file():
        raise CbamDeployError(f"model file {path} does not exist")
    module_name = f"cbam_deploy_user_{abs(hash(str(path.resolve())))}"
    try:
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module
        module_spec.loader.exec_module(module)
    except Exception as exc:  # the user's code: any failure is theirs to fix
        sys.modules.pop(module_name, None)
        raise CbamDeployError(f"importing {path} failed: {type(exc).__name__}: {exc}") from None
    factory = getattr(module, name, None)
    if not callable(factory):
        raise CbamDeployError(f"{path} has no callable named {name!r}")
    kwargs = {}
    if num_classes is not None:
        params = inspect.signature(factory).parameters
        if "num_classes" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
            kwargs["num_classes"] = num_classes
    try:
        model = factory(**kwargs)
    except Exception as exc:
        raise CbamDeployError(f"{path}:{name}() raised {type(exc).__name__}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise CbamDeployError(f"{path}:{name}() returned {type(model).__name__}, not a torch.nn.Module")
    return model.eval()
