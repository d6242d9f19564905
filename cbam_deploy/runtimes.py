"""Runtimes: what runs an artifact, as an axis of its own. An ONNX artifact runs under onnxruntime's CPU,
CUDA, TensorRT or OpenVINO execution providers, or under OpenVINO reading the ONNX itself; an IR runs
under OpenVINO; an engine under TensorRT.

Each format's row declares the runtimes its package provides (``formats.Runtime``: the formats it
runs, a cheap probe saying whether this machine has it, a factory making the Runner); this module
selects among them. ``select_runtime`` picks one for an artifact: the one asked for (refused, in one
line naming the ones this machine has, when it is missing or does not run that format), else the best
available for the format, in the order its row prefers (for ONNX ``ort-tensorrt`` > ``ort-cuda`` >
``ort-openvino`` > ``ort-cpu``, so a CPU-only machine with the plain onnxruntime wheel keeps
``ort-cpu``).
"""

from __future__ import annotations

from .checks import split_list
from .errors import BackendUnavailable, CbamDeployError
from .formats import Runtime, all_runtimes, get


class RuntimeUnavailable(BackendUnavailable):
    """A runtime asked for by name is not on this machine (exit 2, one line naming those that are)."""


def runtimes() -> dict[str, Runtime]:
    """{name: Runtime} of every format, in the formats' order."""
    return all_runtimes()


def runtime(name: str) -> Runtime:
    table = runtimes()
    if name not in table:
        raise CbamDeployError(f"unknown runtime {name!r}; runtimes: {', '.join(table)}")
    return table[name]


def available_runtimes(fmt: str | None = None) -> list[str]:
    """The runtimes this machine has (that run artifacts of format ``fmt``), in table order."""
    return [n for n, r in runtimes().items() if (fmt is None or fmt in r.formats) and r.probe() is None]


def default_runtime(fmt: str) -> str:
    """The best runtime this machine has for format ``fmt``: the first of its row's
    ``preferred_runtimes`` that is available, else the last (whose own error then says why)."""
    order = get(fmt).preferred_runtimes
    if not order:
        raise CbamDeployError(f"no runtime runs {fmt} artifacts")
    table = runtimes()
    return next((n for n in order if table[n].probe() is None), order[-1])


def check_runtime_names(names: list[str], option: str = "--runtime") -> list[str]:
    """Every name known and available here, else one line naming the ones that are."""
    table = runtimes()
    for name in names:
        if name not in table:
            raise CbamDeployError(f"{option}: unknown runtime {name!r}; runtimes: {', '.join(table)} "
                                  f"(available here: {', '.join(available_runtimes()) or 'none'})")
        reason = table[name].probe()
        if reason is not None:
            raise RuntimeUnavailable(f"{option}: runtime {name} is not available here ({reason}); available here: "
                                     f"{', '.join(available_runtimes()) or 'none'}")
    if len(set(names)) != len(names):
        raise CbamDeployError(f"{option}: a runtime is listed twice: {', '.join(names)}")
    return names


def parse_runtimes(value: str | list[str] | None, option: str = "--runtime") -> list[str] | None:
    """A comma list (or list) of runtime names, checked; None for the default."""
    if value is None:
        return None
    names = split_list(value)
    if not names:
        raise CbamDeployError(f"{option}: give one or more of {', '.join(runtimes())}")
    return check_runtime_names(names, option)


def select_runtime(fmt: str, name: str | None = None) -> Runtime:
    """The runtime for an artifact of format ``fmt``: ``name`` (checked: known, runs ``fmt``, on this
    machine) or the default."""
    table = runtimes()
    if name is None:
        return table[default_runtime(fmt)]
    if name in table and fmt not in table[name].formats:
        fits = [n for n, r in table.items() if fmt in r.formats]
        raise CbamDeployError(f"runtime {name} does not run {fmt} artifacts (it runs {', '.join(table[name].formats)}); "
                              f"{fmt} runs under {', '.join(fits) or 'none'} (available here: "
                              f"{', '.join(available_runtimes(fmt)) or 'none'})")
    check_runtime_names([name])
    return table[name]


def runs(name: str, fmt: str) -> bool:
    """Whether runtime ``name`` runs artifacts of format ``fmt``."""
    return fmt in runtime(name).formats


def fitting(fmt: str, names: list[str]) -> list[str]:
    """Those of ``names`` that run artifacts of format ``fmt``."""
    return [n for n in names if runs(n, fmt)]


def runtime_help() -> str:
    """For the CLI's help: every runtime and what it runs (no probing: help stays instant)."""
    return "; ".join(f"{n} ({'/'.join(r.formats)})" for n, r in runtimes().items())
