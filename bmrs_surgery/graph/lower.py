"""Rewrite ``nn.MultiheadAttention`` calls into plain operations so their heads can be pruned.

``nn.MultiheadAttention`` keeps q, k and v in one fused ``in_proj_weight`` and ties its head count
to its embedding size, so no head can be removed from it as it stands. In eval mode, without
masks, it computes exactly: three linear projections, a reshape into heads, scaled dot-product
attention, a reshape back and the output projection. This pass writes that out in the graph with
four ``nn.Linear`` layers holding copies of its weights (the original module is not touched); the
reshape ``view(B, L, heads, head_dim)`` then makes every head one structure. Calls with masks,
returned attention weights or bias_k/bias_v are left as they are (their channels are kept).
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn


def _arg(node: fx.Node, pos: int, name: str, default=None):
    if len(node.args) > pos:
        return node.args[pos]
    return node.kwargs.get(name, default)


def _lowerable(node: fx.Node, m: nn.MultiheadAttention) -> bool:
    if not m._qkv_same_embed_dim or m.bias_k is not None or m.add_zero_attn:
        return False
    if _arg(node, 3, "key_padding_mask") is not None or _arg(node, 5, "attn_mask") is not None:
        return False
    if _arg(node, 7, "is_causal", False):
        return False
    for user in node.users:  # only the attention output may be used, not the weights
        if not (user.op == "call_function" and user.target is operator.getitem):
            return False
        if user.args[1] != 0 and user.users:
            return False
    return True


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An nn.Linear holding copies of ``weight`` and ``bias`` (no random initialisation first)."""
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta", dtype=weight.dtype)
    lin.weight = nn.Parameter(weight.detach().clone())
    if bias is not None:
        lin.bias = nn.Parameter(bias.detach().clone())
    return lin


def _replace_module(gm: fx.GraphModule, target: str, new: nn.Module) -> None:
    parent, _, leaf = target.rpartition(".")
    owner = gm.get_submodule(parent) if parent else gm
    setattr(owner, leaf, new)


def lower_attention(gm: fx.GraphModule) -> list[str]:
    """Lower every lowerable ``nn.MultiheadAttention`` call of ``gm`` in place; returns their names."""
    lowered = []
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        m = gm.get_submodule(node.target)
        if not isinstance(m, nn.MultiheadAttention) or not _lowerable(node, m):
            continue
        e, h = m.embed_dim, m.num_heads
        d = e // h
        w, b = m.in_proj_weight.detach(), m.in_proj_bias
        b = b.detach() if b is not None else None
        box = nn.Module()
        for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
            setattr(box, name, _linear(w[i * e:(i + 1) * e], None if b is None else b[i * e:(i + 1) * e]))
        box.out_proj = _linear(m.out_proj.weight.detach(),
                               None if m.out_proj.bias is None else m.out_proj.bias.detach())
        _replace_module(gm, node.target, box)
        q_in, k_in, v_in = (_arg(node, i, n) for i, n in enumerate(("query", "key", "value")))
        g = gm.graph
        with g.inserting_before(node):
            heads = []
            bdim, ldim = (0, 1) if m.batch_first else (1, 0)
            bsz = g.call_method("size", (q_in, bdim))
            for src, name in ((q_in, "q_proj"), (k_in, "k_proj"), (v_in, "v_proj")):
                y = g.call_module(f"{node.target}.{name}", (src,))
                n_len = g.call_method("size", (src, ldim))
                shape = (bsz, n_len, h, d) if m.batch_first else (n_len, bsz, h, d)
                y = g.call_method("view", (y, *shape))
                y = g.call_method("transpose", (y, 1, 2)) if m.batch_first else g.call_method("permute", (y, 1, 2, 0, 3))
                heads.append(y)
            att = g.call_function(F.scaled_dot_product_attention, tuple(heads))
            q_len = g.call_method("size", (q_in, ldim))
            if m.batch_first:
                att = g.call_method("transpose", (att, 1, 2))
                att = g.call_method("reshape", (att, bsz, q_len, e))
            else:
                att = g.call_method("permute", (att, 2, 0, 1, 3))
                att = g.call_method("reshape", (att, q_len, bsz, e))
            out = g.call_module(f"{node.target}.out_proj", (att,))
        for user in list(node.users):
            if user.args[1] == 0:
                user.replace_all_uses_with(out)
            g.erase_node(user)
        g.erase_node(node)
        lowered.append(node.target)
    if lowered:
        gm.graph.lint()
        gm.recompile()
    return lowered
