"""Attention: products of activations (``matmul``, ``bmm``, ``einsum``) and
``scaled_dot_product_attention``. Heads on a batch-like axis are tied across q, k and v; channels
contracted without a weight are kept (nothing there can hold a gate)."""

from __future__ import annotations

from torch import fx

from ..labels import Label, fixed
from ..propagate import _shape
from ..registry import register_function


@register_function("matmul", "bmm")
def matmul(ctx, node):
    a_node, b_node = node.args[0], node.args[1]
    a, b = ctx.label(a_node), ctx.label(b_node)
    sa, sb, so = _shape(a_node), _shape(b_node), _shape(node)
    if a is None or b is None or len(sa) < 2 or len(sb) < 2:
        return ctx.opaque(node, "matmul of vectors or non-tensors")
    nd = len(so)
    pa = a.axis + nd - len(sa) if a.labelled else None
    pb = b.axis + nd - len(sb) if b.labelled else None
    contracted = (a.labelled and a.axis == len(sa) - 1) or (b.labelled and b.axis == len(sb) - 2)
    if contracted:  # reading channels without weights: nothing to hold a gate
        ctx.block(a, b)
        ctx.out.opaque.append((node.name, "contracts channels without a weight"))
        return fixed(nd)
    batch = nd - 2
    if pa is not None and pb is not None:
        if pa == pb and pa < batch:
            ctx.rec.unite(a.ids, b.ids, tag="heads")
            return Label(nd, pa, a.ids)
        ctx.block(a, b)
        return fixed(nd)
    lab, p, s_other, other_off = (a, pa, sb, nd - len(sb)) if pa is not None else (b, pb, sa, nd - len(sa))
    if p is None:
        return fixed(nd)
    if p < batch:
        q = p - other_off
        if q >= 0 and s_other[q] > 1:
            ctx.block(lab)
            return fixed(nd)
    return Label(nd, p, lab.ids)



@register_function("scaled_dot_product_attention")
def scaled_dot_product_attention(ctx, node):
    q, k, v = (ctx.label(a) for a in node.args[:3])
    so = _shape(node)
    nd = len(so)
    if q is None or k is None or v is None:
        return ctx.opaque(node, "attention on non-tensors")
    if any(lab.labelled and lab.axis == lab.ndim - 1 for lab in (q, k)):
        ctx.block(q, k, v)
        ctx.out.opaque.append((node.name, "attention over channels"))
        return fixed(nd)
    labs = [lab for lab in (q, k, v) if lab.labelled]
    mask_node = ctx.dim_arg(node, 3, "attn_mask")
    mask = ctx.label(mask_node) if isinstance(mask_node, fx.Node) else None
    ctx.block_all((node.args[4:], {k_: a for k_, a in node.kwargs.items() if k_ != "attn_mask"}))
    if not labs:
        ctx.block(mask)
        return fixed(nd)
    heads = [lab for lab in labs if lab.axis < lab.ndim - 2]
    if len(heads) == 3 and len({h.axis for h in heads}) == 1:
        if not _mask_follows_heads(ctx, mask_node, mask, q):
            ctx.block(q, k, v, mask)
            return fixed(nd)
        ctx.rec.unite(q.ids, k.ids, tag="heads")
        ctx.rec.unite(q.ids, v.ids, tag="heads")
        return Label(nd, q.axis, q.ids)
    ctx.block(mask)
    if len(labs) == 1 and v.labelled and v.axis == v.ndim - 1:
        return Label(nd, nd - 1, v.ids)
    ctx.block(q, k, v)
    return fixed(nd)



def _mask_follows_heads(ctx, mask_node, mask, q) -> bool:
    """An additive mask or bias (relative-position tables, one per head) broadcast over q's head
    axis: it either carries the same heads on that axis (then tied to them, and sliced with them)
    or is the same for every head (size 1 there)."""
    if mask_node is None or mask_node.meta.get("tensor_meta") is None:
        return True  # no mask (an optional argument left at None)
    shape = _shape(mask_node)
    if shape is None:
        return False
    axis = q.axis - (q.ndim - len(shape))
    if mask is not None and mask.labelled:
        if mask.axis == axis and len(mask.ids) == len(q.ids):
            ctx.rec.unite(q.ids, mask.ids, tag="heads")
            return True
        return False
    return axis < 0 or shape[axis] == 1


@register_function("einsum")
def einsum(ctx, node):
    eq = node.args[0]
    ops = node.args[1:]
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops = ops[0]
    if not isinstance(eq, str) or "..." in eq or "->" not in eq:
        return ctx.opaque(node, "einsum without explicit output")
    lhs, rhs = eq.replace(" ", "").split("->")
    terms = lhs.split(",")
    labs = [ctx.label(o) for o in ops]
    nd = len(rhs)
    axis_letter = None
    first = None
    for term, lab in zip(terms, labs):
        if lab is None or not lab.labelled:
            continue
        letter = term[lab.axis]
        if letter not in rhs or (axis_letter is not None and letter != axis_letter):
            for lb in labs:
                ctx.block(lb)
            ctx.out.opaque.append((node.name, "einsum contracts channels"))
            return fixed(nd)
        axis_letter = letter
        if first is None:
            first = lab
        else:
            ctx.rec.unite(first.ids, lab.ids, tag="heads")
    if first is None:
        return fixed(nd)
    for term, lab, o in zip(terms, labs, ops):
        if (lab is None or not lab.labelled) and axis_letter in term and _shape(o)[term.index(axis_letter)] > 1:
            for lb in labs:
                ctx.block(lb)
            return fixed(nd)
    return Label(nd, rhs.index(axis_letter), first.ids)
