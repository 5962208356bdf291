"""Where gates go in a chain-structured network.

Runs the model once on an example input, records the order in which leaf modules are called and
their output shapes, and walks that order: after each prunable layer (Linear, Conv) it skips the
channel-preserving layers that follow (BatchNorm, elementwise activations, dropout, pooling) and
places the gate after the last of them (for theta >= 0 a gate commutes with max and average pooling), so that a zero gate removes the structure's whole contribution. The next
prunable layer is the consumer (a flatten in between gives ``repeat`` inputs per channel).
The final layer (the classifier's outputs) and layers named in ``ignore`` get no gate.

This covers the paper's networks and other chains. Branching networks (residual additions,
concatenations) need the dependency graph, which checks coupling; here a consumer whose input
size does not match the producer's structures is reported as an error naming the module.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import GatePlacementError
from .gates import GateSite

PRODUCERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
ELEMENTWISE = (
    nn.ReLU, nn.ReLU6, nn.Tanh, nn.Sigmoid, nn.GELU, nn.SiLU, nn.ELU, nn.LeakyReLU, nn.Hardswish,
    nn.Hardtanh, nn.Mish, nn.Softplus, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
)
POOLS = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
)


def _leaf_calls(model: nn.Module, example: torch.Tensor) -> list[tuple[str, nn.Module, tuple]]:
    calls: list[tuple[str, nn.Module, tuple]] = []
    handles = []
    for name, mod in model.named_modules():
        if name and not list(mod.children()):
            def hook(m, i, o, name=name):
                if isinstance(o, torch.Tensor):
                    calls.append((name, m, tuple(o.shape)))
            handles.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model.eval()
            model(example)
    finally:
        for h in handles:
            h.remove()
    return calls


def _in_features(mod: nn.Module) -> int:
    return mod.in_features if isinstance(mod, nn.Linear) else mod.in_channels


def _out_features(mod: nn.Module) -> int:
    return mod.out_features if isinstance(mod, nn.Linear) else mod.out_channels


def find_gate_sites(
    model: nn.Module, example: torch.Tensor, ignore: tuple[str, ...] = ()
) -> list[GateSite]:
    """Gate sites for every prunable layer of a chain network, in execution order."""
    was_training = model.training
    try:
        calls = _leaf_calls(model, example)
    except Exception as exc:  # the model rejected the example: a shape mistake by the user
        raise GatePlacementError(f"model failed on an input of shape {tuple(example.shape)}: {exc}") from exc
    finally:
        model.train(was_training)
    producers = [i for i, (_, m, _) in enumerate(calls) if isinstance(m, PRODUCERS)]
    if not producers:
        raise GatePlacementError("model has no prunable layer (Linear or Conv)")
    sites: list[GateSite] = []
    seen: set[str] = set()
    for pos in producers[:-1]:
        name, mod, shape = calls[pos]
        if name in ignore or name in seen:
            continue
        seen.add(name)
        if getattr(mod, "groups", 1) != 1:
            continue  # grouped convolutions couple channels: left to the dependency graph
        size = _out_features(mod)
        site_name, norms, consumer, repeat = name, [], None, 1
        for later, lmod, _ in calls[pos + 1 :]:
            if isinstance(lmod, NORMS):
                norms.append(later)
                site_name = later
            elif isinstance(lmod, ELEMENTWISE + POOLS):
                site_name = later  # channel-preserving: the gate goes after the last of them
            elif isinstance(lmod, nn.Flatten):
                continue
            elif isinstance(lmod, PRODUCERS):
                consumer = later
                fan_in = _in_features(lmod)
                if fan_in % size:
                    raise GatePlacementError(
                        f"{later} reads {fan_in} inputs, not a multiple of the {size} outputs of "
                        f"{name}: branching networks need the dependency graph"
                    )
                repeat = fan_in // size
                break
            else:
                break
        if consumer is None:
            continue
        sites.append(
            GateSite(
                name=name, module=site_name, size=size, axis=1 if len(shape) > 1 else 0,
                producers=[name], norms=norms, consumers=[consumer], repeat=repeat,
            )
        )
    if not sites:
        raise GatePlacementError("model has no prunable structure outside its output layer")
    return sites

