"""Pooling and resizing over spatial axes: channels on other axes pass; pooling over a channel axis
keeps the channels."""

from __future__ import annotations

from torch import nn

from ..propagate import _name
from ..registry import ModuleRule, register_function, register_module

POOL_MODULES = {
    nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3, nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3,
    nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3, nn.AdaptiveMaxPool1d: 1,
    nn.AdaptiveMaxPool2d: 2, nn.AdaptiveMaxPool3d: 3, nn.Upsample: None, nn.UpsamplingNearest2d: None,
    nn.UpsamplingBilinear2d: None,
}
POOL_FUNCS = {
    "adaptive_avg_pool1d": 1, "adaptive_avg_pool2d": 2, "adaptive_avg_pool3d": 3, "avg_pool1d": 1,
    "avg_pool2d": 2, "avg_pool3d": 3, "max_pool1d": 1, "max_pool2d": 2, "max_pool3d": 3,
    "adaptive_max_pool1d": 1, "adaptive_max_pool2d": 2, "interpolate": None, "upsample": None,
}


@register_module(*POOL_MODULES)
class Pooling(ModuleRule):
    """Pools (or resizes) the last k axes (None: every axis after batch and channel)."""

    def propagate(self, ctx, node, module, x):
        k = POOL_MODULES[type(module)]
        return ctx.passthrough_spatial(x, node, k if k is not None else x.ndim - 2)


@register_function(*POOL_FUNCS)
def pool(ctx, node):
    x = ctx.label(node.args[0])
    if x is None:
        return ctx.opaque(node, "pooling of a non-tensor")
    k = POOL_FUNCS[_name(node.target)]
    return ctx.passthrough_spatial(x, node, k if k is not None else x.ndim - 2)
