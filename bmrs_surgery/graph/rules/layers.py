"""Layers that read channels through a weight: ``nn.Linear``, convolutions (plain, grouped,
depthwise; 1-3 D), ``nn.Embedding``. These are where gates sit (their input columns) and where a
kept gate's E[theta] folds in."""

from __future__ import annotations

import numpy as np
from torch import fx, nn

from ..labels import Label, fixed
from ..propagate import ChannelSink, _shape
from ..registry import ModuleRule, register_function, register_module


@register_module(nn.Linear)
class LinearRule(ModuleRule):
    needs_input = False

    def propagate(self, ctx, node, module, x):
        return ctx.dense(node, x, module.in_features, module.out_features)

    def resize(self, module):
        module.out_features, module.in_features = module.weight.shape

    def fold(self, module, factor):
        module.weight.mul_(factor.to(module.weight.dtype).reshape(1, -1))


@register_module(nn.Conv1d, nn.Conv2d, nn.Conv3d)
class ConvRule(ModuleRule):
    """Output channels on weight dim 0; input channels on dim 1 per group. Grouped convolutions
    keep every group the same size (index i goes in all groups at once); a depthwise convolution
    ties each output channel to its input channel."""

    needs_input = False

    def propagate(self, ctx, node, module, x):
        name = node.target
        ndim = len(_shape(node))
        cd = ndim - (len(module.kernel_size) + 1)
        g = module.groups
        a = module.in_channels // g
        b = module.out_channels // g
        out_ids, new_out = ctx.module_ids(name, "out", module.out_channels)
        if new_out:
            ctx.slot(name, ("weight", "bias"), 0, out_ids, "out")
        ok = x is not None and x.axis == cd
        if g == 1:
            in_ids, new = ctx.module_ids(name, "in", a)
            if new:
                ctx.slot(name, ("weight",), 1, in_ids, "in")
            if ok:
                ctx.rec.unite(in_ids, x.ids)
                ctx.out.sinks.append(ChannelSink(name, cd, x.ids, node.name))
            else:
                ctx.rec.block(in_ids)
                ctx.block(x)
        elif a == 1:  # depthwise (channel multiplier b): input c feeds outputs c*b .. c*b+b-1
            if ok:
                ctx.rec.unite(np.repeat(x.ids, b), out_ids, tag="depthwise")
            else:
                ctx.rec.block(out_ids)
                ctx.block(x)
        else:  # grouped: keep every group the same size, prune index i in all groups at once
            in_ids, new = ctx.module_ids(name, "in", a)
            if new:
                ctx.slot(name, ("weight",), 1, in_ids, "in")
                grid = out_ids.reshape(g, b)
                ctx.rec.unite(np.broadcast_to(grid[:1], grid.shape).ravel(), grid.ravel(), tag="grouped")
            if ok:
                ctx.rec.unite(np.tile(in_ids, g), x.ids, tag="grouped")
                ctx.out.sinks.append(ChannelSink(name, cd, x.ids, node.name))
            else:
                ctx.rec.block(in_ids)
                ctx.block(x)
        if module.out_channels < 2:
            ctx.rec.block(out_ids)
            return fixed(ndim)
        return Label(ndim, cd, out_ids)

    def resize(self, module):
        old_out, old_groups = module.out_channels, module.groups
        new_out = module.weight.shape[0]
        if old_groups > 1 and module.in_channels == old_groups:  # depthwise: one input per group
            module.groups = new_out // (old_out // old_groups)
            module.in_channels = module.groups
        else:
            module.in_channels = module.weight.shape[1] * old_groups
        module.out_channels = new_out

    def fold(self, module, factor):
        # input channel c of group c // a is weight column c % a
        w = module.weight
        groups, a = module.groups, w.shape[1]
        b = w.shape[0] // groups
        per_out = factor.to(w.dtype).reshape(groups, 1, a).expand(groups, b, a).reshape(w.shape[0], a)
        w.mul_(per_out.reshape(per_out.shape + (1,) * (w.ndim - 2)))


@register_module(nn.Embedding)
class EmbeddingRule(ModuleRule):
    """Writes its embedding dimension (weight dim 1) on the output's last axis."""

    needs_input = False

    def propagate(self, ctx, node, module, x):
        shape = _shape(node)
        ids, _ = ctx.module_ids(node.target, "weight.1", module.embedding_dim)
        ctx.slot(node.target, ("weight",), 1, ids, "out")
        return Label(len(shape), len(shape) - 1, ids) if shape else None

    def resize(self, module):
        module.embedding_dim = module.weight.shape[1]


@register_function("linear")
def linear(ctx, node):
    """``F.linear(x, weight, bias)``. With the weight read from a parameter (``get_attr``: timm's
    EVA/DINOv3 attention calls ``F.linear(x, self.qkv.weight, cat(q_bias, k_bias, v_bias))``), its
    rows are the output channels, sliced by name, and a bias of as many entries follows them (one
    parameter, or a concatenation of several). Nothing holds a gate on the input: its channels stay."""
    x = ctx.label(node.args[0])
    w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    wl = ctx.label(w)
    nd = len(_shape(node))
    ctx.block(x)
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    if isinstance(w, fx.Node) and w.op == "get_attr" and len(_shape(w)) == 2:
        if wl is not None and wl.labelled and wl.axis != 0:
            ctx.block(wl)  # the default guess for a parameter (its last dimension) is the input here
        out = ctx.param_ids(w.target, 0, "out")
        if bias is not None:
            bl = ctx.label(bias)
            if bl is not None and bl.labelled and bl.axis == 0 and len(bl.ids) == len(out):
                ctx.rec.unite(out, bl.ids)
            else:
                ctx.block(bl)
                ctx.rec.block(out)
        if len(out) < 2:
            ctx.rec.block(out)
            return fixed(nd)
        return Label(nd, nd - 1, out)
    if wl is not None and wl.labelled and wl.axis == 0:  # output rows come from a parameter
        bl = ctx.label(bias)
        if bl is not None and bl.labelled:
            ctx.rec.unite(wl.ids, bl.ids)
        elif bias is not None:
            ctx.block(wl)
        return Label(nd, nd - 1, wl.ids)
    ctx.block(wl, ctx.label(node.args[2]) if len(node.args) > 2 else None)
    return fixed(nd)
