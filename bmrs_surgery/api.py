"""The user-facing API for one's own training loop.

    gated = bmrs_surgery.attach_gates(model, example_input)
    loss = task_loss + bmrs_surgery.kl_term(gated, num_train)   # every step
    result = bmrs_surgery.prune(gated, prior="uniform")         # once, or every few epochs

``attach_gates`` returns a :class:`GatedModel` wrapping ``model``: ``gated.model`` is the network
(with forward hooks that multiply the gated outputs, so ``model`` itself is gated too) and
``gated.bmrs_gates`` holds every gate's posterior parameters. ``gated.parameters()`` has both, so
one optimizer trains weights and gates.
"""

from __future__ import annotations

import contextlib

from dataclasses import dataclass

import torch
from torch import nn

from . import criteria as _criteria
from .accounting import compression
from .errors import NoGatesError
from .errors import GatePlacementError
from .gates import Gate, GateBank, GateSite
from .placement import analyse_model, sites_from_analysis

KL_WEIGHTINGS = ("mean", "elbo")


class GatedModel(nn.Module):
    """A network and the gate bank of its structures; forward runs the gated network."""

    def __init__(self, model: nn.Module, bank: GateBank, analysis=None):
        super().__init__()
        self.model = model
        self.bmrs_gates = bank
        object.__setattr__(self, "analysis", analysis)  # the dependency analysis (not saved)
        self.input_shape: tuple[int, ...] | None = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["analysis"] = None
        return state

    def forward(self, *args, **kwargs):
        self.bmrs_gates.begin_forward()
        try:
            return self.model(*args, **kwargs)
        finally:
            self.bmrs_gates.end_forward()
def attach_gates(
    model: nn.Module,
    example_input: torch.Tensor | None = None,
    *,
    sites: list[GateSite] | None = None,
    analysis=None,
    ignore: tuple[str, ...] = (),
    noise: str = "sample",
    init_log_sigma: float = -5.0,
) -> GatedModel:
    """Gate every prunable structure of ``model``: hooks on ``model``, parameters in the result.

    Either give ``example_input`` (one batch; sites are found by running it) or ``sites``.
    """
    if isinstance(model, GatedModel) or has_gate_hooks(model):
        raise ValueError("model already carries gates")
    if sites is None and analysis is None:
        if example_input is None:
            raise ValueError("attach_gates needs example_input or sites")
        analysis = analyse_model(model, example_input, ignore)
    if analysis is not None:
        sites = sites_from_analysis(analysis) if sites is None else sites
        model = analysis.network
    param = next(model.parameters(), None)
    bank = GateBank(sites, noise=noise, init_log_sigma=init_log_sigma)
    if param is not None:
        bank.to(param.device)
    _hook(model, bank)
    gated = GatedModel(model, bank, analysis)
    if analysis is not None:
        gated.input_shape = tuple(analysis.example_shape[1:])  # one example, for later surgery
    return gated


def _hook(model: nn.Module, bank: GateBank) -> None:
    modules = dict(model.named_modules())
    for i, site in enumerate(bank.sites):
        for t, tap in enumerate(site.taps):
            if tap["module"] not in modules:
                raise ValueError(f"gate site {site.name}: model has no module {tap['module']!r}")
        for t, tap in enumerate(site.taps):
            modules[tap["module"]].register_forward_pre_hook(Gate(bank, i, t))


def has_gate_hooks(net: nn.Module) -> bool:
    return any(isinstance(h, Gate) for m in net.modules() for h in m._forward_pre_hooks.values())


def remove_gate_hooks(net: nn.Module) -> None:
    for mod in net.modules():
        for hid, hook in list(mod._forward_pre_hooks.items()):
            if isinstance(hook, Gate):
                del mod._forward_pre_hooks[hid]


@contextlib.contextmanager
def gates_removed(net: nn.Module):
    """Run a block with ``net``'s gate hooks taken off (tracing, copying); they come back after."""
    saved = {id(m): dict(m._forward_pre_hooks) for m in net.modules()}
    remove_gate_hooks(net)
    try:
        yield net
    finally:
        for m in net.modules():
            m._forward_pre_hooks.update(saved[id(m)])


def detach_gates(gated: GatedModel) -> nn.Module:
    """Remove the gate hooks: the plain inner network again, weights untouched (masks ignored)."""
    gate_bank(gated)
    remove_gate_hooks(gated.model)
    return gated.model


