"""Vision operations beyond the basic layers: functional ``group_norm`` (exact per channel only),
``repeat``/``tile`` and ``roll`` over other axes, ``pixel_shuffle``/``pixel_unshuffle`` (channels
become space: kept), and transposed convolutions (``nn.ConvTranspose1d/2d/3d``: weight laid out
(in, out/groups, k...); output channels prunable, input channels read through the weight)."""

from __future__ import annotations

from torch import fx, nn

from ..labels import Label, fixed
from ..propagate import ChannelSink, _shape
from ..registry import ModuleRule, register_function, register_module


@register_function("group_norm")
def group_norm(ctx, node):
    """``F.group_norm(x, num_groups, weight, bias, eps)``: with one channel per group the statistics
    are each channel's own (weight and bias follow it); with several, removing a channel changes
    its group's statistics, so the channels stay."""
    x = ctx.label(node.args[0])
    if x is None:
        return ctx.opaque(node, "group_norm of a non-tensor")
    groups = ctx.dim_arg(node, 1, "num_groups")
    shape = _shape(node.args[0])
    params = [p for p in (ctx.dim_arg(node, 2, "weight"), ctx.dim_arg(node, 3, "bias")) if isinstance(p, fx.Node)]
    labels = [ctx.label(p) for p in params]
    per_channel = (x.labelled and x.axis == 1 and isinstance(groups, int) and groups == shape[1]
                   and all(lab is not None and lab.labelled and len(lab.ids) == len(x.ids) for lab in labels))
    if not per_channel:
        ctx.block(*labels)
        return ctx.normalize(node, x, [1] + list(range(2, x.ndim)), "group_norm mixes channels of a group")
    for p, lab in zip(params, labels):
        ctx.rec.unite(x.ids, lab.ids)
        if p.op == "get_attr":
            ctx.set_role(p.target, "norm")
    if isinstance(node.args[1] if len(node.args) > 1 else None, int):
        # num_groups equals the channel count: read it off the input, so it follows pruning
        with node.graph.inserting_before(node):
            channels = node.graph.call_method("size", (node.args[0], 1))
        node.args = (node.args[0], channels, *node.args[2:])
        node.graph.owning_module.recompile()
    return x


@register_function("repeat", "tile")
def repeat(ctx, node):
    """Copies along axes: channels pass when their own axis is repeated once."""
    x = ctx.label(node.args[0])
    if x is None:
        return ctx.opaque(node, "repeat of a non-tensor")
    nd = len(_shape(node))
    if not x.labelled:
        return fixed(nd)
    reps = list(node.args[1:])
    if len(reps) == 1 and isinstance(reps[0], (list, tuple)):
        reps = list(reps[0])
    if not reps:
        reps = list(node.kwargs.get("repeats") or node.kwargs.get("dims") or [])
    p = x.axis + nd - x.ndim
    r = reps[len(reps) - nd + p] if len(reps) - nd + p >= 0 and len(reps) - nd + p < len(reps) else 1
    if r != 1:
        ctx.block(x)
        ctx.block_all(reps)
        return fixed(nd)
    ctx.block_all(reps)
    return Label(nd, p, x.ids)


@register_function("roll")
def roll(ctx, node):
    """A cyclic shift (Swin's shifted windows): channels pass unless rolled along themselves."""
    x = ctx.label(node.args[0])
    if x is None:
        return ctx.opaque(node, "roll of a non-tensor")
    dims = ctx.dim_arg(node, 2, "dims")
    if not x.labelled:
        return x
    if dims is None or isinstance(dims, fx.Node):
        ctx.block(x)
        return fixed(x.ndim)
    dims = [dims] if isinstance(dims, int) else list(dims)
    if x.axis in [ctx.norm_dim(d, x.ndim) for d in dims]:
        ctx.block(x)
        return fixed(x.ndim)
    return x


@register_function("pixel_shuffle", "pixel_unshuffle")
def pixel_shuffle(ctx, node):
    """Channels move into space (or back): the channel axis is rearranged, so its channels stay."""
    x = ctx.label(node.args[0])
    if x is None:
        return ctx.opaque(node, "pixel shuffle of a non-tensor")
    return ctx.normalize(node, x, [x.ndim - 3], "pixel shuffle moves channels into space")


@register_module(nn.PixelShuffle, nn.PixelUnshuffle)
class PixelShuffleRule(ModuleRule):
    def propagate(self, ctx, node, module, x):
        return ctx.normalize(node, x, [x.ndim - 3], f"{type(module).__name__} moves channels into space")


@register_module(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
class ConvTransposeRule(ModuleRule):
    """Weight (in, out/groups, k...): input channels on dim 0 (a gate can sit at the input), output
    channels on dim 1 and the bias. Grouped transposed convolutions keep their channels."""

    needs_input = False

    def propagate(self, ctx, node, module, x):
        name = node.target
        ndim = len(_shape(node))
        cd = ndim - (len(module.kernel_size) + 1)
        out_ids, new_out = ctx.module_ids(name, "out", module.out_channels)
        in_ids, new_in = ctx.module_ids(name, "in", module.in_channels)
        if new_out:
            ctx.slot(name, ("weight",), 1, out_ids, "out")
            ctx.slot(name, ("bias",), 0, out_ids, "out")
        if new_in:
            ctx.slot(name, ("weight",), 0, in_ids, "in")
        if module.groups != 1:
            ctx.rec.block(out_ids)
            ctx.rec.block(in_ids)
            ctx.block(x)
            return fixed(ndim)
        if x is not None and x.labelled and x.axis == cd and len(x.ids) == module.in_channels:
            ctx.rec.unite(in_ids, x.ids)
            ctx.out.sinks.append(ChannelSink(name, cd, x.ids, node.name))
        else:
            ctx.rec.block(in_ids)
            ctx.block(x)
        if module.out_channels < 2:
            ctx.rec.block(out_ids)
            return fixed(ndim)
        return Label(ndim, cd, out_ids)

    def resize(self, module):
        module.in_channels = module.weight.shape[0]
        module.out_channels = module.weight.shape[1] * module.groups

    def fold(self, module, factor):
        w = module.weight
        w.mul_(factor.to(w.dtype).reshape((-1,) + (1,) * (w.ndim - 1)))


@register_function("unfold")
def unfold(ctx, node):
    """``x.unfold(dim, size, step)`` (sliding windows over a spatial axis, HaloNet's halos): the
    windows go to a new last axis and the channels stay where they are. ``F.unfold`` (im2col)
    mixes channels with kernel offsets: kept."""
    x = ctx.label(node.args[0])
    nd = len(_shape(node))
    if x is None:
        return ctx.opaque(node, "unfold of a non-tensor")
    if node.op != "call_method":
        ctx.block(x)
        ctx.out.opaque.append((node.name, "im2col mixes channels with kernel offsets"))
        return fixed(nd)
    if not x.labelled:
        return fixed(nd)
    dim = ctx.dim_arg(node, 1, "dimension")
    if not isinstance(dim, int) or ctx.norm_dim(dim, x.ndim) == x.axis:
        ctx.block(x)
        return fixed(nd)
    return Label(nd, x.axis, x.ids)
