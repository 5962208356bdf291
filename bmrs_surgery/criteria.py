"""Keep/prune decisions on fitted gates: BMRS_N, BMRS_U and the paper's baselines, by name.

Each criterion returns a :class:`Decision`: a float64 score per structure and a boolean keep-mask.
For BMRS the score is dF (prune where dF >= 0, no threshold); for the baselines it is the quantity
thresholded (SNR, E[theta], L2 norm of incoming weights). Criteria are registered by name
(:func:`register_criterion`); :func:`decision`, :func:`prune` and :func:`apply_decision` apply
one to a gated model, and a decision never empties a group (see :mod:`plan`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from . import bmrs, defaults
from .accounting import compression
from .errors import FitError, JobError
from .gated import gate_bank, network
from .gates import GateBank
from .plan import plan_keep


@dataclass
class Decision:
    criterion: str
    score: torch.Tensor  # float64, one per structure
    keep: torch.Tensor  # bool, one per structure
    lower_is_better: bool = True  # dF: the most negative is the surest keep; SNR, E[theta], L2: the largest


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
    return Decision("snr", s, s >= threshold, lower_is_better=False)


def expected(bank: GateBank, threshold: float = 0.1) -> Decision:
    mu, ls = _params(bank)
    e = bmrs.expected_theta(mu, ls, bank.a, bank.b)
    return Decision("expected", e, e >= threshold, lower_is_better=False)


def incoming_l2(model: nn.Module, bank: GateBank) -> torch.Tensor:
    """L2 norm of each structure's incoming weights (producer rows and biases), float64."""
    params = dict(model.named_parameters())
    norms = []
    for group in bank.groups:
        sq = torch.zeros(group.size + 1, dtype=torch.float64)
        for slot in group.slots:
            if slot.role not in ("out", "param") or slot.target not in params:
                continue
            p = params[slot.target].detach().double().cpu().movedim(slot.dim, 0)
            rows = p.reshape(p.shape[0], -1).pow(2).sum(1)
            idx = torch.as_tensor(slot.index, dtype=torch.long)
            sq.index_add_(0, torch.where(idx < 0, group.size, idx), rows)
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
    score = incoming_l2(model, bank)
    n = score.numel()
    if per_layer:
        # rank of each structure within its group, as a share of the group (0 = smallest norm)
        share = torch.empty(n, dtype=torch.float64)
        for i in range(len(bank.groups)):
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
    return Decision("l2", score, keep_with(lo), lower_is_better=False)


_CRITERIA: dict[str, Callable[..., Decision]] = {}


def register_criterion(name: str):
    """Decorator: ``fn(model, bank, **opts) -> Decision`` under ``name`` (extra options ignored)."""

    def deco(fn):
        if name in _CRITERIA:
            raise ValueError(f"criterion {name!r} is already registered")
        _CRITERIA[name] = fn
        return fn

    return deco


register_criterion("bmrs_n")(lambda model, bank, prior_mu=None, prior_var=1e-12, **_: bmrs_n(bank, prior_mu, prior_var))
register_criterion("bmrs_u")(lambda model, bank, precision_bits=defaults.PRECISION_BITS, **_: bmrs_u(bank, precision_bits))
register_criterion("snr")(lambda model, bank, threshold=1.0, **_: snr(bank, threshold))
register_criterion("expected")(lambda model, bank, threshold=0.1, **_: expected(bank, threshold))
register_criterion("bmrs_n_code")(
    lambda model, bank, prior_mu=None, prior_var=1e-12, **_: bmrs_n_code(bank, prior_mu, prior_var))


@register_criterion("l2")
def _l2(model, bank, target_compression=None, per_layer=False, **_):
    if target_compression is None:
        raise JobError("criterion 'l2' needs target_compression", param="criterion_opts")
    return l2(model, bank, target_compression, per_layer)


CRITERIA = tuple(_CRITERIA)


