"""The ExecuTorch exporter: a PyTorch module -> ``torch.export`` (dynamic batch and H/W within
finite bounds) -> the ``xnnpack-pools`` rewrite of the ATen graph -> ``to_edge_transform_and_lower``
with the XNNPACK partitioner -> a ``.pte`` file, with a sidecar (``<file>.json``) that records the
input bounds the runner enforces, the output names, the delegate partitions and the ops left
outside them.

**xnnpack-pools** (exact): the XNNPACK partitioner takes ``mean.dim`` only over dims [2, 3] of a
4-D map with keepdim, ``max.dim`` (values only) but never ``amax``, no reduction over channels, and
no view whose shape holds a symbolic dim. CBAM's pools are all of those, so ExecuTorch's documented
path leaves them on the portable kernels (single-threaded, a copy at each boundary) and splits the
network into one delegate call per stretch between them. The rewrite works on the ATen graph of
the exported program, by structure (the op, its dims, the ranks and static sizes of its input),
never by module or class names, so third-party CBAM code gets it too:

* ``amax`` / adaptive max pool to 1x1 over (H, W) -> ``max.dim`` over W, then over H (keepdim);
* adaptive avg pool to 1x1 -> ``mean.dim`` over (H, W) keepdim;
* ``amax`` / ``max.dim`` / ``mean`` over the channel dim (CBAM's channel pool) -> permute (0, 2, 1, 3),
  max_pool2d / avg_pool2d with kernel (C, 1), permute back; C is the traced (static) channel count;
* a pool over (H, W) without keepdim (the classifier head) -> with keepdim, then reshape(-1, C);
* a view or flatten whose result has exactly one symbolic dim -> reshape with one -1 there;
* an ``expand`` of a gate feeding only a broadcasting multiply -> dropped (the multiply broadcasts).

Max is exact; a mean computed as an avg pool differs by float rounding at most. The rewritten graph
is exported again with the same dynamic shapes (what PT2E does too), and the export's parity run
compares the .pte with the unmodified PyTorch model.

With a dynamic dim the lowered max-pool takes the dim's *upper bound* as its kernel: XNNPACK then
clamps the window to the input, so a smaller map still gives its exact global max. ExecuTorch itself
never checks an input's shape against the export: a shape beyond the bounds whose element count fits
the planned memory runs and returns wrong numbers silently. The runner therefore checks every input
against the bounds recorded in the sidecar and refuses other shapes.
"""

from __future__ import annotations

import collections
import importlib
import importlib.util
import json
import operator
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ...checks import bounds_problem, shorten
from ...errors import CbamDeployError
from ...formats import Extra
from ...fsutil import atomic_path, write_bytes_atomic
from ...outputs import flatten_outputs

REWRITE = "xnnpack-pools"
REWRITE_DESCRIPTION = ("CBAM's pools as ops the XNNPACK delegate takes: global max as two max.dim, channel "
                       "max/mean as (C,1) pools between permutes, head mean with keepdim, views as reshape(-1)")
INSTALL_HINT = "install the executorch extra: pip install 'cbam-deploy[executorch]'"
SIDECAR_SUFFIX = ".json"
# what the Python runtime cannot give for a .pte, in one line each
NO_GATE_MAPS = ("ExecuTorch runs the network as one XNNPACK delegate call and returns only the model's outputs: "
                "its gate maps cannot be read (attention parity and explain use the artifacts of formats that read their gates)")
NO_PROFILE = ("ExecuTorch's per-operator times need an ETDump and the devtools Inspector (not in the executorch "
              "extra), and inside the one XNNPACK delegate call they would not be per CBAM op anyway")
_BOOKKEEPING = ("executorch_call_delegate", "getitem")

aten = torch.ops.aten


EXECUTORCH = Extra("ExecuTorch", ("executorch", "torchao"), INSTALL_HINT)


