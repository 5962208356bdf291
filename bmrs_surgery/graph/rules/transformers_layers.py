"""Layers of Hugging Face transformers: GPT-2's ``Conv1D`` (a linear layer whose weight is stored
transposed, ``(in, out)``, with ``out`` bias entries), and the families' own RMSNorm/LayerNorm
classes (``LlamaRMSNorm``, ``Qwen3RMSNorm``, ``T5LayerNorm``...: statistics over the last axis, one
weight per last-axis entry). Registered by :func:`register` when a model from transformers is
traced (importing transformers here would slow every start)."""

from __future__ import annotations

import sys

import torch
from torch import nn

from ..propagate import _shape
from ..registry import ModuleRule, module_rule, module_rules, register_module


class Conv1DRule(ModuleRule):
    needs_input = False

    def propagate(self, ctx, node, module, x):
        out = ctx.dense(node, x, module.nx, module.nf, in_params=("weight",), out_params=("weight",),
                        in_dim=0, out_dim=1)
        out_ids, _ = ctx.module_ids(node.target, "out", module.nf)
        ctx.slot(node.target, ("bias",), 0, out_ids, "out")
        return out

    def resize(self, module):
        module.nx, module.nf = module.weight.shape

    def fold(self, module, factor):
        module.weight.mul_(factor.to(module.weight.dtype).reshape(-1, 1))


class LastAxisNormRule(ModuleRule):
    """A norm over the last axis with a per-entry weight (RMSNorm, T5's LayerNorm): channels on the
    last axis are kept (the residual stream; removing one would change every statistic), channels
    on another axis (heads, for Qwen3's per-head q/k norms) pass with the weight untouched."""

    def propagate(self, ctx, node, module, x):
        shape = _shape(node)
        if shape is None or module.weight.shape[0] != shape[-1]:
            return ctx.opaque(node, f"{type(module).__name__} with an unexpected weight")
        return ctx.normalize(node, x, [x.ndim - 1], f"{type(module).__name__} normalises over channels "
                             "(hidden-size pruning is not implemented: the stream is kept)")


def _last_axis_norm(mod: nn.Module) -> bool:
    w = getattr(mod, "weight", None)
    return (type(mod).__name__.endswith(("RMSNorm", "LayerNorm")) and isinstance(w, torch.Tensor) and w.ndim == 1
            and getattr(mod, "data_format", "channels_last") == "channels_last" and not list(mod.children()))


def register_norms(model: nn.Module) -> None:
    """Give the model's own transformers norm classes (see :class:`LastAxisNormRule`) a rule."""
    if "transformers" not in sys.modules:
        return
    for mod in model.modules():
        if type(mod).__module__.startswith("transformers.") and module_rule(mod) is None and _last_axis_norm(mod):
            register_module(type(mod))(LastAxisNormRule)


def register() -> None:
    """Register the rules of transformers' layers (once; nothing when transformers is not loaded)."""
    if "transformers" not in sys.modules:
        return
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - an unusual transformers build
        return
    if Conv1D not in module_rules():
        register_module(Conv1D)(Conv1DRule)
