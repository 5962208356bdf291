"""Normalisation layers. Per-channel statistics and affine parameters (batch and instance norm,
group norm with one channel per group) follow their channel; statistics over the channel axis
(layer norm, group norm with several channels per group) keep the channels they normalise."""

from __future__ import annotations

from torch import nn

from ..registry import ModuleRule, register_function, register_module


@register_module(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm1d, nn.InstanceNorm2d,
                 nn.InstanceNorm3d)
class BatchNormRule(ModuleRule):
    def propagate(self, ctx, node, module, x):
        if getattr(module, "affine", False) or getattr(module, "track_running_stats", False):
            return ctx.channelwise(node, x, ("weight", "bias", "running_mean", "running_var"), 1)
        return ctx.passthrough_spatial(x, node, x.ndim - 2)  # statistics per channel, over space only

    def resize(self, module):
        t = module.weight if module.weight is not None else module.running_mean
        module.num_features = t.shape[0]


@register_module(nn.GroupNorm)
class GroupNormRule(ModuleRule):
    def propagate(self, ctx, node, module, x):
        if module.num_groups == module.num_channels:
            return ctx.channelwise(node, x, ("weight", "bias"), 1)
        return ctx.normalize(node, x, [1] + list(range(2, x.ndim)), "GroupNorm mixes channels")

    def resize(self, module):
        module.num_channels = module.num_groups = module.weight.shape[0]


@register_module(nn.LayerNorm)
class LayerNormRule(ModuleRule):
    def propagate(self, ctx, node, module, x):
        k = len(module.normalized_shape)
        return ctx.normalize(node, x, list(range(x.ndim - k, x.ndim)), "LayerNorm normalises over channels")


@register_function("layer_norm")
def layer_norm(ctx, node):
    x = ctx.label(node.args[0])
    shape = ctx.dim_arg(node, 1, "normalized_shape")
    if x is None or not isinstance(shape, (list, tuple)):
        return ctx.opaque(node, "layer_norm with unknown shape")
    ctx.block_all((node.args[2:], node.kwargs))
    return ctx.normalize(node, x, list(range(x.ndim - len(shape), x.ndim)), "layer_norm normalises over channels")
