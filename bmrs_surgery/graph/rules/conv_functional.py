"""Functional convolutions, ``F.conv1d/2d/3d(x, weight, bias, stride, padding, dilation, groups)``
with the weight read from a parameter (a layer's own forward calling ``F.conv3d``): output
channels (weight dim 0 and the bias) follow the output's channel axis. Nothing there can hold a
gate, so the input channels are kept; a layer registered as a module (``nn.Conv3d`` and subclasses
that keep its forward) is the prunable form."""

from __future__ import annotations

from torch import fx

from ..labels import Label, fixed
from ..propagate import _shape
from ..registry import register_function


@register_function("conv1d", "conv2d", "conv3d")
def conv(ctx, node):
    x = ctx.label(node.args[0])
    weight = ctx.dim_arg(node, 1, "weight")
    bias = ctx.dim_arg(node, 2, "bias")
    groups = ctx.dim_arg(node, 6, "groups", 1)
    nd = len(_shape(node))
    ctx.block(x)  # no module to hold a gate: the input channels stay
    if not (isinstance(weight, fx.Node) and weight.op == "get_attr") or groups != 1:
        ctx.block_all((node.args[1:], node.kwargs))
        return fixed(nd)
    wl = ctx.label(weight)
    if wl is not None and wl.axis != 0:
        ctx.block(wl)  # the default guess (its last dimension) is a kernel axis here
    out = ctx.param_ids(weight.target, 0, "out")
    if isinstance(bias, fx.Node):
        bl = ctx.label(bias)
        if bias.op == "get_attr" and bl is not None and bl.labelled and len(bl.ids) == len(out):
            ctx.rec.unite(out, bl.ids)
            ctx.set_role(bias.target, "out")
        else:
            ctx.block(bl)
            ctx.rec.block(out)
    if len(out) < 2:
        ctx.rec.block(out)
        return fixed(nd)
    return Label(nd, 1, out)
