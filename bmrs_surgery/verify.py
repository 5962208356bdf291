"""Equivalence proof: the shrunk network computes what the gated network computes in eval mode."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import ModelLoadError
from .gates import GateBank
from .inputs import output_tensors


@dataclass
class Proof:
    max_abs_diff: float
    scale: float
    tolerance: float
    inputs: int
    problem: str | None = None  # why the networks cannot be equivalent, whatever the outputs say

    @property
    def ok(self) -> bool:
        return self.problem is None and self.max_abs_diff <= self.tolerance * self.scale

    def to_dict(self) -> dict:
        return {"max_abs_diff": self.max_abs_diff, "output_scale": self.scale, "tolerance": self.tolerance,
                "inputs": self.inputs, "ok": self.ok, "problem": self.problem}


def max_abs_diff(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """max |reference - candidate|; infinite when either holds a NaN or an infinity (a NaN never
    passes a comparison: ``max(d, nan)`` would silently keep ``d``)."""
    if reference.numel() == 0:
        return 0.0
    if not (bool(torch.isfinite(reference).all()) and bool(torch.isfinite(candidate).all())):
        return float("inf")
    return float((reference.double() - candidate.double()).abs().max())


def nonfinite_tensor(t: torch.Tensor) -> str | None:
    """What is not finite in a floating-point tensor ("NaN (3 of 120 values)", "an infinity (...)"), else None."""
    if not (t.is_floating_point() or t.is_complex()) or t.numel() == 0:
        return None
    finite = torch.isfinite(t)
    if bool(finite.all()):
        return None
    nan = int(torch.isnan(t).sum())
    bad = int((~finite).sum())
    kind = "NaN" if nan else "an infinity"
    return f"{kind} ({bad} of {t.numel()} values not finite)"


def check_weights(net: nn.Module, spec: str) -> None:
    """Every parameter and buffer of a loaded model is a finite floating-point tensor (integer and
    complex weights are refused, not cast; integer buffers such as BatchNorm's batch count are fine)."""
    for kind, items in (("parameter", net.named_parameters()), ("buffer", net.named_buffers())):
        for name, t in items:
            if t.is_complex() or (kind == "parameter" and not t.is_floating_point()):
                raise ModelLoadError(f"{spec}: {kind} {name} is {str(t.dtype).replace('torch.', '')}; weights must be "
                                     "real floating-point numbers (not cast)")
            bad = nonfinite_tensor(t) if t.is_floating_point() else None
            if bad:
                raise ModelLoadError(f"{spec}: {kind} {name} holds {bad}")


def max_abs(t: torch.Tensor) -> float:
    return float(t.abs().max()) if t.numel() else 0.0


def emptied_layers(model: nn.Module) -> list[str]:
    """Parameters with a dimension of size 0: a layer pruned away entirely (never a valid result)."""
    return [name for name, p in model.named_parameters() if p.numel() == 0 and p.ndim > 0]


def outputs(model: nn.Module, inputs: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            return [[t.detach().float() for t in output_tensors(model(x))] for x in inputs]
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
            diff = max(diff, max_abs_diff(r, c))
            scale = max(scale, max_abs(r))
    return Proof(diff, scale if scale > 0 else 1.0, tolerance, len(reference))


def prove(gated: nn.Module, pruned: nn.Module, inputs: list[torch.Tensor], tolerance: float = 1e-4,
          reference: list[list[torch.Tensor]] | None = None) -> Proof:
    """Max abs output difference over ``inputs`` against ``tolerance`` x the gated output's scale;
    a pruned network with an emptied layer fails whatever its outputs (a group is never emptied).
    ``reference``: the gated network's :func:`outputs` on ``inputs``, when already computed."""
    reference = outputs(gated, inputs) if reference is None else reference
    proof = compare(reference, outputs(pruned, inputs), tolerance)
    empty = emptied_layers(pruned)
    if empty:
        proof.problem = f"layer parameter {empty[0]} was pruned to size 0"
    return proof


def random_inputs(shape: tuple[int, ...], count: int = 2, batch: int = 2, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn((batch,) + tuple(shape[1:]), generator=g) for _ in range(count)]


def failing_group(analysis, bank: GateBank, keep: torch.Tensor, gated: nn.Module, inputs, tolerance=1e-4):
    """The first group whose pruning alone breaks equivalence (None if each passes alone)."""
    from .surgery import shrink

    saved = bank.mask.clone()
    try:
        for i, group in enumerate(bank.groups):
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
                return group
            if not proof.ok:
                return group
    finally:
        with torch.no_grad():
            bank.mask.copy_(saved)
    return None
