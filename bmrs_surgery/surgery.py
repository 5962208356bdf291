"""Physical removal: shrink every coupled parameter, fold kept gates' E[theta], drop the gates.

Input: the dependency :class:`~bmrs_surgery.graph.groups.Analysis` of a gated model, its gate
bank and a keep-mask over all structures. Output: a plain ``torch.fx.GraphModule`` (torch ops and
the model's own leaf layers, no bmrs code) computing what the gated model computes in eval mode:

1. every tap's E[theta] (0 for pruned structures) is multiplied into the reading layer's input
   columns, which is exact because those layers are linear in their input;
2. every parameter dimension a structure owns is sliced to the kept indices, and the layers'
   size attributes (``in_channels``, ``out_features``, ``num_features``, ``groups``...) follow;
3. literal sizes in the graph (``view(B, N, 12, 64)``, ``chunk(2)``, ``expand(..., 768)``) are
   rewritten to the kept counts, and the graph is recompiled.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import fx, nn

from .errors import SurgeryError
from .gated import analysis_of, gate_bank, gates_removed
from .gates import GateBank
from .graph import registry
from .graph.groups import Analysis


def group_keep(bank: GateBank, keep: torch.Tensor) -> dict[int, np.ndarray]:
    """Keep-mask of each group, by the group's id."""
    keep = keep.bool().cpu()
    return {g.id: keep[bank.slice_of(i)].numpy() for i, g in enumerate(bank.groups)}


def _copy_without_gates(gm: fx.GraphModule) -> fx.GraphModule:
    with gates_removed(gm):
        return copy.deepcopy(gm)


def _owner(root: nn.Module, target: str) -> tuple[nn.Module, str]:
    module, _, name = target.rpartition(".")
    return (root.get_submodule(module) if module else root), name


