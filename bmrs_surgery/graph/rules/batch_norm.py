"""Functional per-channel normalisation: ``F.batch_norm`` and ``F.instance_norm`` called with the
statistics and affine parameters as tensors (timm's ``BatchNormAct2d`` and its kind). Each of
those 1-D tensors has one entry per channel on axis 1: they follow the channel. Under torch.export
the call is ``aten.batch_norm`` (weight and bias first, the same four tensors) and the running
statistics are read through ``buffer_value`` (see ``export_trace.mark_constants``): the buffer
behind that mark is the one that follows the channel."""

from __future__ import annotations

from torch import fx

from ..labels import fixed
from ..registry import register_function

# positions of (running_mean, running_var, weight, bias) in both signatures
_PARAMS = ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias"))


@register_function("batch_norm", "instance_norm")
def batch_norm(ctx, node):
    x = ctx.label(node.args[0])
    if x is None:
        return ctx.opaque(node, "batch_norm of a non-tensor")
    params = [ctx.dim_arg(node, pos, key) for pos, key in _PARAMS]
    from ..export_trace import unmarked

    params = [unmarked(p) for p in params if isinstance(p, fx.Node)]
    labels = [ctx.label(p) for p in params]
    per_channel = x.labelled and x.axis == 1 and all(
        lab is not None and lab.labelled and lab.ndim == 1 and len(lab.ids) == len(x.ids) for lab in labels)
    if not per_channel:
        ctx.block(x, *labels)
        return fixed(x.ndim) if x.labelled else x
    for p, lab in zip(params, labels):
        ctx.rec.unite(x.ids, lab.ids)
        if p.op == "get_attr":
            ctx.set_role(p.target, "norm")
    return x

