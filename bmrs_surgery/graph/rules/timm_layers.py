"""timm's own versions of torch layers that compute what the torch layer computes: ``Linear`` (an
``nn.Linear`` whose forward calls ``F.linear`` with its own weight, for TorchScript) and
``Conv2dSame``/``Conv2dSameExport`` (an ``nn.Conv2d`` that pads like TensorFlow's "SAME" first);
timm's norms over channels that a rescale keeps exact: ``GlobalResponseNorm``
(:class:`GlobalResponseNormRule`) and its RMSNorms (:class:`ChannelRmsNormRule`); and its
weight-standardised convolutions (:class:`StandardisedConvRule`).
With their own ``forward`` they would be traced through, and a functional call cannot hold a gate,
so the channels they read (every timm classifier's input features) would be kept. Registered with
the torch layer's rule, they are one call each, a gate sits at their input and ``fold``/``resize``
act on their weight like the torch layer's; their forward (the padding) runs unchanged.

Registered only once timm is imported (by the model being traced): importing timm just for this
would cost every run a second or more. :func:`register_loaded` is called before each trace.
"""

from __future__ import annotations

import sys

from ..propagate import ChannelSink
from ..registry import ModuleRule, module_rules, register_module
from .layers import ConvRule, LinearRule
from .transformers_layers import rescale as rescale_rms_norm


def masked_channels(ctx, node, x, params, axis: int):
    """A norm over the channels on ``axis`` that a rescale keeps exact: its ``params`` follow the
    channels, and a mask tap on its input (``side="mask"``) zeroes a removed channel there."""
    out = ctx.channelwise(node, x, params, axis)
    if out is x:  # the channels pass
        ctx.out.sinks.append(ChannelSink(node.target, axis, x.ids, node.name, side="mask"))
    return out


class ChannelRmsNormRule(ModuleRule):
    """timm's RMSNorm over channels (``RmsNorm2d`` on NCHW, ``RmsNorm`` on the last axis, their
    ``Act`` and ``Fp32`` variants): ``y = w * x / sqrt(mean_C(x^2) + eps)``, then an elementwise
    activation. With a removed channel zero at its input (a mask tap), ``mean_C = (C'/C) mean_C'``,
    so the narrower norm is exact with ``w`` times ``sqrt(C/C')`` and ``eps`` times ``C/C'``, as for
    a transformers RMSNorm stream. Without a weight to rescale the channels are kept."""

    def __init__(self, axis: int):
        self.axis = axis

    def propagate(self, ctx, node, module, x):
        axis = self.axis % x.ndim
        if getattr(module, "weight", None) is None or not (x.labelled and x.axis == axis):
            return ctx.normalize(node, x, [axis], f"{type(module).__name__} normalises over channels")
        return masked_channels(ctx, node, x, ("weight",), axis)

    def resize(self, module):
        module.normalized_shape = (int(module.weight.shape[0]),)

    def width(self, module):
        return int(module.weight.shape[0]) if getattr(module, "weight", None) is not None else None

    def rescale(self, module, width):
        kept = int(module.weight.shape[0])
        if kept != width:
            rescale_rms_norm(module, width, kept, "scale")


class SimpleNormRule(ModuleRule):
    """timm's ``SimpleNorm``/``SimpleNorm2d`` (ConvNeXt's ``_rms`` variants): ``w * x /
    sqrt(var_C(x) + eps)``, LayerNorm's variance without its centring. The variance subtracts the
    channels' mean, so zeroing a channel changes it by more than a factor and no rescale makes the
    narrower norm exact: the channels it normalises are kept, as for a LayerNorm (one call, so the
    reason says which layer holds them)."""

    def __init__(self, axis: int):
        self.axis = axis

    def propagate(self, ctx, node, module, x):
        return ctx.normalize(node, x, [self.axis % x.ndim], f"{type(module).__name__} normalises over channels")


