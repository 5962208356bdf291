"""A network with BMRS gates: :class:`GatedModel`, the hooks that apply the gates, and the
functions that find a gated model's parts.

``attach_gates(model, example)`` analyses ``model``, makes one :class:`~.gates.GateBank` entry per
structure of every coupled group, and registers a forward *pre*-hook on each layer that reads a
group's channels through its weights: the gate multiplies that layer's input, so a zero gate
removes the structure's whole contribution, and a kept gate's E[theta] folds exactly into the
layer's input columns at surgery. ``model`` itself is gated too (the hooks sit on it). The
residual stream of an RMSNorm transformer is gated on its writers instead: forward hooks that scale
their outputs (taps with ``side="out"``, see ``graph.export_trace.stream_groups``).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from . import defaults
from .errors import GatePlacementError, JobError, NoGatesError
from .gates import Gate, GateBank, MaskGate, OutputGate
from .graph.group import Group
from .placement import analyse_model

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
    groups: list[Group] | None = None,
    analysis=None,
    ignore: tuple[str, ...] = (),
    noise: str = defaults.NOISE,
    init_log_sigma: float = defaults.INIT_LOG_SIGMA,
) -> GatedModel:
    """Gate every prunable structure of ``model``: hooks on ``model``, parameters in the result.

    Either give ``example_input`` (one batch; the groups are found by running it) or ``groups``
    (from an analysis, or a checkpoint). Each gate scales the input of a layer that reads its
    group's channels.
    """
    if isinstance(model, GatedModel) or has_gate_hooks(model):
        raise JobError("model already carries gates", param="model")
    if groups is None and analysis is None:
        if example_input is None:
            raise JobError("attach_gates needs example_input or groups", param="example_input")
        analysis = analyse_model(model, example_input, ignore)
    if analysis is not None:
        groups = analysis.groups if groups is None else groups
        model = analysis.network
    param = next(model.parameters(), None)
    bank = GateBank(groups, noise=noise, init_log_sigma=init_log_sigma)
    if param is not None:
        bank.to(param.device)
    _hook(model, bank)
    gated = GatedModel(model, bank, analysis)
    if analysis is not None:
        gated.input_shape = tuple(analysis.example_shape[1:])  # one example, for later surgery
    return gated


def _hook(model: nn.Module, bank: GateBank) -> None:
    modules = dict(model.named_modules())
    for i, group in enumerate(bank.groups):
        for tap in group.taps:
            if tap.module not in modules:
                raise GatePlacementError(f"group {group.name}: model has no module {tap.module!r}")
        for t, tap in enumerate(group.taps):
            side = getattr(tap, "side", "in")
            if side == "out":  # a writer of the residual stream: its output
                modules[tap.module].register_forward_hook(OutputGate(bank, i, t))
            elif side == "mask":  # a norm over the channels: the keep-mask alone
                modules[tap.module].register_forward_pre_hook(MaskGate(bank, i, t))
            elif side == "divide":  # tied embeddings: surgery's, no gate runs here
                continue
            else:
                modules[tap.module].register_forward_pre_hook(Gate(bank, i, t))


def has_gate_hooks(net: nn.Module) -> bool:
    return any(isinstance(h, Gate) for m in net.modules()
               for h in (*m._forward_pre_hooks.values(), *m._forward_hooks.values()))


def remove_gate_hooks(net: nn.Module) -> None:
    for mod in net.modules():
        for hooks in (mod._forward_pre_hooks, mod._forward_hooks):
            for hid, hook in list(hooks.items()):
                if isinstance(hook, Gate):
                    del hooks[hid]


@contextlib.contextmanager
def gates_removed(net: nn.Module):
    """Run a block with ``net``'s gate hooks taken off (tracing, copying); they come back after."""
    saved = {id(m): (dict(m._forward_pre_hooks), dict(m._forward_hooks)) for m in net.modules()}
    remove_gate_hooks(net)
    try:
        yield net
    finally:
        for m in net.modules():
            m._forward_pre_hooks.update(saved[id(m)][0])
            m._forward_hooks.update(saved[id(m)][1])


def detach_gates(gated: GatedModel) -> nn.Module:
    """Remove the gate hooks: the plain inner network again, weights untouched (masks ignored)."""
    gate_bank(gated)
    remove_gate_hooks(gated.model)
    return gated.model


def analysis_of(gated: nn.Module, example_input=None):
    """The dependency analysis behind a gated model's sites (re-run after loading, then checked);
    ``example_input``: a tensor, or a dict of named inputs (re-captured with torch.export)."""
    if isinstance(example_input, dict):
        from .deploy import named_analysis

        return named_analysis(gated, example_input)
    inner = getattr(gated, "module", gated)
    bank = gate_bank(inner)
    if inner.analysis is None:
        if example_input is None:
            raise JobError("this gated model was loaded from a file: give an example input to re-analyse it",
                           param="example_input")
        with gates_removed(inner.model) as net:
            analysis = analyse_model(net, example_input)
        if len(analysis.groups) != len(bank.groups) or not all(
                a.same_structure(b) for a, b in zip(analysis.groups, bank.groups)):
            raise GatePlacementError("the model's gates do not match its dependency graph (was it edited?)")
        bank.groups = list(analysis.groups)  # the same groups, now with their channel classes
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


def kl_term(model: nn.Module, num_train: int | None = None, weighting: str = defaults.KL_WEIGHTING) -> torch.Tensor:
    """The KL part of the loss to add to a mean task loss.

    ``weighting="mean"`` (default): mean KL over structures, the authors' code; ``"elbo"``: summed
    KL divided by the number of training examples ``num_train``, the negative ELBO per example.
    """
    bank = gate_bank(model)
    if weighting == "mean":
        return bank.kl("mean")
    if weighting == "elbo":
        if not num_train:
            raise JobError("weighting='elbo' needs num_train, the size of the training set", param="num_train")
        return bank.kl("sum") / num_train
    raise JobError(f"must be one of {KL_WEIGHTINGS}, got {weighting!r}", param="kl_weighting")


def unmask(model: nn.Module) -> None:
    """Turn every gate back on."""
    with torch.no_grad():
        gate_bank(model).mask.fill_(1.0)
