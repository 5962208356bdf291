"""Parameter accounting: what a keep-mask makes removable, as the paper counts it.

"Parameter compression" = share of trainable parameters that become removable: every weight that
reads from or writes to a pruned structure (incoming and outgoing weights, biases, per-channel norm
parameters), plus the pruned gates' two posterior parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .gates import GateBank


@dataclass
class Compression:
    total: int
    removable: int

    @property
    def ratio(self) -> float:
        return self.removable / self.total if self.total else 0.0


def _masks(model: nn.Module, bank: GateBank, keep: torch.Tensor):
    """Per module: (output keep-mask, input keep-mask), None where the dimension is not gated."""
    out_keep: dict[str, torch.Tensor] = {}
    in_keep: dict[str, torch.Tensor] = {}
    for i, site in enumerate(bank.sites):
        k = keep[bank.slice_of(i)].bool().cpu()
        for name in site.producers + site.norms:
            out_keep[name] = k
        for name in site.consumers:
            in_keep[name] = k.repeat_interleave(site.repeat)
    return out_keep, in_keep


def removable_per_module(model: nn.Module, bank: GateBank, keep: torch.Tensor) -> dict[str, tuple[int, int]]:
    """(removable, total) trainable parameters of each gated module under ``keep``."""
    out_keep, in_keep = _masks(model, bank, keep)
    result: dict[str, tuple[int, int]] = {}
    modules = dict(model.named_modules())
    for name in sorted(set(out_keep) | set(in_keep)):
        mod = modules[name]
        removable = total = 0
        for pname, p in mod.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            alive = torch.ones(p.shape, dtype=torch.bool)
            if name in out_keep:
                shape = [-1] + [1] * (p.ndim - 1)
                alive &= out_keep[name].reshape(shape)
            if name in in_keep and pname == "weight" and p.ndim >= 2:
                shape = [1, -1] + [1] * (p.ndim - 2)
                alive &= in_keep[name].reshape(shape)
            removable += int((~alive).sum())
            total += p.numel()
        result[name] = (removable, total)
    return result


def compression(model: nn.Module, bank: GateBank, keep: torch.Tensor | None = None) -> Compression:
    """Parameter compression of network ``model`` plus its gates if the structures off in ``keep``
    go (``model`` is the inner network: module names are those of the gate sites)."""
    keep = bank.mask if keep is None else keep
    total = sum(p.numel() for p in model.parameters() if p.requires_grad) + 2 * bank.num_gates
    removable = sum(r for r, _ in removable_per_module(model, bank, keep).values())
    removable += 2 * int((keep == 0).sum())
    return Compression(total=total, removable=removable)
