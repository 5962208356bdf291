"""Equivalence proof: the shrunk network computes what the gated network computes in eval mode."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .gates import GateBank


@dataclass
class Proof:
    max_abs_diff: float
    scale: float
    tolerance: float
    inputs: int

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance * self.scale

    def to_dict(self) -> dict:
        return {"max_abs_diff": self.max_abs_diff, "output_scale": self.scale, "tolerance": self.tolerance,
                "inputs": self.inputs, "ok": self.ok}


def _tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _tensors(o)]
    return []


def outputs(model: nn.Module, inputs: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            return [[t.detach().float() for t in _tensors(model(x))] for x in inputs]
    finally:
        model.train(was)


def compare(reference: list[list[torch.Tensor]], candidate: list[list[torch.Tensor]], tolerance: float = 1e-4) -> Proof:
    diff, scale = 0.0, 0.0
    for ref, cand in zip(reference, candidate):
        if len(ref) != len(cand):
            return Proof(float("inf"), 1.0, tolerance, len(reference))
        for r, c in zip(ref, cand):
            if r.shape != c.shape:
                return Proof(float("inf"), 1.0, tolerance, len(reference))
            diff = max(diff, float((r - c).abs().max()) if r.numel() else 0.0)
            scale = max(scale, float(r.abs().max()) if r.numel() else 0.0)
    if diff != diff:  # NaN
        diff = float("inf")
    return Proof(diff, scale if scale > 0 else 1.0, tolerance, len(reference))


def prove(gated: nn.Module, pruned: nn.Module, inputs: list[torch.Tensor], tolerance: float = 1e-4) -> Proof:
    """Max abs output difference over ``inputs`` against ``tolerance`` x the gated output's scale."""
    return compare(outputs(gated, inputs), outputs(pruned, inputs), tolerance)


def random_inputs(shape: tuple[int, ...], count: int = 2, batch: int = 2, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn((batch,) + tuple(shape[1:]), generator=g) for _ in range(count)]


def failing_group(analysis, bank: GateBank, keep: torch.Tensor, gated: nn.Module, inputs, tolerance=1e-4):
    """The first group whose pruning alone breaks equivalence (None if each passes alone)."""
    from .surgery import shrink

    saved = bank.mask.clone()
    try:
        for i, site in enumerate(bank.sites):
            sl = bank.slice_of(i)
            if bool(keep[sl].all()):
                continue
            only = torch.ones_like(keep, dtype=torch.bool)
            only[sl] = keep[sl].bool()
            with torch.no_grad():
                bank.mask.copy_(only.to(bank.mask))
            try:
                pruned = shrink(analysis, bank, only)
                proof = prove(gated, pruned, inputs, tolerance)
            except Exception:  # noqa: BLE001 - a crash is a failure of this group
                return site
            if not proof.ok:
                return site
    finally:
        with torch.no_grad():
            bank.mask.copy_(saved)
    return None
