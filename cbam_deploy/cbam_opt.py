"""CBAM-specific optimisations applied on the way to the deployed artifact (``--cbam-opt on``, the default).

CBAM adds 0.2% FLOPs to a ResNet50 but, deployed, far more time (docs/measurements.md): its gates are small
operators (pools, a tiny MLP, channel reductions, two broadcast multiplies) whose cost is memory
traffic and per-node overhead, not arithmetic. Each rewrite here is named, says whether it is exact
(same function up to float rounding: it is checked by the export's parity run against the
*unmodified* PyTorch model, and by verify) and is recorded in the manifest, so ``--cbam-opt off``
reproduces the plain export and ``bench`` can compare the two.

Export-time rewrites change how the module computes, never its parameters or their names: the
exported copy's state dict is the original's, so checkpoints, the INT8 gate policy (module scopes)
and ``explain`` (forward hooks on the original modules) are unaffected.

* ``mlp-batched`` (exact): the channel gate's shared MLP runs once on the stacked pooled descriptors
  instead of once per pool, and its second layer once on the sum of the hidden activations:
  ``sum_i (W2 relu(W1 p_i + b1) + b2) = W2 (sum_i relu(W1 p_i + b1)) + k b2``. At batch 1 the MLP
  is bound by reading its weights (ResNet50-CBAM: 2.5 M MLP parameters), and this reads each weight
  once instead of k times.

Where a rewrite applies is decided gate by gate from what the gate finder (``cbam_deploy.gates``)
found: ``mlp-batched`` is exact for a channel gate with two or more pooled descriptors through one
shared Linear-ReLU-Linear MLP, in a module whose forward is known to compute exactly
``sigmoid(sum_i MLP(pool_i(x)))`` (cbam_deploy's ``ChannelGate``). Every other gate is exported as
written, and the record says why, per gate (``gates``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import CbamDeployError
from .models.layers import _POOLS, ChannelGate

MODES = ("on", "off")


class BatchedMlpChannelGate(ChannelGate):
    """ChannelGate whose shared MLP runs once over all pooled descriptors (rewrite ``mlp-batched``)."""

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        first, second = self.mlp[1], self.mlp[3]
        k = len(self.pool_types)
        pooled = torch.cat([_POOLS[p](x).flatten(1) for p in self.pool_types], dim=0)  # (k*N, C)
        hidden = torch.relu(first(pooled)).reshape(k, -1, first.out_features).sum(dim=0)  # (N, C/r)
        total = F.linear(hidden, second.weight, second.bias * k if second.bias is not None else None)
        return torch.sigmoid(total)[:, :, None, None]


@dataclass(frozen=True)
class Rewrite:
    name: str
    exact: bool
    stage: str  # "torch": applied to the module before export
    description: str


REWRITES = {
    "mlp-batched": Rewrite("mlp-batched", True, "torch",
                           "channel-gate MLP run once on the stacked pooled descriptors; second layer on their sum"),
}


def check_mode(value: object) -> str:
    if value not in MODES:
        raise CbamDeployError(f"--cbam-opt must be on or off, got {value!r}")
    return value  # type: ignore[return-value]


def _mlp_batchable(module: nn.Module) -> bool:
    return (type(module) is ChannelGate and len(module.pool_types) > 1 and isinstance(module.mlp[1], nn.Linear)
            and isinstance(module.mlp[3], nn.Linear) and isinstance(module.mlp[2], nn.ReLU))


def _decide(model: nn.Module, gate: dict) -> tuple[str | None, str | None]:
    """(module to rewrite, None) when ``mlp-batched`` is exact for ``gate``; else (None, why not)."""
    if gate["kind"] != "channel":
        return None, f"{gate['kind']} gate: no rewrite for it"
    if len(gate.get("pools") or []) < 2:
        return None, f"one pooled descriptor ({', '.join(gate.get('pools') or []) or 'none'}): nothing to batch"
    try:
        module = model.get_submodule(gate["name"].split(":")[0]) if gate["name"] != "(model)" else model
    except AttributeError:
        module = None
    if module is None or not _mlp_batchable(module):
        owner = type(module).__name__ if module is not None else "the model's forward"
        return None, (f"computed by {owner}, whose forward cbam-deploy does not know to be "
                      "sigmoid(sum of one shared Linear-ReLU-Linear MLP over the pools); rewriting it would not be "
                      "exact for certain")
    return gate["name"], None


def optimize_for_export(model: nn.Module, mode: str = "on", gates: dict | None = None) -> tuple[nn.Module, dict]:
    """The module to export and the manifest's record of what was rewritten.

    ``gates``: the gate finder's report on ``model`` (``GateReport.describe()``); each gate gets an
    entry saying whether a rewrite was applied to it, and why not. ``model`` itself is never changed
    (it stays the parity reference): a rewrite works on a copy whose modules have their class swapped
    to an equivalent one with the same parameters."""
    check_mode(mode)
    record = {"mode": mode, "rewrites": []}
    if mode == "off":
        return model, record
    if gates is None:
        targets = [name for name, module in model.named_modules() if _mlp_batchable(module)]
    else:
        targets, record["gates"] = [], []
        for gate in gates.get("gates") or []:
            target, reason = _decide(model, gate)
            if target:
                targets.append(target)
            record["gates"].append({"gate": gate["name"], "applied": ["mlp-batched"] if target else [],
                                    **({"not_applied": reason} if reason else {})})
    if not targets:
        record["note"] = ("no gate where a rewrite is exact: exported as written" if gates is None or gates.get("gates")
                          else "the model has no attention gates: exported as written")
        return model, record
    optimized = copy.deepcopy(model)
    for name in targets:
        optimized.get_submodule(name).__class__ = BatchedMlpChannelGate
    rewrite = REWRITES["mlp-batched"]
    record["rewrites"].append({"name": rewrite.name, "exact": rewrite.exact, "stage": rewrite.stage,
                               "modules": len(targets), "description": rewrite.description})
    return optimized, record


def applied(record: dict | None) -> list[str]:
    """Names of the rewrites a manifest record says ran."""
    return [r["name"] for r in (record or {}).get("rewrites", [])]