def analysis_of(gated: nn.Module, example_input: torch.Tensor | None = None):
    """The dependency analysis behind a gated model's sites (re-run after loading, then checked)."""
    inner = getattr(gated, "module", gated)
    bank = gate_bank(inner)
    if inner.analysis is None:
        if example_input is None:
            raise ValueError("this gated model was loaded from a file: give an example input to re-analyse it")
        with gates_removed(inner.model) as net:
            analysis = analyse_model(net, example_input)
        sites = sites_from_analysis(analysis)
        if [(s.name, s.size, s.taps) for s in sites] != [(s.name, s.size, s.taps) for s in bank.sites]:
            raise GatePlacementError("the model's gates do not match its dependency graph (was it edited?)")
        object.__setattr__(inner, "analysis", analysis)
    return inner.analysis


def gate_bank(model: nn.Module) -> GateBank:
    """The gate bank of a gated model (unwrapping DistributedDataParallel and the like)."""
    inner = getattr(model, "module", model)
    if not isinstance(inner, GatedModel):
        raise NoGatesError("model carries no BMRS gates (attach them with bmrs_surgery.attach_gates)")
    return inner.bmrs_gates


def network(model: nn.Module) -> nn.Module:
    """The gated network inside a GatedModel (or DDP around one)."""
    gate_bank(model)
    return getattr(model, "module", model).model


def has_gates(model: nn.Module) -> bool:
    return isinstance(getattr(model, "module", model), GatedModel)


def kl_term(model: nn.Module, num_train: int | None = None, weighting: str = "mean") -> torch.Tensor:
    """The KL part of the loss to add to a mean task loss.

    ``weighting="mean"`` (default): mean KL over structures, the authors' code; ``"elbo"``: summed
    KL divided by the number of training examples ``num_train``, the negative ELBO per example.
    """
    bank = gate_bank(model)
    if weighting == "mean":
        return bank.kl("mean")
    if weighting == "elbo":
        if not num_train:
            raise ValueError("weighting='elbo' needs num_train, the size of the training set")
        return bank.kl("sum") / num_train
    raise ValueError(f"weighting must be one of {KL_WEIGHTINGS}, got {weighting!r}")


def scores(model: nn.Module, prior: str = "normal", precision_bits: int = 8) -> torch.Tensor:
    """dF of every structure in gate order (float64); prune where >= 0."""
    crit = "bmrs_n" if prior == "normal" else "bmrs_u" if prior == "uniform" else prior
    return decision(model, crit, precision_bits=precision_bits).score


def decision(model: nn.Module, criterion: str = "bmrs_n", **opts) -> _criteria.Decision:
    return _criteria.decide(network(model), gate_bank(model), criterion, **opts)


@dataclass
class PruneResult:
    criterion: str
    keep: torch.Tensor
    score: torch.Tensor
    per_site: dict[str, tuple[int, int]]  # name -> (kept, total)
    compression: float

    @property
    def kept_fraction(self) -> float:
        return float(self.keep.float().mean())


def apply_decision(model: nn.Module, dec: _criteria.Decision) -> PruneResult:
    """Set the gate masks from a decision (masks are replaced, not accumulated)."""
    bank = gate_bank(model)
    with torch.no_grad():
        bank.mask.copy_(dec.keep.to(bank.mask))
    per_site = {
        s.name: (int(dec.keep[bank.slice_of(i)].sum()), s.size) for i, s in enumerate(bank.sites)
    }
    return PruneResult(
        criterion=dec.criterion,
        keep=dec.keep.clone(),
        score=dec.score,
        per_site=per_site,
        compression=compression(network(model), bank, dec.keep).ratio,
    )


def criterion_for(prior: str) -> str:
    """The BMRS criterion of a reduced prior: "normal" -> bmrs_n, "uniform" -> bmrs_u."""
    if prior not in ("normal", "uniform"):
        raise ValueError(f"prior must be 'normal' or 'uniform', got {prior!r}")
    return "bmrs_n" if prior == "normal" else "bmrs_u"


def prune(
    model: nn.Module, prior: str = "normal", precision_bits: int = 8, criterion: str | None = None, **opts
) -> PruneResult:
    """Score every gate and mask the structures to drop: BMRS_N (``prior="normal"``) or BMRS_U
    (``prior="uniform"``, ``precision_bits``), or any ``criterion`` of :mod:`criteria`."""
    if criterion is None:
        criterion = criterion_for(prior)
    return apply_decision(model, decision(model, criterion, precision_bits=precision_bits, **opts))


def unmask(model: nn.Module) -> None:
    """Turn every gate back on."""
    with torch.no_grad():
        gate_bank(model).mask.fill_(1.0)