def decide(model: nn.Module, bank: GateBank, criterion: str, **opts) -> Decision:
    """The decision of the criterion registered as ``criterion`` (see :data:`CRITERIA`)."""
    fn = _CRITERIA.get(criterion)
    if fn is None:
        raise JobError(f"unknown criterion {criterion!r}; expected one of {', '.join(_CRITERIA)}", param="criterion")
    check_posteriors(bank)
    dec = fn(model, bank, **opts)
    bad = ~torch.isfinite(dec.score)
    if bool(bad.any()):  # a NaN compares false with everything: it would silently count as "prune"
        i = int(bad.nonzero()[0])
        raise FitError(f"{dec.criterion} score of structure {_locate(bank, i)} is {float(dec.score[i])}: "
                       "nothing is pruned on a non-finite score")
    return dec


def _locate(bank: GateBank, i: int) -> str:
    """``"3 of group conv1"`` for structure ``i`` in gate order."""
    for g, group in enumerate(bank.groups):
        sl = bank.slice_of(g)
        if sl.start <= i < sl.stop:
            return f"{i - sl.start} of group {group.name}"
    return str(i)


def check_posteriors(bank: GateBank) -> None:
    """Every gate posterior is finite (a :class:`~.errors.FitError` naming the group otherwise)."""
    for name, t in (("mu", bank.mu), ("log_sigma", bank.log_sigma)):
        bad = ~torch.isfinite(t.detach())
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise FitError(f"gate posterior {name} of structure {_locate(bank, i)} is {float(t.detach()[i])}")


def criterion_for(prior: str) -> str:
    """The BMRS criterion of a reduced prior: "normal" -> bmrs_n, "uniform" -> bmrs_u."""
    if prior not in ("normal", "uniform"):
        raise JobError(f"must be 'normal' or 'uniform', got {prior!r}", param="prior")
    return "bmrs_n" if prior == "normal" else "bmrs_u"


def decision(model: nn.Module, criterion: str = "bmrs_u", **opts) -> Decision:
    """The decision of ``criterion`` on a gated model's current posteriors (masks not changed)."""
    return decide(network(model), gate_bank(model), criterion, **opts)


def scores(model: nn.Module, prior: str = defaults.PRIOR, precision_bits: int = defaults.PRECISION_BITS) -> torch.Tensor:
    """dF of every structure in gate order (float64); prune where >= 0."""
    crit = criterion_for(prior) if prior in ("normal", "uniform") else prior
    return decision(model, crit, precision_bits=precision_bits).score


@dataclass
class PruneResult:
    criterion: str
    keep: torch.Tensor
    score: torch.Tensor
    per_group: dict[str, tuple[int, int]]  # group name -> (kept, total)
    compression: float

    @property
    def kept_fraction(self) -> float:
        return float(self.keep.float().mean())


def apply_decision(model: nn.Module, dec: Decision, round_to: int | None = None) -> PruneResult:
    """Set the gate masks from a decision (replaced, not accumulated), made valid first: no group
    is emptied (its best structure stays) and, with ``round_to``, widths are rounded up."""
    bank = gate_bank(model)
    keep = plan_keep(bank, dec.keep, dec.score if dec.lower_is_better else -dec.score, round_to)
    with torch.no_grad():
        bank.mask.copy_(keep.to(bank.mask))
    per_group = {g.name: (int(keep[bank.slice_of(i)].sum()), g.size) for i, g in enumerate(bank.groups)}
    return PruneResult(
        criterion=dec.criterion,
        keep=keep,
        score=dec.score,
        per_group=per_group,
        compression=compression(network(model), bank, keep).ratio,
    )


def prune(model: nn.Module, prior: str = defaults.PRIOR, precision_bits: int = defaults.PRECISION_BITS,
          criterion: str | None = None, round_to: int | None = defaults.ROUND_TO, **opts) -> PruneResult:
    """Score every gate and mask the structures to drop: BMRS_U (``prior="uniform"``,
    ``precision_bits``) or BMRS_N (``prior="normal"``), or any registered ``criterion``. A group
    is never emptied: where every structure scores for removal, its best one stays."""
    if criterion is None:
        criterion = criterion_for(prior)
    dec = decision(model, criterion, precision_bits=precision_bits, **opts)
    return apply_decision(model, dec, round_to)
