"""Operations that move, split, join or reduce axes: channels follow their axis; a literal size
that counts channels is recorded for rewriting after pruning."""

from __future__ import annotations

import numpy as np
import torch
from torch import fx, nn

from ..labels import Label, fixed
from ..propagate import _name, _shape
from ..registry import ModuleRule, register_function, register_module
from ..unionfind import BLOCKED


@register_module(nn.Flatten)
class FlattenRule(ModuleRule):
    def propagate(self, ctx, node, module, x):
        return ctx.reshape(node, x, None)


@register_module(nn.Softmax)
class SoftmaxRule(ModuleRule):
    def propagate(self, ctx, node, module, x):
        return ctx.softmax_rule(node, x, module.dim)


@register_function(
    "view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as",
)
def reshape(ctx, node):
    x = ctx.label(node.args[0])
    if x is None:
        return ctx.opaque(node, "reshape of a non-tensor")
    return ctx.reshape(node, x, ctx.shape_args(node))



@register_function(
    "permute", "transpose", "swapaxes", "swapdims", "movedim", "t",
)
def permute(ctx, node):
    x = ctx.label(node.args[0])
    name = _name(node.target)
    nd = len(_shape(node))
    if x is None:
        return ctx.opaque(node, "permute of a non-tensor")
    if not x.labelled:
        return fixed(nd)
    rest = list(node.args[1:])
    if name == "permute":
        dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
        if not dims:
            dims = node.kwargs.get("dims")
        perm = [ctx.norm_dim(d, nd) for d in dims]
    elif name == "t":
        perm = list(range(nd))[::-1]
    elif name == "movedim":
        src = ctx.norm_dim(rest[0], nd)
        dst = ctx.norm_dim(rest[1], nd)
        perm = [d for d in range(nd) if d != src]
        perm.insert(dst, src)
    else:
        d0 = ctx.norm_dim(rest[0] if rest else node.kwargs["dim0"], nd)
        d1 = ctx.norm_dim(rest[1] if len(rest) > 1 else node.kwargs["dim1"], nd)
        perm = list(range(nd))
        perm[d0], perm[d1] = perm[d1], perm[d0]
    return Label(nd, perm.index(x.axis), x.ids)



@register_function("cat", "concat", "concatenate")
def cat(ctx, node):
    tensors = node.args[0] if node.args else node.kwargs["tensors"]
    nd = len(_shape(node))
    d = ctx.norm_dim(ctx.dim_arg(node, 1, default=0), nd)
    pieces = [(ctx.label(t) or fixed(nd), _shape(t)) for t in tensors]
    axes = {lab.axis for lab, _ in pieces if lab.labelled}
    if not axes:
        return fixed(nd)
    if axes == {d}:
        ids = np.concatenate([lab.ids if lab.labelled else np.full(s[d], BLOCKED) for lab, s in pieces])
        for lab, _ in pieces:
            if lab.labelled:
                ctx.rec.tag(lab.ids, "concat")
        return Label(nd, d, ids)
    if len(axes) == 1 and d not in axes:
        (a,) = axes
        first = next(lab for lab, _ in pieces if lab.labelled)
        if all(lab.labelled or s[a] == 1 for lab, s in pieces):
            for lab, _ in pieces:
                if lab.labelled and lab is not first:
                    ctx.rec.unite(first.ids, lab.ids, tag="concat")
            return Label(nd, a, first.ids)
    for lab, _ in pieces:
        ctx.block(lab)
    return fixed(nd)



@register_function("stack")
def stack(ctx, node):
    tensors = node.args[0] if node.args else node.kwargs["tensors"]
    nd = len(_shape(node))
    d = ctx.norm_dim(ctx.dim_arg(node, 1, default=0), nd)
    labs = [ctx.label(t) or fixed(nd - 1) for t in tensors]
    axes = {lab.axis for lab in labs}
    if axes == {None}:
        return fixed(nd)
    if len(axes) == 1:
        (a,) = axes
        for lab in labs[1:]:
            ctx.rec.unite(labs[0].ids, lab.ids, tag="concat")
        return Label(nd, a + (1 if a >= d else 0), labs[0].ids)
    for lab in labs:
        ctx.block(lab)
    return fixed(nd)



@register_function("expand")
def expand(ctx, node):
    x = ctx.label(node.args[0])
    dst = _shape(node)
    if x is None:
        return ctx.opaque(node, "expand of a non-tensor")
    if not x.labelled:
        return fixed(len(dst))
    p = x.axis + len(dst) - x.ndim
    sizes = ctx.shape_args(node)
    if sizes is not None and isinstance(sizes[p], int) and sizes[p] != -1:
        ctx.rewrite(node, "shape", p, [x.ids])
    return Label(len(dst), p, x.ids)



@register_function("split", "chunk", "split_with_sizes", "tensor_split")
def split(ctx, node):
    x = ctx.label(node.args[0])
    metas = node.meta.get("tensor_meta")
    if x is None or not isinstance(metas, (list, tuple)):
        return ctx.opaque(node, "split of a non-tensor")
    name = _name(node.target)
    nd = x.ndim
    d = ctx.norm_dim(ctx.dim_arg(node, 2, default=0), nd)
    if not x.labelled:
        return tuple(fixed(nd) for _ in metas)
    if d != x.axis:
        return tuple(Label(nd, x.axis, x.ids) for _ in metas)
    if name == "tensor_split":
        ctx.block(x)
        return tuple(fixed(nd) for _ in metas)
    pieces, start = [], 0
    for m in metas:
        n = m.shape[d]
        pieces.append(x.ids[start:start + n])
        start += n
    ctx.rewrite(node, "split", d, pieces)
    return tuple(Label(nd, d, p) if len(p) > 1 else ctx.blocked_piece(p, nd) for p in pieces)



