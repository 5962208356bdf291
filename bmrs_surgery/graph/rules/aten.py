"""ATen operations of a graph captured with ``torch.export`` (see :mod:`..export_trace`).

The capture names most operations by their ATen overload packet (``aten.view``, ``aten.transpose``,
``aten.add``...), whose arguments are those of the torch functions with the same names, so the
rules of the other files apply unchanged. This file adds the operations that only appear in ATen
graphs: ``slice`` and ``select`` (what ``x[:, 0]`` and ``x[..., :d]`` become), ``embedding`` read
from a parameter, ``index`` (what ``table[index]`` with an index tensor becomes), the casts and
aliases export inserts, and attention with grouped key/value heads (``enable_gqa``: query heads
``g*r .. g*r+r-1`` read key/value head ``g``, so they form one structure with it).
"""

from __future__ import annotations

import numpy as np

from ..labels import Label, fixed
from ..propagate import _name, _shape
from ..registry import register_function
from . import attention
from .shape_ops import _gather_axis

BIG = 2**62  # ATen writes an open slice end as 2**63 - 1


@register_function("slice")
def slice_(ctx, node):
    """``aten.slice(x, dim, start, end, step)``: channels pass unless the channel axis is cut."""
    x = ctx.label(node.args[0])
    nd = len(_shape(node))
    if x is None:
        return ctx.opaque(node, "slice of a non-tensor")
    if not x.labelled:
        return fixed(nd)
    dim = ctx.norm_dim(ctx.dim_arg(node, 1, default=0), nd)
    if dim != x.axis:
        return x
    start = ctx.dim_arg(node, 2, "start", None) or 0
    end = ctx.dim_arg(node, 3, "end", None)
    step = ctx.dim_arg(node, 4, "step", 1)
    n = _shape(node.args[0])[dim]
    if start == 0 and (end is None or (isinstance(end, int) and end >= n)) and step == 1:
        return x
    if all(isinstance(v, int) for v in (start, step)) and (end is None or isinstance(end, int)) and step > 0:
        # a piece of the channel axis (Phi-3's fused q/k/v): its channels go on; the sizes are the
        # model's own attributes (the eager model is what surgery cuts), and the proof checks them
        ids = x.ids[start:end:step]
        if len(ids) > 1:
            return Label(nd, x.axis, ids)
    ctx.block(x)
    ctx.out.opaque.append((node.name, "slices the channel axis"))
    return fixed(nd)


@register_function("select")
def select(ctx, node):
    """``aten.select(x, dim, index)``: the dim disappears; selecting on the channel axis keeps it."""
    x = ctx.label(node.args[0])
    nd = len(_shape(node))
    if x is None:
        return ctx.opaque(node, "select of a non-tensor")
    if not x.labelled:
        return fixed(nd)
    dim = ctx.norm_dim(node.args[1], x.ndim)
    if dim == x.axis:
        ctx.block(x)
        return fixed(nd)
    return Label(nd, x.axis - (1 if dim < x.axis else 0), x.ids)


@register_function("embedding")
def embedding(ctx, node):
    """``aten.embedding(weight, ids)``: the table's dim 1 is the output's last axis."""
    w = ctx.label(node.args[0])
    nd = len(_shape(node))
    ctx.block_all(node.args[1:])
    if w is not None and w.labelled and w.axis == 1:
        return Label(nd, nd - 1, w.ids)
    ctx.block(w)
    return fixed(nd)


@register_function("index")
def index(ctx, node):
    """``aten.index(x, indices)``: ``x[i]`` with index tensors, None standing for a full slice (what
    ``table[index]`` becomes: Swin's relative-position table, one column per head, gathered per
    query/key pair). The getitem rule's gather: channels on an axis after the one indexed pass,
    moved by the index's own axes; anything else keeps them."""
    x = ctx.label(node.args[0])
    nd = len(_shape(node))
    indices = node.args[1]
    if x is None or not isinstance(indices, (list, tuple)):
        return ctx.opaque(node, "index of a non-tensor")
    if not x.labelled:
        ctx.block_all(indices)
        return fixed(nd)
    gathered = _gather_axis(ctx, x, tuple(slice(None) if i is None else i for i in indices), nd)
    if gathered is not None:
        return gathered
    ctx.block(x)
    ctx.block_all(indices)
    ctx.out.opaque.append((node.name, "indexes the channel axis or several axes at once"))
    return fixed(nd)


@register_function("alias", "_to_copy", "lift_fresh_copy", "clone_", "native_dropout_", "type_as")
def passthrough(ctx, node):
    """Copies, casts and aliases: the output has the input's channels. ``type_as(x, other)`` reads
    only ``other``'s dtype, so ``other``'s channels are left as they are (EVA's rotary attention
    casts q and k with ``type_as(v)``)."""
    x = ctx.label(node.args[0])
    nd = len(_shape(node))
    if x is None:
        return ctx.opaque(node, "copy of a non-tensor")
    if _name(node.target) != "type_as":
        ctx.block_all((node.args[1:], node.kwargs))
    if x.ndim != nd:
        ctx.block(x)
        return fixed(nd)
    return x


@register_function("buffer_value")
def buffer_value(ctx, node):
    """A buffer or constant read (see ``export_trace.mark_constants``): fixed values, no channels."""
    return ctx.fixed_like(node)


@register_function("scaled_dot_product_attention.default")
def sdpa_gqa(ctx, node):
    """Attention called with ``enable_gqa=True`` (fewer key/value heads than query heads); other
    calls are the plain rule's."""
    if not node.kwargs.get("enable_gqa", False):
        return attention.scaled_dot_product_attention(ctx, node)
    q, k, v = (ctx.label(a) for a in node.args[:3])
    nd = len(_shape(node))
    if q is None or k is None or v is None:
        return ctx.opaque(node, "attention on non-tensors")
    heads = [lab for lab in (q, k, v) if lab.labelled and lab.axis == lab.ndim - 3]
    if len(heads) == 3 and len(k.ids) == len(v.ids) and len(q.ids) % len(k.ids) == 0:
        rep = len(q.ids) // len(k.ids)
        ctx.block_all((node.args[3:], {n: a for n, a in node.kwargs.items() if n != "enable_gqa"}))
        ctx.rec.unite(np.repeat(k.ids, rep), q.ids, tag="heads")
        ctx.rec.unite(k.ids, v.ids, tag="heads")
        return Label(nd, q.axis, q.ids)
    ctx.block(q, k, v)
    ctx.block_all((node.args[3:], node.kwargs))
    ctx.out.opaque.append((node.name, "grouped-query attention with channels off the head axis"))
    return fixed(nd)
