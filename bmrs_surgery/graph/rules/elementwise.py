"""Element-wise operations: activations, dropout, casts (channels pass unchanged) and binary
operations (operands' channels on the same axis are tied: a residual addition, a gating product)."""

from __future__ import annotations

from torch import fx, nn

from ..labels import Label, fixed
from ..propagate import _name, _shape
from ..registry import ModuleRule, register_function, register_module


@register_module(
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh,
    nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Identity, nn.Dropout, nn.Dropout1d,
    nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
)
class ChannelPreserving(ModuleRule):
    """Acts on each element alone: the output has the input's channels."""

    def propagate(self, ctx, node, module, x):
        return x


@register_module(nn.PReLU)
class PReLURule(ModuleRule):
    """One slope per channel (axis 1), or one shared slope."""

    def propagate(self, ctx, node, module, x):
        if module.num_parameters > 1:
            return ctx.channelwise(node, x, ("weight",), 1)
        return x

    def resize(self, module):
        module.num_parameters = module.weight.shape[0]


@register_function(
    "relu", "relu_", "relu6", "gelu", "silu", "silu_", "sigmoid", "sigmoid_", "tanh", "tanh_",
    "hardswish", "hardsigmoid", "hardtanh", "leaky_relu", "elu", "selu", "celu", "mish", "softplus",
    "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "stochastic_depth", "contiguous",
    "clone", "detach", "float", "half", "bfloat16", "double", "to", "type", "abs", "neg", "exp", "log",
    "sqrt", "rsqrt", "clamp", "clamp_", "clip", "sin", "cos", "erf", "logsigmoid", "sign", "square",
    "reciprocal", "identity", "hardswish_", "hardsigmoid_", "relu6_", "gelu_", "_patch_merging_pad",
)
def unary(ctx, node):
    x = ctx.label(node.args[0])
    ndim = len(_shape(node))
    if x is None:
        return ctx.opaque(node, "unary op on a non-tensor")
    if x.ndim != ndim:
        ctx.block(x)
        return fixed(ndim)
    ctx.block_all((node.args[1:], node.kwargs))
    return x



@register_function(
    "add", "add_", "iadd", "sub", "sub_", "isub", "mul", "mul_", "imul", "truediv", "div", "div_",
    "itruediv", "maximum", "minimum", "pow", "where",
)
def binary(ctx, node):
    out = _shape(node)
    nd = len(out)
    operands = []
    for a in list(node.args) + list(node.kwargs.values()):
        if isinstance(a, fx.Node):
            s = _shape(a)
            if s is None:
                continue
            operands.append((ctx.label(a) or fixed(len(s)), s))
    labelled = [(lab, s, lab.axis + nd - len(s)) for lab, s in operands if lab.labelled]
    if not labelled:
        return fixed(nd)

    def carries(p: int) -> bool:
        """Axis ``p`` of the output can keep its channels: the operands labelled there agree, and
        every other operand is broadcast along it (size 1), so it is not indexed by them."""
        on = [lab for lab, _s, q in labelled if q == p]
        if any(len(lab.ids) != len(on[0].ids) for lab in on):
            return False
        for lab, s in operands:
            if lab.labelled and lab.axis + nd - len(s) == p:
                continue
            q = p - (nd - len(s))
            if q >= 0 and s[q] > 1:
                return False
        return True

    # usually every labelled operand is on one axis (a residual addition, a gating product); an
    # operand labelled on another axis and broadcast along this one (a rotary table of head_dim
    # entries times q's heads) keeps its own channels whole, and the output carries this axis
    p0 = next((p for _lab, _s, p in labelled if carries(p)), None)
    if p0 is None:
        for lab, _, _ in labelled:
            ctx.block(lab)
        return fixed(nd)
    on = [lab for lab, _s, p in labelled if p == p0]
    for lab, _s, p in labelled:
        if p != p0:
            ctx.block(lab)
    tag = "residual" if _name(node.target) in ("add", "add_", "iadd") else "scale"
    for lab in on[1:]:
        ctx.rec.unite(on[0].ids, lab.ids, tag=tag)
    return Label(nd, p0, on[0].ids)
