"""From a keep-mask to a valid prune plan: no group emptied, widths optionally rounded.

A group whose every structure would go is given back its best structure (lowest score: for BMRS
the most negative dF), so no layer loses all its channels. With ``round_to=k`` each group keeps
just enough extra structures (best scores first) for its kept channel count to be a multiple of
``k`` (e.g. 8 for vector units), never more than it has.
"""

from __future__ import annotations

import math

import torch

from .errors import JobError
from .gates import GateBank


def plan_keep(bank: GateBank, keep: torch.Tensor, score: torch.Tensor | None = None,
              round_to: int | None = None) -> torch.Tensor:
    """``keep`` made valid: at least one structure per group, and rounded widths with ``round_to``."""
    keep = keep.bool().clone().cpu()
    score = torch.zeros(keep.shape, dtype=torch.float64) if score is None else score.double().cpu()
    if round_to is not None and round_to < 1:
        raise JobError("must be a positive integer", param="round_to")
    for i, group in enumerate(bank.groups):
        sl = bank.slice_of(i)
        k = keep[sl]
        target = max(1, int(k.sum()))
        if round_to:
            c = group.channels_per_structure
            step = round_to // math.gcd(c, round_to)
            target = min(group.size, math.ceil(target / step) * step)
        missing = target - int(k.sum())
        if missing > 0:
            pruned = torch.nonzero(~k).flatten()
            best = pruned[torch.argsort(score[sl][pruned], stable=True)[:missing]]
            k[best] = True
            keep[sl] = k
    return keep