def probe() -> str | None:
    """None when ExecuTorch (with torchao, for INT8) can be used here, else the one line saying why not."""
    return EXECUTORCH.probe()


def import_extra(what: str, *modules: str) -> list:
    """The named modules of the executorch extra (ExecuTorch, torchao), or BackendUnavailable in one
    line: not installed, or a broken or partial install."""
    return EXECUTORCH.require_all(*modules)


def require_executorch():
    """ExecuTorch's ``exir`` module and XNNPACK partitioner class, or BackendUnavailable in one line."""
    exir, partitioner = import_extra("executorch", "executorch.exir",
                                     "executorch.backends.xnnpack.partition.xnnpack_partitioner")
    return exir, partitioner.XnnpackPartitioner


# ------------------------------------------------------------------------------ shape bounds

@dataclass(frozen=True)
class Bounds:
    """The input shapes a .pte accepts: each of N, H, W fixed (min == max) or a range."""

    batch: tuple[int, int]
    height: tuple[int, int]
    width: tuple[int, int]
    channels: int = 3

    def describe(self) -> dict:
        return {"channels": self.channels, "batch": list(self.batch), "height": list(self.height),
                "width": list(self.width)}

    @classmethod
    def from_record(cls, record: dict, where: str = "bounds") -> Bounds:
        """The bounds a sidecar or a manifest records, checked first (``checks.bounds_problem``: each an
        integer [min, max] pair, 1 <= min <= max under a finite ceiling): one error naming the field."""
        problem = bounds_problem(record)
        if problem:
            field, expected, value = problem
            raise CbamDeployError(f"{where}{'.' + field if field else ''} must be {expected}, got "
                                  f"{shorten(value, 40)}")
        return cls(tuple(record["batch"]), tuple(record["height"]), tuple(record["width"]), record["channels"])

    def example(self) -> torch.Tensor:
        """An input inside the bounds (not at a bound: torch.export specialises a dim traced at 0 or 1)."""
        def pick(lo: int, hi: int) -> int:
            return lo if lo == hi else min(hi, max(lo, 2))
        return torch.zeros(pick(*self.batch), self.channels, self.height[0] if self.height[0] == self.height[1]
                           else max(self.height[0], min(self.height[1], (self.height[0] + self.height[1]) // 2)),
                           self.width[0] if self.width[0] == self.width[1]
                           else max(self.width[0], min(self.width[1], (self.width[0] + self.width[1]) // 2)))

    def dynamic_shapes(self):
        dims = {}
        for axis, name, (lo, hi) in ((0, "batch", self.batch), (2, "height", self.height), (3, "width", self.width)):
            if lo != hi:
                dims[axis] = torch.export.Dim(name, min=lo, max=hi)
        return ({**dims},) if dims else None

    def check(self, shape: tuple, where: str) -> None:
        """One line when ``shape`` (N, C, H, W) is not one the .pte was exported for."""
        if len(shape) != 4 or shape[1] != self.channels:
            raise CbamDeployError(f"{where} takes (N, {self.channels}, H, W) inputs; got shape {tuple(shape)}")
        for label, value, (lo, hi) in (("batch", shape[0], self.batch), ("height", shape[2], self.height),
                                       ("width", shape[3], self.width)):
            if not lo <= value <= hi:
                allowed = str(lo) if lo == hi else f"{lo}..{hi}"
                raise CbamDeployError(f"{where} was exported for {label} {allowed}; got {value} (input shape "
                                      f"{tuple(shape)}): ExecuTorch would compute wrong numbers silently, so it is "
                                      "refused; export again with other bounds")


def default_bounds(shape: list, side: int, min_batch: int = 1, max_batch: int = 8) -> Bounds:
    """Bounds from the bundle's input shape (N, C, H, W; a name for a dynamic dim) and its export side:
    a dynamic batch spans ``min_batch..max_batch``; a dynamic H/W spans half to twice ``side``
    (ExecuTorch plans memory for the upper bounds, so they must be finite)."""
    def span(dim, lo, hi) -> tuple[int, int]:
        return (dim, dim) if isinstance(dim, int) else (lo, hi)
    low, high = max(8, side // 2), 2 * side
    return Bounds(span(shape[0], min_batch, max_batch), span(shape[2], low, high), span(shape[3], low, high),
                  int(shape[1]))


# ------------------------------------------------------------------------------ the rewrite

def _val(node):
    value = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return value if isinstance(value, torch.Tensor) else None


def _static(dim) -> bool:
    return isinstance(dim, int) and not isinstance(dim, bool)


def _dims(node, rank: int) -> list[int] | None:
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if dims is None:
        return None
    dims = [dims] if isinstance(dims, int) else list(dims)
    return sorted(d % rank for d in dims)


def _values_only(node) -> bool:
    """Whether only the values of a (values, indices) op are used (an unused indices getitem is fine)."""
    return all(u.target is operator.getitem and (u.args[1] == 0 or not u.users) for u in node.users)


def _keepdim(node, index: int = 2) -> bool:
    return bool(node.args[index] if len(node.args) > index else node.kwargs.get("keepdim", False))


class _Rewriter:
    def __init__(self, gm: torch.fx.GraphModule) -> None:
        self.gm, self.graph = gm, gm.graph
        self.applied: collections.Counter = collections.Counter()
        self.anchor = None

    def call(self, target, args, like) -> torch.fx.Node:
        with self.graph.inserting_before(self.anchor):  # after its inputs, before the node it replaces
            node = self.graph.call_function(target, args)
        for key in ("nn_module_stack", "stack_trace"):  # keep the scope (not the source op: annotators match on it)
            if key in like.meta:
                node.meta[key] = like.meta[key]
        return node

    def global_max(self, x, like) -> torch.fx.Node:
        w = self.call(operator.getitem, (self.call(aten.max.dim, (x, 3, True), like), 0), like)
        return self.call(operator.getitem, (self.call(aten.max.dim, (w, 2, True), like), 0), like)

    def channel_pool(self, x, kind: str, channels: int, like) -> torch.fx.Node:
        swapped = self.call(aten.permute.default, (x, [0, 2, 1, 3]), like)
        if kind == "max":
            pooled = self.call(aten.max_pool2d.default, (swapped, [channels, 1], [channels, 1]), like)
        else:
            pooled = self.call(aten.avg_pool2d.default, (swapped, [channels, 1], [channels, 1]), like)
        return self.call(aten.permute.default, (pooled, [0, 2, 1, 3]), like)

    def replace(self, node, new, keepdim: bool, reduced: list[int], shape) -> None:
        """Use ``new`` (a keepdim result) for ``node``; without keepdim: reshape(-1, C) for an (H, W)
        pool, and for a channel pool drop the unsqueeze(1) that follows (else leave a squeeze)."""
        if keepdim:
            node.replace_all_uses_with(new)
            return
        if reduced == [2, 3]:
            node.replace_all_uses_with(self.call(aten.reshape.default, (new, [-1, int(shape[1])]), node))
            return
        for user in list(node.users):
            if user.target in (aten.unsqueeze.default,) and user.args[1] in (1, -3):
                user.replace_all_uses_with(new)
        if node.users:
            node.replace_all_uses_with(self.call(aten.squeeze.dims, (new, [1]), node))

    def pool(self, node, x, kind: str, reduced: list[int], keepdim: bool) -> bool:
        value = _val(x)
        if value is None or value.dim() != 4:
            return False
        shape = value.shape
        if reduced == [2, 3] and _static(shape[1]):
            if kind == "max":
                new = self.global_max(x, node)
            elif keepdim:
                return False  # mean over (H, W) with keepdim: XNNPACK's global average pool already
            else:
                new = self.call(aten.mean.dim, (x, [2, 3], True), node)
            self.replace(node, new, keepdim, reduced, shape)
            return True
        if reduced == [1] and _static(shape[1]):
            self.replace(node, self.channel_pool(x, kind, int(shape[1]), node), keepdim, reduced, shape)
            return True
        return False

    def run(self) -> None:
        for node in list(self.graph.nodes):
            if node.op != "call_function":
                continue
            target = node.target
            done = None
            self.anchor = node
            if target is aten.amax.default:
                done = self.pool(node, node.args[0], "max", _dims(node, 4) or [], _keepdim(node))
                label = "amax"
            elif target is aten.mean.dim:
                done = self.pool(node, node.args[0], "avg", _dims(node, 4) or [], _keepdim(node))
                label = "mean"
            elif target is aten.max.dim and _val(node.args[0]) is not None and _val(node.args[0]).dim() == 4:
                dim = node.args[1] % 4
                users = list(node.users)
                if dim == 1 and _values_only(node):
                    keep = _keepdim(node)
                    for user in users:
                        if user.args[1] == 0:
                            done = self.pool(user, node.args[0], "max", [1], keep)
                label = "max.dim"
            elif target in (aten.adaptive_avg_pool2d.default, aten.adaptive_max_pool2d.default) \
                    and list(node.args[1]) in ([1, 1], [1]):
                if target is aten.adaptive_avg_pool2d.default:
                    new = self.call(aten.mean.dim, (node.args[0], [2, 3], True), node)
                    node.replace_all_uses_with(new)
                    done = True
                elif _values_only(node):
                    new = self.global_max(node.args[0], node)
                    for user in list(node.users):
                        if user.args[1] == 0:
                            user.replace_all_uses_with(new)
                    done = True
                label = target.__name__.split(".")[0]
            elif target in (aten.view.default, aten.flatten.using_ints, aten.reshape.default, aten._unsafe_view.default):
                done = self.view(node)
                label = "view"
            elif target in (aten.expand.default, aten.expand_as.default):
                done = self.expand(node)
                label = "expand"
            else:
                continue
            if done:
                self.applied[label] += 1
        self.graph.eliminate_dead_code()
        self.gm.recompile()

    def view(self, node) -> bool:
        value = _val(node)
        if value is None:
            return False
        shape = list(value.shape)
        symbolic = [i for i, d in enumerate(shape) if not _static(d)]
        if len(symbolic) != 1:
            return False
        args = node.args[1] if len(node.args) > 1 else None
        if node.target is aten.reshape.default and isinstance(args, (list, tuple)) and \
                all(_static(a) for a in args) and list(args).count(-1) == 1:
            return False  # already a reshape with one -1
        target = [-1 if i == symbolic[0] else int(d) for i, d in enumerate(shape)]
        node.replace_all_uses_with(self.call(aten.reshape.default, (node.args[0], target), node))
        return True

    def expand(self, node) -> bool:
        """An expand feeding only multiplies whose other operand already has the expanded shape."""
        value = _val(node)
        if value is None or not node.users:
            return False
        for user in node.users:
            if user.target not in (aten.mul.Tensor,) or len(user.args) != 2:
                return False
            other = user.args[1] if user.args[0] is node else user.args[0]
            other_value = _val(other)
            if other_value is None or tuple(other_value.shape) != tuple(value.shape):
                return False
        node.replace_all_uses_with(node.args[0])
        return True


def rewrite_graph(gm: torch.fx.GraphModule) -> dict:
    """Apply ``xnnpack-pools`` to ``gm`` (the ``.module()`` of an exported program) in place; the
    record of what changed, by op."""
    rewriter = _Rewriter(gm)
    rewriter.run()
    return {"name": REWRITE, "exact": True, "stage": "aten", "description": REWRITE_DESCRIPTION,
            "ops": dict(sorted(rewriter.applied.items()))}


def export_program(module: nn.Module, bounds: Bounds, rewrite: bool = True):
    """(exported program, rewrite record or None): ``torch.export`` of ``module`` within ``bounds``,
    rewritten (``xnnpack-pools``) and exported again with the same dynamic shapes."""
    example = bounds.example()
    shapes = bounds.dynamic_shapes()
    try:
        with torch.no_grad():
            program = torch.export.export(module.eval(), (example,), dynamic_shapes=shapes, strict=False)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CbamDeployError(f"torch.export could not trace the model within {bounds.describe()}: "
                              f"{type(exc).__name__}: {first}") from None
    if not rewrite:
        return program, None
    gm = program.module()
    record = rewrite_graph(gm)
    with torch.no_grad():
        program = torch.export.export(gm, (example,), dynamic_shapes=shapes, strict=False)
    return program, record


def partitions(edge) -> tuple[int, dict]:
    """(XNNPACK delegate calls, {op: count} of the ops left outside them) of a lowered program."""
    graph_module = edge.exported_program().graph_module
    delegates, outside = 0, collections.Counter()
    for node in graph_module.graph.nodes:
        if node.op != "call_function":
            continue
        name = getattr(node.target, "__name__", str(node.target))
        if name == "executorch_call_delegate":
            delegates += 1
        elif name not in _BOOKKEEPING:
            outside[name] += 1
    return delegates, dict(sorted(outside.items()))


def lower(program):
    """``to_edge_transform_and_lower`` with the XNNPACK partitioner: (edge program, partitions, outside)."""
    exir, partitioner = require_executorch()
    edge = exir.to_edge_transform_and_lower(program, partitioner=[partitioner()])
    count, outside = partitions(edge)
    return edge, count, outside


def output_names(module: nn.Module, bounds: Bounds) -> list[str]:
    with torch.no_grad():
        return [name for name, _ in flatten_outputs(module.eval()(bounds.example()))]


def write_pte(edge, path: Path) -> int:
    """The program serialised to ``path`` (atomically); its size."""
    program = edge.to_executorch()
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            program.write_to_file(handle)
    return path.stat().st_size


def write_sidecar(path: Path, record: dict) -> None:
    write_bytes_atomic(sidecar_path(path), json.dumps(record, indent=1, sort_keys=True).encode())


def sidecar_path(path: str | Path) -> Path:
    return Path(str(path) + SIDECAR_SUFFIX)


def export_pte(module: nn.Module, path: str | Path, bounds: Bounds, rewrite: bool = True, precision: str = "fp32",
               program=None, rewrites: dict | None = None, names: list[str] | None = None) -> dict:
    """Write ``path`` (.pte) and its sidecar from ``module`` (or an already exported ``program``,
    e.g. PT2E's converted one); the record for the manifest's ``export`` field."""
    require_executorch()
    path = Path(path)
    started = time.perf_counter()
    names = names or output_names(module, bounds)
    if program is None:
        program, rewrites = export_program(module, bounds, rewrite)
    edge, count, outside = lower(program)
    size = write_pte(edge, path)
    record = {
        "exporter": "torch.export + executorch to_edge_transform_and_lower (XnnpackPartitioner)",
        "executorch": _version("executorch"), "torch": torch.__version__, "precision": precision,
        "bounds": bounds.describe(), "outputs": names,
        "delegate": "XnnpackBackend", "partitions": count, "outside_delegate": outside,
        "rewrites": [rewrites] if rewrites else [],
    }
    write_sidecar(path, record)
    return {**record, "size_bytes": size, "seconds": round(time.perf_counter() - started, 2)}


def _version(name: str) -> str | None:
    try:
        return importlib.import_module("importlib.metadata").version(name)
    except Exception:  # a source checkout without metadata
        return None


__all__ = ["Bounds", "INSTALL_HINT", "REWRITE", "default_bounds", "export_program", "export_pte", "lower", "partitions",
           "probe", "require_executorch", "rewrite_graph", "sidecar_path"]
