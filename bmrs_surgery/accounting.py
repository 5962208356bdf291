"""Parameter accounting: what a keep-mask makes removable, as the paper counts it.

"Parameter compression" = share of trainable parameters that become removable: every weight that
reads from or writes to a pruned structure (incoming and outgoing weights, biases, per-channel norm
parameters, parameters added to a pruned channel), plus the pruned gates' two posterior parameters.
Every group lists the parameter dimensions its structures own (``slots``), so this holds for any
network the dependency analysis covers.
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


def alive_masks(model: nn.Module, bank: GateBank, keep: torch.Tensor) -> dict[str, torch.Tensor]:
    """For every parameter or buffer a structure owns: which of its entries survive ``keep``."""
    tensors = dict(model.named_parameters())
    tensors.update(dict(model.named_buffers()))
    keep = keep.bool().cpu()
    alive: dict[str, torch.Tensor] = {}
    for i, group in enumerate(bank.groups):
        k = torch.cat([keep[bank.slice_of(i)], torch.ones(1, dtype=torch.bool)])
        for slot in group.slots:
            t = tensors.get(slot.target)
            if t is None:
                continue
            idx = torch.as_tensor(slot.index, dtype=torch.long)
            along = k[torch.where(idx < 0, group.size, idx)]
            shape = [1] * t.ndim
            shape[slot.dim] = -1
            mask = alive.get(slot.target)
            if mask is None:
                mask = torch.ones(t.shape, dtype=torch.bool)
            alive[slot.target] = mask & along.reshape(shape)
    return alive


def removable_per_module(model: nn.Module, bank: GateBank, keep: torch.Tensor) -> dict[str, tuple[int, int]]:
    """(removable, total) trainable parameters of each module a structure touches, under ``keep``."""
    params = dict(model.named_parameters())
    result: dict[str, list[int]] = {}
    for target, mask in alive_masks(model, bank, keep).items():
        p = params.get(target)
        if p is None or not p.requires_grad:
            continue
        module = target.rpartition(".")[0]
        r = result.setdefault(module, [0, 0])
        r[0] += int((~mask).sum())
    for module, r in result.items():
        mod = model.get_submodule(module) if module else model
        r[1] = sum(p.numel() for p in mod.parameters(recurse=False) if p.requires_grad) or r[0]
    return {k: (v[0], v[1]) for k, v in result.items()}


def compression(model: nn.Module, bank: GateBank, keep: torch.Tensor | None = None) -> Compression:
    """Parameter compression of network ``model`` plus its gates if the structures off in ``keep``
    go (``model`` is the inner network: parameter names are those of the groups' slots)."""
    keep = bank.mask if keep is None else keep
    total = sum(p.numel() for p in model.parameters() if p.requires_grad) + 2 * bank.num_gates
    removable = sum(r for r, _ in removable_per_module(model, bank, keep).values())
    removable += 2 * int((keep == 0).sum())
    return Compression(total=total, removable=removable)
