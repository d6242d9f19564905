"""Bring-your-own model: ``--model path/to/file.py:factory`` where ``factory()`` returns an nn.Module."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import inspect
import sys
import traceback
import types
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..errors import CbamDeployError


def is_factory_spec(spec: str) -> bool:
    """True for 'file.py:factory' (a path to a .py file, a colon, a name)."""
    path, sep, name = spec.rpartition(":")
    return bool(sep) and path.endswith(".py") and name.isidentifier()


def factory_sha256(spec: str) -> str:
    """The sha256 of a factory spec's file ('file.py:factory'), recorded at export."""
    path = Path(spec.rpartition(":")[0])
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as exc:
        raise CbamDeployError(f"cannot read the model file {path}: {exc.strerror or exc}") from None


@dataclass(frozen=True)
class CodeTrust:
    """Which Python code a command may run to rebuild a bundle's PyTorch model. A bundle's manifest
    can name a factory file, but a bundle may come from anyone: its code runs only when the user names
    that factory again (``factory``: ``--model file.py:factory``, checked against the sha256 recorded
    at export) or says so (``trust_bundle``: ``--trust-code``)."""

    factory: str | None = None
    trust_bundle: bool = False


NO_TRUSTED_CODE = ("its model is made by Python code ({file}), and code from a bundle never runs by itself: name it "
                   "again (--model FILE.py:FACTORY, checked against the sha256 recorded at export) or pass --trust-code")


def factory_to_run(recorded: str, recorded_sha256: str | None, trust: CodeTrust | None) -> tuple[str | None, str]:
    """The factory spec a command may import to rebuild a bundle's model whose manifest names
    ``recorded`` (with ``recorded_sha256``), and '' ; or (None, why not). A factory the user names
    whose file does not match the recorded sha256 is an error: they asked for it by name."""
    trust = trust or CodeTrust()
    if trust.factory is not None:
        if not is_factory_spec(trust.factory):
            raise CbamDeployError(f"--model {trust.factory!r}: name the bundle's factory as FILE.py:FACTORY")
        if not Path(trust.factory.rpartition(":")[0]).is_file():
            raise CbamDeployError(f"--model: model file {trust.factory.rpartition(':')[0]} does not exist")
        if recorded_sha256 is None:
            raise CbamDeployError(f"--model {trust.factory}: the bundle records no sha256 of its factory file, so "
                                  "nothing shows this is its code; pass --trust-code to run it anyway")
        if factory_sha256(trust.factory) != recorded_sha256:
            raise CbamDeployError(f"--model {trust.factory}: this file's sha256 differs from the one recorded when the "
                                  f"bundle was exported (from {recorded.rpartition(':')[0]}); it is not the bundle's "
                                  "model code")
        return trust.factory, ""
    if trust.trust_bundle:
        file = Path(recorded.rpartition(":")[0])
        if not file.is_file():
            return None, f"its model file {file} is not on this machine"
        if recorded_sha256 is not None and factory_sha256(recorded) != recorded_sha256:
            return None, f"its model file {file} changed since the bundle was exported (sha256 differs)"
        return recorded, ""
    return None, NO_TRUSTED_CODE.format(file=Path(recorded.rpartition(":")[0]).name or recorded)


def import_factory(spec: str, num_classes: int | None = None,
                   expected_sha256: str | None = None) -> tuple[nn.Module, str]:
    """(the model the factory of ``spec`` makes, the sha256 of the code that made it).

    The file is read once and those bytes are hashed, checked against ``expected_sha256`` (the one a
    bundle recorded at export, when it is given) and compiled: the code that runs is the code that
    was checked, whatever happens to the file meanwhile. The user's code runs with stdout sent to
    stderr (``--json`` owns stdout). Whatever it raises, including ``SystemExit`` from a ``sys.exit()``
    call, becomes one ``CbamDeployError`` naming the file, the line and the exception, never a
    traceback or a silent exit. Ctrl-C still interrupts.
    """
    path_text, _, name = spec.rpartition(":")
    path = Path(path_text)
    if not path.is_file():
        raise CbamDeployError(f"model file {path} does not exist")
    try:
        source = path.read_bytes()
    except OSError as exc:
        raise CbamDeployError(f"cannot read the model file {path}: {exc.strerror or exc}") from None
    digest = hashlib.sha256(source).hexdigest()
    if expected_sha256 is not None and digest != expected_sha256:
        raise CbamDeployError(f"model file {path}: its sha256 differs from the one recorded when the bundle was "
                              "exported (it changed); it is not the bundle's model code, so it was not run")
    module_name = f"cbam_deploy_user_{abs(hash(str(path.resolve())))}"
    try:
        module = types.ModuleType(module_name)
        module.__file__ = str(path)
        module.__spec__ = importlib.util.spec_from_loader(module_name, loader=None, origin=str(path))
        code = compile(source, str(path), "exec", dont_inherit=True)
        sys.modules[module_name] = module  # before it runs: dataclasses and pickling look their module up there
        with contextlib.redirect_stdout(sys.stderr):
            exec(code, module.__dict__)  # noqa: S102 - the user's own model code, checked above
    except CbamDeployError:
        sys.modules.pop(module_name, None)
        raise
    except KeyboardInterrupt:
        sys.modules.pop(module_name, None)
        raise
    except BaseException as exc:  # the user's code: any failure (even sys.exit) is theirs to fix
        sys.modules.pop(module_name, None)
        if isinstance(exc, SystemExit):
            raise CbamDeployError(f"importing {path} called {_exit_call(exc)}{_where(exc, path)}; "
                                  "a model file must not exit") from None
        raise CbamDeployError(f"importing {path} failed{_where(exc, path)}: {_describe(exc)}") from None
    factory = getattr(module, name, None)
    if not callable(factory):
        raise CbamDeployError(f"{path} has no callable named {name!r}")
    kwargs = {}
    if num_classes is not None:
        try:
            params = inspect.signature(factory).parameters
        except (TypeError, ValueError):
            params = {}
        if "num_classes" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
            kwargs["num_classes"] = num_classes
    try:
        with contextlib.redirect_stdout(sys.stderr):
            model = factory(**kwargs)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:
        if isinstance(exc, SystemExit):
            raise CbamDeployError(f"{path}:{name} called {_exit_call(exc)} while building the model"
                                  f"{_where(exc, path)}") from None
        raise CbamDeployError(f"{path}:{name}() raised {_describe(exc)}{_where(exc, path)}") from None
    if not isinstance(model, nn.Module):
        raise CbamDeployError(f"{path}:{name}() returned {type(model).__name__}, not a torch.nn.Module")
    return model.eval(), digest


def _exit_call(exc: SystemExit) -> str:
    return "sys.exit()" if exc.code is None else f"sys.exit({exc.code!r})"


def _describe(exc: BaseException) -> str:
    """'ValueError: first line of the message' (one line, whatever the message holds)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _where(exc: BaseException, path: Path) -> str:
    """' (file.py line N)' for the deepest frame of the traceback inside the user's file."""
    try:
        target = path.resolve()
        frames = [f for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename).resolve() == target]
    except (OSError, ValueError):
        return ""
    if not frames and isinstance(exc, SyntaxError) and exc.lineno:
        return f" (line {exc.lineno})"
    return f" (line {frames[-1].lineno})" if frames else ""