def _replace_tensor(owner: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(owner, name)
    if isinstance(old, nn.Parameter):
        setattr(owner, name, nn.Parameter(value, requires_grad=old.requires_grad))
    elif name in owner._buffers:
        owner._buffers[name] = value
    else:
        setattr(owner, name, value)


def _rule(mod: nn.Module, name: str) -> registry.ModuleRule:
    rule = registry.module_rule(mod)
    if rule is None:
        raise SurgeryError(f"layer {name} ({type(mod).__name__}) has no rule to fold a gate into")
    return rule


def freeze_layers(model: nn.Module) -> None:
    """In place, before folding and slicing: each layer whose rule gives a plainer equivalent
    (``ModuleRule.freeze``) is replaced by it under the same name."""
    for name, mod in list(model.named_modules()):
        rule = registry.module_rule(mod) if name else None
        new = rule.freeze(mod) if rule is not None else None
        if new is not None:
            owner, attr = _owner(model, name)
            setattr(owner, attr, new)


def fold_expected(gm: fx.GraphModule, analysis: Analysis, expected: dict[int, np.ndarray]) -> None:
    """Multiply each tap's gate value into the input columns of the layer it scales (its rule's
    ``fold``); ``expected`` holds each group's E[theta] * mask by group id."""
    with torch.no_grad():
        for g in analysis.groups:
            e = np.append(np.asarray(expected[g.id], dtype=np.float64), 1.0)
            for tap in g.taps:
                side = getattr(tap, "side", "in")
                if side == "out":
                    _fold_output(gm, g, tap, e)
                    continue
                if side == "mask":  # the keep-mask alone: nothing to fold
                    continue
                mod = gm.get_submodule(tap.module)
                f = e[np.where(tap.index >= 0, tap.index, len(e) - 1)]
                if side == "divide":  # tied embeddings: the norm the output layer reads
                    from .graph.rules.transformers_layers import divide

                    divide(mod, f)
                else:
                    _rule(mod, tap.module).fold(mod, torch.as_tensor(f))


def _fold_output(gm: nn.Module, group, tap, e: np.ndarray) -> None:
    """A gate on a writer's output (a tap with ``side="out"``): its value multiplies the writer's
    output rows, i.e. every ``out`` slot the group owns in that layer (a linear layer's weight rows
    and bias, an embedding's columns), which is exact because the output is linear in them."""
    slots = [s for s in group.slots if s.module == tap.module and s.role == "out"]
    if not slots:
        raise SurgeryError(f"group {group.name}: the gate on the output of {tap.module} has no output rows to fold into")
    for s in slots:
        owner, name = _owner(gm, s.target)
        t = getattr(owner, name)
        f = torch.as_tensor(e[np.where(s.index >= 0, s.index, len(e) - 1)], dtype=t.dtype, device=t.device)
        shape = [1] * t.ndim
        shape[s.dim] = -1
        t.mul_(f.reshape(shape))


def slice_parameters(gm: fx.GraphModule, analysis: Analysis, keep: dict[int, np.ndarray]) -> set[str]:
    """Cut every owned parameter dimension down to its kept indices; returns the touched modules."""
    touched: set[str] = set()
    with torch.no_grad():
        for slot in analysis.propagation.slots:
            alive = analysis.kept(slot.ids, keep)
            if alive.all():
                continue
            owner, name = _owner(gm, slot.target)
            t = getattr(owner, name)
            idx = torch.as_tensor(np.flatnonzero(alive), device=t.device)
            _replace_tensor(owner, name, t.detach().index_select(slot.dim, idx).clone())
            touched.add(slot.target.rpartition(".")[0])
    return touched


def widths_before(gm: nn.Module) -> dict[str, int]:
    """The channel count of every layer whose rule rescales it after slicing (see ``ModuleRule.width``)."""
    out = {}
    for name, mod in gm.named_modules():
        rule = registry.module_rule(mod)
        width = rule.width(mod) if rule is not None else None
        if width is not None:
            out[name] = width
    return out


def rescale_after_slicing(gm: nn.Module, widths: dict[str, int]) -> None:
    """Each layer of ``widths`` rescaled by its rule for the channels it lost (``ModuleRule.rescale``)."""
    with torch.no_grad():
        for name, width in widths.items():
            mod = gm.get_submodule(name)
            registry.module_rule(mod).rescale(mod, width)


def update_sizes(gm: fx.GraphModule, touched: set[str]) -> None:
    """Make the layers' size attributes agree with their new parameter shapes (their rules' ``resize``)."""
    for name in touched:
        mod = gm.get_submodule(name) if name else gm
        rule = registry.module_rule(mod)
        if rule is not None:
            rule.resize(mod)


def _size_args(node: fx.Node) -> tuple[int, list]:
    """(first arg position holding sizes, sizes as a list) for view/reshape/expand nodes."""
    if node.op == "call_function":
        return 1, list(node.args[1])
    rest = node.args[1:]
    if len(rest) == 1 and isinstance(rest[0], (list, tuple)):
        return 1, list(rest[0])
    return -1, list(rest)


def rewrite_literals(gm: fx.GraphModule, analysis: Analysis, keep: dict[int, np.ndarray]) -> None:
    nodes = {n.name: n for n in gm.graph.nodes}
    for rw in analysis.propagation.rewrites:
        node = nodes[rw.node]
        counts = [int(analysis.kept(ids, keep).sum()) for ids in rw.ids]
        if rw.kind == "shape":
            pos, sizes = _size_args(node)
            sizes[rw.index] = counts[0]
            args = list(node.args)
            if pos == -1:
                node.args = (args[0], *sizes)
            else:
                args[pos] = tuple(sizes)
                node.args = tuple(args)
        elif rw.kind == "split":
            x = node.args[0]
            node.op = "call_function"
            node.target = torch.split
            node.args = (x, counts)
            node.kwargs = {"dim": rw.index}
    gm.graph.lint()
    gm.recompile()


def shrink(analysis: Analysis, bank: GateBank, keep: torch.Tensor | None = None) -> fx.GraphModule:
    """The pruned plain network for ``keep`` (default: the bank's mask). A keep-mask that empties
    a group is refused: plan it first (:func:`~bmrs_surgery.plan.plan_keep`)."""
    keep = bank.mask if keep is None else keep
    keep_by = group_keep(bank, keep)
    empty = [g.name for g in bank.groups if not keep_by[g.id].any()]
    if empty:
        raise SurgeryError(f"the keep-mask removes every structure of group {empty[0]}; a group keeps at least one")
    with torch.no_grad():
        e = (bank.expected().detach().double().cpu() * keep.double().cpu()).numpy()
    expected = {g.id: e[bank.slice_of(i)] for i, g in enumerate(bank.groups)}
    if getattr(analysis, "tracer", "fx") == "export":  # the eager model itself, sliced by qualified names
        from .graph.export_trace import shrink_module

        return shrink_module(analysis, expected, keep_by)
    gm = _copy_without_gates(analysis.gm)
    gm.eval()
    freeze_layers(gm)
    fold_expected(gm, analysis, expected)
    widths = widths_before(gm)
    touched = slice_parameters(gm, analysis, keep_by)
    update_sizes(gm, touched)
    rescale_after_slicing(gm, widths)
    rewrite_literals(gm, analysis, keep_by)
    return gm


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def pruned_network(gated: nn.Module, example_input: torch.Tensor | None = None) -> fx.GraphModule:
    """The plain smaller network for a gated model's current masks (E[theta] folded in, no gates).

    ``example_input`` is only needed for a gated model loaded from a file (to re-trace it).
    """
    bank = gate_bank(gated)
    if example_input is None and getattr(getattr(gated, "module", gated), "input_shape", None):
        example_input = torch.zeros((1,) + tuple(getattr(gated, "module", gated).input_shape))
    return shrink(analysis_of(gated, example_input), bank)
