"""Where gates go: one gate per structure of every coupled group of the dependency analysis.

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
from .graph.group import Group
from .graph.groups import Analysis, analyse


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


def find_groups(model: nn.Module, example: torch.Tensor, ignore: tuple[str, ...] = ()) -> list[Group]:
    """The coupled groups of ``model``, one gate per structure of each (any traceable network)."""
    return analyse_model(model, example, ignore).groups
