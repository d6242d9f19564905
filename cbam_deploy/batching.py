"""Batch limits of a bundle's artifacts: the batch sizes one call of an artifact's runner may use
without being split or padded. A fixed-batch model takes only its own batch; beyond that the
artifact's row says (``formats.Format.batch_bounds``: an engine's optimisation profile, a program's
exported bounds). bench refuses a batch outside them (a split or padded call is not the latency of
that batch), serve and eval fit their batches inside them."""

from __future__ import annotations

from .errors import CbamDeployError
from .formats import get as get_format
from .manifest import fixed_batch


def _raw(artifact) -> dict:
    return artifact if isinstance(artifact, dict) else artifact.raw


def batch_limit(manifest, artifact) -> tuple[int, int] | None:
    """(smallest, largest) batch one call of the artifact's runner may use (``manifest``: a ``Bundle``
    or a manifest dict; ``artifact``: its record or manifest dict); None: any batch."""
    raw = _raw(artifact)
    bounds = get_format(raw.get("format")).batch_bounds(raw) if raw.get("format") else None
    if bounds is not None:
        return bounds
    fixed = fixed_batch(getattr(manifest, "manifest", manifest)["input"]["shape"])
    return (fixed, fixed) if fixed is not None else None


def check_batch_fits(manifest, artifact, batch: int, option: str = "--batch") -> None:
    """Refuse a batch size the artifact cannot run in one call, naming the option to change."""
    limit = batch_limit(manifest, artifact)
    if limit is None:
        return
    low, high = limit
    if not low <= batch <= high:
        raw = _raw(artifact)
        bounded = raw.get("format") and get_format(raw["format"]).batch_bounds(raw) is not None
        what = get_format(raw["format"]).bounds_name if bounded else "the model's fixed batch"
        raise CbamDeployError(f"{option} {batch} is outside {what} for {raw.get('name')} ({low}..{high}); use a batch "
                              "in that range or rebuild it with --min-batch/--max-batch")


def fit_batch(manifest, artifact, batch: int) -> int:
    """The largest batch <= ``batch`` the artifact runs in one call (serve's --max-batch, eval's chunk):
    ``batch`` itself when there is no limit."""
    limit = batch_limit(manifest, artifact)
    return batch if limit is None else max(limit[0], min(batch, limit[1]))
