"""Where gates go: one gate site per coupled group of the dependency analysis.

A group's gate multiplies the *inputs of the layers that read the group's channels through their
weights* (its taps), so a zero gate removes the structure's whole contribution wherever it flows
(through norms, activations, pooling, residual additions, concatenations) and a kept gate's
E[theta] folds exactly into those layers' input columns. For a chain of layers this is the
paper's gate after each layer's activation.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import GatePlacementError
from .gates import GateSite
from .graph.groups import Analysis, analyse


def sites_from_analysis(analysis: Analysis) -> list[GateSite]:
    sites: list[GateSite] = []
    used: set[str] = set()
    for g in analysis.groups:
        producers = _unique(s.module or s.target for s in g.slots if s.role in ("out", "param"))
        norms = _unique(s.module for s in g.slots if s.role == "norm")
        consumers = _unique(t.module for t in g.taps)
        name = producers[0] if producers else f"group{g.id}"
        if name in used:
            name = f"{name}#{g.id}"
        used.add(name)
        sites.append(GateSite(
            name=name, size=g.size, kind=g.kind,
            taps=[{"module": t.module, "axis": t.axis, "index": t.index.tolist()} for t in g.taps],
            slots=[{"target": s.target, "dim": s.dim, "index": s.index.tolist(), "role": s.role,
                    "module": s.module} for s in g.slots],
            producers=producers, norms=norms, consumers=consumers,
        ))
    return sites


def _unique(items) -> list[str]:
    return list(dict.fromkeys(i for i in items if i))


def find_gate_sites(
    model: nn.Module, example: torch.Tensor, ignore: tuple[str, ...] = ()
) -> list[GateSite]:
    """Gate sites for every prunable structure of ``model`` (any fx-traceable network)."""
    return sites_from_analysis(analyse_model(model, example, ignore))


def analyse_model(model: nn.Module, example: torch.Tensor, ignore: tuple[str, ...] = ()) -> Analysis:
    """The dependency analysis, with the errors a user can cause turned into GatePlacementError."""
    if not any(True for _ in model.parameters()):
        raise GatePlacementError(f"{type(model).__name__} has no parameters: nothing to prune")
    analysis = analyse(model, example[:1] if example.ndim > 1 and example.shape[0] > 1 else example, ignore)
    if not analysis.groups:
        why = analysis.propagation.opaque
        hint = f" ({why[0][0]}: {why[0][1]})" if why else ""
        raise GatePlacementError(
            f"{type(model).__name__} has no prunable structure outside its output layer{hint}"
        )
    return analysis