@register_function("unbind")
def unbind(ctx, node):
    x = ctx.label(node.args[0])
    metas = node.meta.get("tensor_meta") or ()
    d = ctx.dim_arg(node, 1, default=0)
    if x is None:
        return ctx.opaque(node, "unbind of a non-tensor")
    if x.labelled and ctx.norm_dim(d, x.ndim) == x.axis:
        ctx.block(x)
        return tuple(fixed(x.ndim - 1) for _ in metas)
    if not x.labelled:
        return tuple(fixed(x.ndim - 1) for _ in metas)
    axis = x.axis - (1 if ctx.norm_dim(d, x.ndim) < x.axis else 0)
    return tuple(Label(x.ndim - 1, axis, x.ids) for _ in metas)



def _gather_axis(ctx, x, idx, nd):
    """``table[index]`` with one integer (or 1-D boolean) index tensor on an axis that is not the
    channel axis and full slices elsewhere (a relative-position table gathered per query/key pair):
    the channels pass, moved by the index's own axes. None when the indexing is anything else."""
    tensors = [p for p, i in enumerate(idx) if isinstance(i, fx.Node)]
    if len(tensors) != 1 or any(not (isinstance(i, fx.Node) or i == slice(None)) for i in idx):
        return None
    pos = tensors[0]
    meta = idx[pos].meta.get("tensor_meta")
    if meta is None or not hasattr(meta, "dtype") or pos == x.axis or pos > x.axis:
        return None
    if meta.dtype == torch.bool and len(meta.shape) != 1:
        return None
    if not (meta.dtype == torch.bool or not meta.dtype.is_floating_point):
        return None
    axis = x.axis - 1 + (1 if meta.dtype == torch.bool else len(meta.shape))
    if axis >= nd:
        return None
    ctx.block(ctx.label(idx[pos]))
    return Label(nd, axis, x.ids)


@register_function("getitem")
def getitem(ctx, node):
    src = node.args[0]
    lab = ctx.out.labels.get(src.name) if isinstance(src, fx.Node) else None
    if isinstance(lab, tuple):
        return lab[node.args[1]]
    x = ctx.label(src)
    nd = len(_shape(node))
    if x is None or not x.labelled:
        ctx.block_all(node.args[1])
        return fixed(nd)
    idx = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
    gathered = _gather_axis(ctx, x, idx, nd)
    if gathered is not None:
        return gathered
    if any(isinstance(i, (fx.Node, list)) for i in idx):
        ctx.block(x)
        ctx.block_all(idx)
        return fixed(nd)
    used = sum(1 for i in idx if i is not None and i is not Ellipsis)
    dim = out = 0
    for i in idx:
        if i is Ellipsis:
            skip = x.ndim - used
            if dim <= x.axis < dim + skip:
                return Label(nd, out + x.axis - dim, x.ids)
            dim += skip
            out += skip
        elif i is None:
            out += 1
        elif isinstance(i, int):
            if dim == x.axis:
                ctx.block(x)
                return fixed(nd)
            dim += 1
        elif isinstance(i, slice):
            if dim == x.axis:
                if i == slice(None):
                    return Label(nd, out, x.ids)
                ctx.block(x)
                return fixed(nd)
            dim += 1
            out += 1
    return Label(nd, out + x.axis - dim, x.ids)



@register_function("pad")
def pad(ctx, node):
    x = ctx.label(node.args[0])
    pad = ctx.dim_arg(node, 1, "pad")
    if x is None or not isinstance(pad, (list, tuple)):
        return ctx.opaque(node, "pad with unknown sizes")
    k = len(pad) // 2
    if x.labelled and x.axis >= x.ndim - k and any(pad[2 * (x.ndim - 1 - x.axis): 2 * (x.ndim - 1 - x.axis) + 2]):
        ctx.block(x)
        return fixed(x.ndim)
    return x



@register_function(
    "mean", "sum", "amax", "amin", "std", "var", "max", "min", "logsumexp", "norm",
)
def reduce(ctx, node):
    """A reduction; ``max``/``min`` over a dim return (values, indices), both labelled alike."""
    x = ctx.label(node.args[0])
    meta = node.meta.get("tensor_meta")
    # torch.max(x, dim) -> (values, indices): a list of two metadata (one tensor's is a NamedTuple)
    pair = isinstance(meta, (list, tuple)) and len(meta) == 2 and all(hasattr(m, "shape") for m in meta)
    shape = meta[0].shape if pair else _shape(node)
    if x is None or shape is None:
        return ctx.opaque(node, "reduction of a non-tensor or of unknown shape")
    nd = len(shape)
    out = _reduced(ctx, node, x, nd)
    return (out, out) if pair else out


def _reduced(ctx, node, x, nd):
    if not x.labelled:
        return fixed(nd)
    dims = ctx.dim_arg(node, 1)
    if dims is None:
        ctx.block(x)
        return fixed(nd)
    dims = [dims] if isinstance(dims, int) else list(dims)
    dims = [ctx.norm_dim(d, x.ndim) for d in dims]
    if x.axis in dims:
        ctx.block(x)
        ctx.out.opaque.append((node.name, "reduces over channels"))
        return fixed(nd)
    axis = x.axis if nd == x.ndim else x.axis - sum(d < x.axis for d in dims)
    return Label(nd, axis, x.ids)



@register_function("softmax", "log_softmax", "_softmax")
def softmax(ctx, node):
    x = ctx.label(node.args[0])
    if x is None:
        return ctx.opaque(node, "softmax of a non-tensor")
    return ctx.softmax_rule(node, x, ctx.dim_arg(node, 1))
