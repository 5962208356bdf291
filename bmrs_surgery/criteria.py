"""Keep/prune decisions on fitted gates: BMRS_N, BMRS_U and the paper's baselines.

Each criterion returns a :class:`Decision`: a float64 score per structure and a boolean keep-mask.
For BMRS the score is dF (prune where dF >= 0, no threshold); for the baselines it is the quantity
thresholded (SNR, E[theta], L2 norm of incoming weights).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from . import bmrs
from .accounting import compression
from .gates import GateBank

CRITERIA = ("bmrs_n", "bmrs_u", "snr", "expected", "l2", "bmrs_n_code")


@dataclass
class Decision:
    criterion: str
    score: torch.Tensor  # float64, one per structure
    keep: torch.Tensor  # bool, one per structure


def _params(bank: GateBank):
    return bank.mu.detach().double().cpu(), bank.log_sigma.detach().double().cpu()


def bmrs_n(bank: GateBank, prior_mu: float | None = None, prior_var: float = 1e-12) -> Decision:
    mu, ls = _params(bank)
    pm = bank.a if prior_mu is None else prior_mu
    df = bmrs.delta_f(mu, ls, "normal", prior_mu=pm, prior_var=prior_var, a=bank.a, b=bank.b)
    return Decision("bmrs_n", df, df < 0)


def bmrs_n_code(bank: GateBank, prior_mu: float | None = None, prior_var: float = 1e-12) -> Decision:
    """BMRS_N as the authors' released code computes it: Eq. 8 without the 2 pi, so dF is larger by
    0.5 log(2 pi) = 0.919. Not the project's rule (the paper's Eq. 8 is exact); kept to compare with
    the paper's published numbers, which came from that code."""
    dec = bmrs_n(bank, prior_mu, prior_var)
    df = dec.score + 0.5 * math.log(2.0 * math.pi)
    return Decision("bmrs_n_code", df, df < 0)


def bmrs_u(bank: GateBank, precision_bits: int = 8) -> Decision:
    mu, ls = _params(bank)
    df = bmrs.delta_f(mu, ls, "uniform", precision_bits, a=bank.a, b=bank.b)
    return Decision(f"bmrs_u{precision_bits}", df, df < 0)


def snr(bank: GateBank, threshold: float = 1.0) -> Decision:
    mu, ls = _params(bank)
    s = bmrs.snr(mu, ls, bank.a, bank.b)
    return Decision("snr", s, s >= threshold)


def expected(bank: GateBank, threshold: float = 0.1) -> Decision:
    mu, ls = _params(bank)
    e = bmrs.expected_theta(mu, ls, bank.a, bank.b)
    return Decision("expected", e, e >= threshold)


def incoming_l2(model: nn.Module, bank: GateBank) -> torch.Tensor:
    """L2 norm of each structure's incoming weights (producer rows and biases), float64."""
    params = dict(model.named_parameters())
    norms = []
    for site in bank.sites:
        sq = torch.zeros(site.size + 1, dtype=torch.float64)
        for slot in site.slots:
            if slot["role"] not in ("out", "param") or slot["target"] not in params:
                continue
            p = params[slot["target"]].detach().double().cpu().movedim(slot["dim"], 0)
            rows = p.reshape(p.shape[0], -1).pow(2).sum(1)
            idx = torch.as_tensor(slot["index"], dtype=torch.long)
            sq.index_add_(0, torch.where(idx < 0, site.size, idx), rows)
        norms.append(sq[:-1].sqrt())
    return torch.cat(norms)


def l2(model: nn.Module, bank: GateBank, target_compression: float, per_layer: bool = False) -> Decision:
    """Prune the smallest-L2 structures until compression >= target.

    One global ranking (the paper's single threshold), or with ``per_layer`` the same share of
    every group, each ranked on its own (Torch-Pruning's default for magnitude pruning). Norms of
    layers with different fan-in are not comparable: on the paper's MLP the global ranking keeps
    12 first-layer units and 1 second-layer unit at 93%, a 1-unit bottleneck. Either way every group
    keeps at least its largest structure: a global threshold otherwise empties whole layers of
    small-norm structures, and the network then outputs a constant.
    """
    from .plan import plan_keep

    score = incoming_l2(model, bank)
    n = score.numel()
    if per_layer:
        # rank of each structure within its group, as a share of the group (0 = smallest norm)
        share = torch.empty(n, dtype=torch.float64)
        for i in range(len(bank.sites)):
            sl = bank.slice_of(i)
            share[sl] = torch.argsort(torch.argsort(score[sl])).double() / (sl.stop - sl.start)
        order = torch.argsort(share, stable=True)  # pruning k structures = the k lowest shares
    else:
        order = torch.argsort(score)

    def keep_with(k: int) -> torch.Tensor:
        keep = torch.ones(n, dtype=torch.bool)
        keep[order[:k]] = False
        return plan_keep(bank, keep, -score)

    lo, hi = 0, n  # smallest k with compression >= target (compression grows with k)
    while lo < hi:
        mid = (lo + hi) // 2
        if compression(model, bank, keep_with(mid)).ratio >= target_compression:
            hi = mid
        else:
            lo = mid + 1
    return Decision("l2", score, keep_with(lo))


def decide(model: nn.Module, bank: GateBank, criterion: str, **opts) -> Decision:
    """Dispatch by name: bmrs_n, bmrs_u, snr, expected, l2 (l2 needs target_compression)."""
    if criterion == "bmrs_n":
        return bmrs_n(bank, opts.get("prior_mu"), opts.get("prior_var", 1e-12))
    if criterion == "bmrs_n_code":
        return bmrs_n_code(bank, opts.get("prior_mu"), opts.get("prior_var", 1e-12))
    if criterion == "bmrs_u":
        return bmrs_u(bank, opts.get("precision_bits", 8))
    if criterion == "snr":
        return snr(bank, opts.get("threshold", 1.0))
    if criterion == "expected":
        return expected(bank, opts.get("threshold", 0.1))
    if criterion == "l2":
        return l2(model, bank, opts["target_compression"], opts.get("per_layer", False))
    raise ValueError(f"unknown criterion {criterion!r}; expected one of {', '.join(CRITERIA)}")
