"""Layers of Hugging Face transformers: GPT-2's ``Conv1D`` (a linear layer whose weight is stored
transposed, ``(in, out)``, with ``out`` bias entries). Registered by :func:`register` when a model
from transformers is traced (importing transformers here would slow every start)."""

from __future__ import annotations

import sys

from ..registry import ModuleRule, module_rules, register_module


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