class GlobalResponseNormRule(ModuleRule):
    """timm's GlobalResponseNorm (ConvNeXt-V2): ``x + b + w * x * g / (mean_C(g) + eps)``, with
    ``g`` the spatial L2 norm of each channel. A statistic over the channels, yet exact to prune:
    a mask tap on its input (see ``graph.group.Tap``) makes a removed channel zero there, so it adds
    nothing to ``mean_C(g)``; with ``C'`` of ``C`` channels left, ``mean_C = (C'/C) mean_C'``, and
    multiplying ``w`` and ``eps`` by ``C/C'`` (:meth:`rescale`) gives the same outputs. The
    channels' E[theta] sits on the next layer's input, as for any layer between two others."""

    def propagate(self, ctx, node, module, x):
        axis = module.channel_dim % x.ndim
        if not (x.labelled and x.axis == axis):
            spatial = [d % x.ndim for d in module.spatial_dim]
            return ctx.normalize(node, x, spatial + [axis], "GlobalResponseNorm normalises over space and channels")
        return masked_channels(ctx, node, x, ("weight", "bias"), axis)

    def width(self, module):
        return int(module.weight.shape[0])

    def rescale(self, module, width):
        kept = int(module.weight.shape[0])
        if kept != width:
            module.weight.mul_(width / kept)
            module.eps = module.eps * width / kept


class StandardisedConvRule(ConvRule):
    """timm's weight-standardised convolutions (``StdConv2d``, ``ScaledStdConv2d`` and their
    ``Same`` variants: NF-Nets, NF-RegNets, BiT). The weight applied is each output row standardised
    over its input channels and kernel, ``w' = (w - mean) / sqrt(var + eps)``, times
    ``gain * scale`` for the scaled kind. Channels flow as through a convolution. Removing an input
    channel from ``w`` would change every row's mean and variance, so surgery first swaps the
    layer for a plain convolution holding ``w'`` (:meth:`freeze`: the same output, the padding
    kept), which then folds and slices exactly. The pruned network's layer is that convolution."""

    def freeze(self, module):
        import torch
        import torch.nn.functional as F
        from torch import nn

        with torch.no_grad():
            gain = getattr(module, "gain", None)
            affine = (gain * module.scale).view(-1) if gain is not None else None
            weight = F.batch_norm(module.weight.reshape(1, module.out_channels, -1), None, None, weight=affine,
                                  training=True, momentum=0.0, eps=module.eps).reshape_as(module.weight)
        dynamic = bool(getattr(module, "same_pad", False))
        if dynamic:
            from timm.layers.conv2d_same import Conv2dSame as cls
        else:
            cls = nn.Conv2d
        plain = cls(module.in_channels, module.out_channels, module.kernel_size, stride=module.stride,
                    padding=0 if dynamic else module.padding, dilation=module.dilation, groups=module.groups,
                    bias=module.bias is not None, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            plain.weight.copy_(weight)
            if module.bias is not None:
                plain.bias.copy_(module.bias)
        plain.train(module.training)
        return plain


_DONE = False

# (module path, class name, rule): each a torch layer with the same arithmetic
LAYERS = (
    ("timm.layers.linear", "Linear", LinearRule),
    ("timm.layers.conv2d_same", "Conv2dSame", ConvRule),
    ("timm.layers.conv2d_same", "Conv2dSameExport", ConvRule),
    ("timm.layers.grn", "GlobalResponseNorm", GlobalResponseNormRule),
    *(("timm.layers.std_conv", name, StandardisedConvRule)
      for name in ("StdConv2d", "StdConv2dSame", "ScaledStdConv2d", "ScaledStdConv2dSame")),
    *(("timm.layers.norm", name, ChannelRmsNormRule(1)) for name in ("RmsNorm2d", "RmsNorm2dFp32")),
    *(("timm.layers.norm_act", name, ChannelRmsNormRule(1)) for name in ("RmsNormAct2d", "RmsNormAct2dFp32")),
    *(("timm.layers.norm", name, ChannelRmsNormRule(-1)) for name in ("RmsNorm", "RmsNormFp32")),
    *(("timm.layers.norm", name, SimpleNormRule(1)) for name in ("SimpleNorm2d", "SimpleNorm2dFp32")),
    *(("timm.layers.norm", name, SimpleNormRule(-1)) for name in ("SimpleNorm", "SimpleNormFp32")),
    *(("timm.layers.norm_act", name, ChannelRmsNormRule(-1)) for name in ("RmsNormAct", "RmsNormActFp32")),
)


def register_loaded() -> None:
    """Register the rules for timm's layers, if timm has been imported (once)."""
    global _DONE
    if _DONE or "timm" not in sys.modules:
        return
    registered = module_rules()
    for module_path, name, rule in LAYERS:
        module = sys.modules.get(module_path)
        if module is None:
            try:
                __import__(module_path)
            except ImportError:
                continue
            module = sys.modules[module_path]
        cls = getattr(module, name, None)
        if cls is not None and cls not in registered:
            register_module(cls)(rule)
    _DONE = True
