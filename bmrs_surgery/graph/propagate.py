"""Channel propagation: one pass over an fx graph with shapes, recording what shrinks together.

For every node a rule computes the output :class:`Label` from the inputs' labels and records in the
:class:`Recorder` which channel ids must go together, which must stay, where parameters are sliced
(:class:`Slot`), where gates can sit (:class:`Sink`: a module input that reads channels through
its weights) and which literal sizes in the graph must be rewritten after pruning
(:class:`Rewrite`). An operation without a rule keeps every channel it touches: the result is
always safe, only less compressed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import fx, nn

from .labels import Label, expand_ids, fixed, reshape_groups
from .unionfind import BLOCKED, Recorder


@dataclass
class Slot:
    """Dimension ``dim`` of parameter/buffer ``target`` is indexed by ``ids``."""

    target: str
    dim: int
    ids: np.ndarray
    role: str  # out | in | norm | param
    module: str


@dataclass
class Sink:
    """Module ``module`` reads channels ``ids`` on input axis ``axis`` through its weights."""

    module: str
    axis: int
    ids: np.ndarray
    node: str


@dataclass
class Rewrite:
    """A literal size in node ``node`` that must follow the kept channels after pruning."""

    node: str
    kind: str  # "shape": positional size ``index``; "split": split sizes, one ids array per piece
    index: int
    ids: list[np.ndarray]


@dataclass
class Propagation:
    recorder: Recorder
    labels: dict[str, Any]
    slots: list[Slot] = field(default_factory=list)
    sinks: list[Sink] = field(default_factory=list)
    rewrites: list[Rewrite] = field(default_factory=list)
    opaque: list[tuple[str, str]] = field(default_factory=list)  # (node, why channels stay)


def _shape(node: fx.Node):
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _name(target) -> str:
    if isinstance(target, str):
        return target
    return getattr(target, "__name__", str(target))


UNARY = {
    "relu", "relu_", "relu6", "gelu", "silu", "silu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "hardswish",
    "hardsigmoid", "hardtanh", "leaky_relu", "elu", "selu", "celu", "mish", "softplus", "dropout",
    "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "stochastic_depth", "contiguous", "clone",
    "detach", "float", "half", "bfloat16", "double", "to", "type", "abs", "neg", "exp", "log", "sqrt",
    "rsqrt", "clamp", "clamp_", "clip", "sin", "cos", "erf", "logsigmoid", "sign", "square",
    "reciprocal", "identity", "hardswish_", "hardsigmoid_", "relu6_", "gelu_", "_patch_merging_pad",
}
BINARY = {
    "add", "add_", "iadd", "sub", "sub_", "isub", "mul", "mul_", "imul", "truediv", "div", "div_",
    "itruediv", "maximum", "minimum", "pow", "where",
}
RESHAPE = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as"}
PERMUTE = {"permute", "transpose", "swapaxes", "swapdims", "movedim", "t"}
REDUCE = {"mean", "sum", "amax", "amin", "std", "var", "max", "min", "logsumexp", "norm"}
SOFTMAX = {"softmax", "log_softmax", "_softmax"}
SPLIT = {"split", "chunk", "split_with_sizes", "tensor_split"}
POOL_FUNCS = {
    "adaptive_avg_pool1d": 1, "adaptive_avg_pool2d": 2, "adaptive_avg_pool3d": 3, "avg_pool1d": 1,
    "avg_pool2d": 2, "avg_pool3d": 3, "max_pool1d": 1, "max_pool2d": 2, "max_pool3d": 3,
    "adaptive_max_pool1d": 1, "adaptive_max_pool2d": 2, "interpolate": None, "upsample": None,
}
NON_TENSOR = {"size", "dim", "getattr", "_assert", "eq", "ne", "floordiv", "numel", "len"}

CHANNEL_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh,
    nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Identity, nn.Dropout, nn.Dropout1d,
    nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.PReLU,
)
POOL_MODULES = {
    nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3, nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3,
    nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3, nn.AdaptiveMaxPool1d: 1,
    nn.AdaptiveMaxPool2d: 2, nn.AdaptiveMaxPool3d: 3, nn.Upsample: None, nn.UpsamplingNearest2d: None,
    nn.UpsamplingBilinear2d: None,
}
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class Propagator:
    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.rec = Recorder()
        self.out = Propagation(self.rec, {})
        self._module_ids: dict[tuple[str, str], np.ndarray] = {}
        self._attr_labels: dict[str, Label] = {}

    # -- helpers ----------------------------------------------------------------------------
    def label(self, arg) -> Label | None:
        if isinstance(arg, fx.Node):
            lab = self.out.labels.get(arg.name)
            return lab if isinstance(lab, Label) else None
        return None

    def block(self, *labels) -> None:
        for lab in labels:
            if isinstance(lab, Label) and lab.labelled:
                self.rec.block(lab.ids)

    def block_all(self, value) -> None:
        """Keep every channel reachable in ``value`` (nodes, nested lists, tuples, dicts)."""
        def visit(v):
            if isinstance(v, fx.Node):
                lab = self.out.labels.get(v.name)
                if isinstance(lab, Label):
                    self.block(lab)
                elif isinstance(lab, (list, tuple)):
                    for item in lab:
                        self.block(item)
            elif isinstance(v, (list, tuple)):
                for item in v:
                    visit(item)
            elif isinstance(v, dict):
                for item in v.values():
                    visit(item)
        visit(value)

    def fixed_like(self, node: fx.Node):
        meta = node.meta.get("tensor_meta")
        if meta is None:
            return None
        if hasattr(meta, "shape"):
            return fixed(len(meta.shape))
        if isinstance(meta, (list, tuple)):
            return tuple(fixed(len(m.shape)) if hasattr(m, "shape") else None for m in meta)
        return None

    def opaque(self, node: fx.Node, why: str):
        if any(self._labelled_any(a) for a in node.all_input_nodes):
            self.out.opaque.append((node.name, why))
        self.block_all((node.args, node.kwargs))
        return self.fixed_like(node)

    def _labelled_any(self, node: fx.Node) -> bool:
        lab = self.out.labels.get(node.name)
        if isinstance(lab, Label):
            return lab.labelled
        return isinstance(lab, tuple) and any(isinstance(x, Label) and x.labelled for x in lab)

    def module_ids(self, module: str, key: str, n: int) -> tuple[np.ndarray, bool]:
        """Ids of one parameter dimension of a module, made once (a module may run twice)."""
        ids = self._module_ids.get((module, key))
        if ids is not None:
            return ids, False
        ids = self.rec.fresh(n)
        self._module_ids[(module, key)] = ids
        return ids, True

    def slot(self, module: str, params: tuple[str, ...], dim: int, ids: np.ndarray, role: str) -> None:
        mod = self.modules[module]
        for p in params:
            t = getattr(mod, p, None)
            if isinstance(t, torch.Tensor) and t.ndim > dim and t.shape[dim] == len(ids):
                self.out.slots.append(Slot(f"{module}.{p}" if module else p, dim, ids, role, module))

    @staticmethod
    def _norm_dim(d: int, ndim: int) -> int:
        return d + ndim if d < 0 else d

    # -- the pass ---------------------------------------------------------------------------
    def run(self) -> Propagation:
        for node in self.gm.graph.nodes:
            self.out.labels[node.name] = self.visit(node)
        return self.out

    def visit(self, node: fx.Node):
        if node.op == "placeholder":
            return self.fixed_like(node)
        if node.op == "output":
            self.block_all(node.args)
            return None
        if node.op == "get_attr":
            return self.get_attr(node)
        if node.op == "call_module":
            return self.call_module(node, self.modules[node.target])
        name = _name(node.target)
        shape = _shape(node)
        meta = node.meta.get("tensor_meta")
        if meta is None:
            if name in NON_TENSOR or not any(self.label(a) for a in node.all_input_nodes):
                return None
            if name == "getitem" and isinstance(self.out.labels.get(node.args[0].name), tuple):
                return self.out.labels[node.args[0].name][node.args[1]]
            return self.opaque(node, f"{name} returns no tensor")
        if name == "getitem":
            return self.getitem(node)
        if not any(isinstance(self.out.labels.get(a.name), (Label, tuple)) for a in node.all_input_nodes):
            return self.fixed_like(node)  # made from nothing prunable (constants, shapes)
        rule = self.FUNCTION_RULES.get(name)
        if rule is not None and (shape is not None or isinstance(meta, (list, tuple))):
            return rule(self, node)
        return self.opaque(node, f"no rule for {name}")

    # -- sources ----------------------------------------------------------------------------
    def get_attr(self, node: fx.Node):
        lab = self._attr_labels.get(node.target)
        if lab is not None:
            return lab
        t = _fetch_attr(self.gm, node.target)
        if not isinstance(t, torch.Tensor):
            return None
        dims = [d for d in range(t.ndim) if t.shape[d] > 1]
        if not dims or not t.is_floating_point():
            lab = fixed(t.ndim)
        else:
            d = dims[-1]
            ids = self.rec.fresh(t.shape[d])
            module, _, _ = node.target.rpartition(".")
            self.out.slots.append(Slot(node.target, d, ids, "param", module))
            lab = Label(t.ndim, d, ids)
        self._attr_labels[node.target] = lab
        return lab

    # -- modules ----------------------------------------------------------------------------
    def call_module(self, node: fx.Node, mod: nn.Module):
        x = self.label(node.args[0]) if node.args else None
        shape = _shape(node)
        if isinstance(mod, nn.Linear):
            return self.linear(node, x, mod)
        if isinstance(mod, CONVS):
            return self.conv(node, x, mod)
        if isinstance(mod, BATCH_NORMS) and x is not None:
            if getattr(mod, "affine", False) or getattr(mod, "track_running_stats", False):
                return self.channelwise(node, x, ("weight", "bias", "running_mean", "running_var"), 1)
            return self.passthrough_spatial(x, node, x.ndim - 1)
        if isinstance(mod, nn.GroupNorm) and x is not None:
            if mod.num_groups == mod.num_channels:
                return self.channelwise(node, x, ("weight", "bias"), 1, attr="groupnorm")
            return self.normalize(node, x, [1] + list(range(2, x.ndim)), "GroupNorm mixes channels")
        if isinstance(mod, nn.LayerNorm) and x is not None:
            k = len(mod.normalized_shape)
            return self.normalize(node, x, list(range(x.ndim - k, x.ndim)), "LayerNorm normalises over channels")
        if isinstance(mod, nn.Embedding):
            ids, _ = self.module_ids(node.target, "weight.1", mod.embedding_dim)
            self.slot(node.target, ("weight",), 1, ids, "out")
            return Label(len(shape), len(shape) - 1, ids) if shape else None
        if isinstance(mod, CHANNEL_MODULES) and x is not None:
            if isinstance(mod, nn.PReLU) and mod.num_parameters > 1:
                return self.channelwise(node, x, ("weight",), 1)
            return x
        if type(mod) in POOL_MODULES and x is not None:
            k = POOL_MODULES[type(mod)]
            return self.passthrough_spatial(x, node, k if k is not None else x.ndim - 2)
        if isinstance(mod, nn.Flatten) and x is not None:
            return self.reshape(node, x, None)
        if isinstance(mod, nn.Softmax) and x is not None:
            return self.softmax_rule(node, x, mod.dim)
        return self.opaque(node, f"{type(mod).__name__} has no rule")

    def linear(self, node, x: Label | None, mod: nn.Linear):
        name = node.target
        out_ids, _ = self.module_ids(name, "out", mod.out_features)
        if x is not None and x.axis == x.ndim - 1 and len(x.ids) == mod.in_features:
            in_ids = self._module_ids.get((name, "in"))
            if in_ids is None:
                self._module_ids[(name, "in")] = x.ids
                self.slot(name, ("weight",), 1, x.ids, "in")
            else:
                self.rec.unite(in_ids, x.ids)
            self.out.sinks.append(Sink(name, x.ndim - 1, x.ids, node.name))
        else:
            in_ids, new = self.module_ids(name, "in", mod.in_features)
            if new:
                self.slot(name, ("weight",), 1, in_ids, "in")
            self.rec.block(in_ids)
            self.block(x)
        self.slot(name, ("weight", "bias"), 0, out_ids, "out")
        ndim = len(_shape(node))
        if mod.out_features < 2:
            self.rec.block(out_ids)
            return fixed(ndim)
        return Label(ndim, ndim - 1, out_ids)

    def conv(self, node, x: Label | None, mod):
        name = node.target
        ndim = len(_shape(node))
        cd = ndim - (len(mod.kernel_size) + 1)
        g = mod.groups
        a = mod.in_channels // g
        b = mod.out_channels // g
        out_ids, new_out = self.module_ids(name, "out", mod.out_channels)
        if new_out:
            self.slot(name, ("weight", "bias"), 0, out_ids, "out")
        ok = x is not None and x.axis == cd
        if g == 1:
            in_ids, new = self.module_ids(name, "in", a)
            if new:
                self.slot(name, ("weight",), 1, in_ids, "in")
            if ok:
                self.rec.unite(in_ids, x.ids)
                self.out.sinks.append(Sink(name, cd, x.ids, node.name))
            else:
                self.rec.block(in_ids)
                self.block(x)
        elif a == 1:  # depthwise (channel multiplier b): input c feeds outputs c*b .. c*b+b-1
            if ok:
                self.rec.unite(np.repeat(x.ids, b), out_ids, tag="depthwise")
            else:
                self.rec.block(out_ids)
                self.block(x)
        else:  # grouped: keep every group the same size, prune index i in all groups at once
            in_ids, new = self.module_ids(name, "in", a)
            if new:
                self.slot(name, ("weight",), 1, in_ids, "in")
                grid = out_ids.reshape(g, b)
                self.rec.unite(np.broadcast_to(grid[:1], grid.shape).ravel(), grid.ravel(), tag="grouped")
            if ok:
                self.rec.unite(np.tile(in_ids, g), x.ids, tag="grouped")
                self.out.sinks.append(Sink(name, cd, x.ids, node.name))
            else:
                self.rec.block(in_ids)
                self.block(x)
        if mod.out_channels < 2:
            self.rec.block(out_ids)
            return fixed(ndim)
        return Label(ndim, cd, out_ids)

    def channelwise(self, node, x: Label, params, axis: int, attr: str = "norm"):
        name = node.target
        mod = self.modules[name]
        n = next(getattr(mod, p).shape[0] for p in params if isinstance(getattr(mod, p, None), torch.Tensor))
        if x.axis == axis and len(x.ids) == n:
            ids = self._module_ids.get((name, "c"))
            if ids is None:
                self._module_ids[(name, "c")] = x.ids
                self.slot(name, params, 0, x.ids, "norm")
            else:
                self.rec.unite(ids, x.ids)
            return x
        ids, new = self.module_ids(name, "c", n)
        if new:
            self.slot(name, params, 0, ids, "norm")
        self.rec.block(ids)
        self.block(x)
        return fixed(x.ndim)

    def normalize(self, node, x: Label, dims: list[int], why: str):
        """Statistics over these dims: removing a channel there changes every output."""
        if x.labelled and x.axis in dims:
            self.block(x)
            self.out.opaque.append((node.name, why))
            return fixed(x.ndim)
        if node.op == "call_function":
            self.block_all((node.args[1:], node.kwargs))
        return x

    def passthrough_spatial(self, x: Label, node, k: int):
        """Pooling / resizing over the last ``k`` dims: channels elsewhere pass."""
        ndim = len(_shape(node))
        if x.labelled and x.axis >= x.ndim - k:
            self.block(x)
            self.out.opaque.append((node.name, "pools over a channel dimension"))
            return fixed(ndim)
        return x.moved(x.axis, ndim)

    # -- functions and methods ----------------------------------------------------------------
    def f_unary(self, node):
        x = self.label(node.args[0])
        ndim = len(_shape(node))
        if x is None:
            return self.opaque(node, "unary op on a non-tensor")
        if x.ndim != ndim:
            self.block(x)
            return fixed(ndim)
        self.block_all((node.args[1:], node.kwargs))
        return x

    def f_binary(self, node):
        out = _shape(node)
        nd = len(out)
        operands = []
        for a in list(node.args) + list(node.kwargs.values()):
            if isinstance(a, fx.Node):
                s = _shape(a)
                if s is None:
                    continue
                operands.append((self.label(a) or fixed(len(s)), s))
        labelled = [(lab, s, lab.axis + nd - len(s)) for lab, s in operands if lab.labelled]
        if not labelled:
            return fixed(nd)
        lab0, _, p0 = labelled[0]
        broken = False
        for lab, s, p in labelled[1:]:
            if p != p0 or len(lab.ids) != len(lab0.ids):
                broken = True
        for lab, s in operands:
            if not lab.labelled:
                q = p0 - (nd - len(s))
                if q >= 0 and s[q] > 1:
                    broken = True
        if broken:
            for lab, _, _ in labelled:
                self.block(lab)
            return fixed(nd)
        tag = "residual" if _name(node.target) in ("add", "add_", "iadd") else "scale"
        for lab, _, _ in labelled[1:]:
            self.rec.unite(lab0.ids, lab.ids, tag=tag)
        return Label(nd, p0, lab0.ids)

    def _dim_arg(self, node, pos: int, key: str = "dim", default=None):
        if len(node.args) > pos:
            return node.args[pos]
        return node.kwargs.get(key, default)

    def f_cat(self, node):
        tensors = node.args[0] if node.args else node.kwargs["tensors"]
        nd = len(_shape(node))
        d = self._norm_dim(self._dim_arg(node, 1, default=0), nd)
        pieces = [(self.label(t) or fixed(nd), _shape(t)) for t in tensors]
        axes = {lab.axis for lab, _ in pieces if lab.labelled}
        if not axes:
            return fixed(nd)
        if axes == {d}:
            ids = np.concatenate([lab.ids if lab.labelled else np.full(s[d], BLOCKED) for lab, s in pieces])
            for lab, _ in pieces:
                if lab.labelled:
                    self.rec.tag(lab.ids, "concat")
            return Label(nd, d, ids)
        if len(axes) == 1 and d not in axes:
            (a,) = axes
            first = next(lab for lab, _ in pieces if lab.labelled)
            if all(lab.labelled or s[a] == 1 for lab, s in pieces):
                for lab, _ in pieces:
                    if lab.labelled and lab is not first:
                        self.rec.unite(first.ids, lab.ids, tag="concat")
                return Label(nd, a, first.ids)
        for lab, _ in pieces:
            self.block(lab)
        return fixed(nd)

    def f_stack(self, node):
        tensors = node.args[0] if node.args else node.kwargs["tensors"]
        nd = len(_shape(node))
        d = self._norm_dim(self._dim_arg(node, 1, default=0), nd)
        labs = [self.label(t) or fixed(nd - 1) for t in tensors]
        axes = {lab.axis for lab in labs}
        if axes == {None}:
            return fixed(nd)
        if len(axes) == 1:
            (a,) = axes
            for lab in labs[1:]:
                self.rec.unite(labs[0].ids, lab.ids, tag="concat")
            return Label(nd, a + (1 if a >= d else 0), labs[0].ids)
        for lab in labs:
            self.block(lab)
        return fixed(nd)

    def _shape_args(self, node) -> list | None:
        """The size arguments of view/reshape/expand, one per output dim (ints or nodes)."""
        name = _name(node.target)
        args = list(node.args[1:])
        if name in ("reshape", "view", "expand") and node.op == "call_function":
            args = [node.args[1]] if len(node.args) > 1 else [node.kwargs.get("shape")]
        if len(args) == 1 and isinstance(args[0], (list, tuple)):
            return list(args[0])
        if name in ("view", "reshape", "expand") and all(isinstance(a, (int, fx.Node)) for a in args):
            return args
        return None

    def f_reshape(self, node):
        x = self.label(node.args[0])
        if x is None:
            return self.opaque(node, "reshape of a non-tensor")
        return self.reshape(node, x, self._shape_args(node))

    def reshape(self, node, x: Label, sizes):
        src = _shape(node.args[0])
        dst = _shape(node)
        nd = len(dst)
        if not x.labelled:
            return fixed(nd)
        for ins, outs in reshape_groups(src, dst):
            if x.axis in ins:
                break
        else:
            self.block(x)
            return fixed(nd)
        in_sizes = tuple(src[i] for i in ins)
        full = expand_ids(x.ids, in_sizes, x.axis - ins.start)
        big = [o for o in outs if dst[o] > 1]
        if not big:
            self.block(x)
            return fixed(nd)
        if len(big) == 1:
            p, ids = big[0], full
        else:
            kinds = [sizes[o] if sizes is not None and o < len(sizes) else None for o in big]
            free = [o for o, k in zip(big, kinds) if not isinstance(k, int) or k == -1]
            if sizes is not None and len(free) == 1:
                p = free[0]
            else:
                p = big[0]
            grid = full.reshape([dst[o] for o in big])
            grid = np.moveaxis(grid, big.index(p), 0).reshape(dst[p], -1)
            self.rec.unite(np.broadcast_to(grid[:, :1], grid.shape), grid,
                           tag="heads" if p != big[-1] else "interleave")
            ids = grid[:, 0].copy()
        if sizes is not None and p < len(sizes) and isinstance(sizes[p], int) and sizes[p] != -1:
            self.out.rewrites.append(Rewrite(node.name, "shape", p, [ids]))
        return Label(nd, p, ids)

    def f_expand(self, node):
        x = self.label(node.args[0])
        dst = _shape(node)
        if x is None:
            return self.opaque(node, "expand of a non-tensor")
        if not x.labelled:
            return fixed(len(dst))
        p = x.axis + len(dst) - x.ndim
        sizes = self._shape_args(node)
        if sizes is not None and isinstance(sizes[p], int) and sizes[p] != -1:
            self.out.rewrites.append(Rewrite(node.name, "shape", p, [x.ids]))
        return Label(len(dst), p, x.ids)

    def f_permute(self, node):
        x = self.label(node.args[0])
        name = _name(node.target)
        nd = len(_shape(node))
        if x is None:
            return self.opaque(node, "permute of a non-tensor")
        if not x.labelled:
            return fixed(nd)
        rest = list(node.args[1:])
        if name == "permute":
            dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
            if not dims:
                dims = node.kwargs.get("dims")
            perm = [self._norm_dim(d, nd) for d in dims]
        elif name == "t":
            perm = list(range(nd))[::-1]
        elif name == "movedim":
            src = self._norm_dim(rest[0], nd)
            dst = self._norm_dim(rest[1], nd)
            perm = [d for d in range(nd) if d != src]
            perm.insert(dst, src)
        else:
            d0 = self._norm_dim(rest[0] if rest else node.kwargs["dim0"], nd)
            d1 = self._norm_dim(rest[1] if len(rest) > 1 else node.kwargs["dim1"], nd)
            perm = list(range(nd))
            perm[d0], perm[d1] = perm[d1], perm[d0]
        return Label(nd, perm.index(x.axis), x.ids)

    def f_reduce(self, node):
        x = self.label(node.args[0])
        nd = len(_shape(node))
        if x is None:
            return self.opaque(node, "reduction of a non-tensor")
        if not x.labelled:
            return fixed(nd)
        dims = self._dim_arg(node, 1)
        if dims is None:
            self.block(x)
            return fixed(nd)
        dims = [dims] if isinstance(dims, int) else list(dims)
        dims = [self._norm_dim(d, x.ndim) for d in dims]
        if x.axis in dims:
            self.block(x)
            self.out.opaque.append((node.name, "reduces over channels"))
            return fixed(nd)
        axis = x.axis if nd == x.ndim else x.axis - sum(d < x.axis for d in dims)
        return Label(nd, axis, x.ids)

    def softmax_rule(self, node, x: Label, dim):
        nd = x.ndim
        if dim is None or (x.labelled and self._norm_dim(dim, nd) == x.axis):
            self.block(x)
            return fixed(nd)
        return x

    def f_softmax(self, node):
        x = self.label(node.args[0])
        if x is None:
            return self.opaque(node, "softmax of a non-tensor")
        return self.softmax_rule(node, x, self._dim_arg(node, 1))

    def f_pool(self, node):
        x = self.label(node.args[0])
        if x is None:
            return self.opaque(node, "pooling of a non-tensor")
        k = POOL_FUNCS[_name(node.target)]
        return self.passthrough_spatial(x, node, k if k is not None else x.ndim - 2)

    def f_pad(self, node):
        x = self.label(node.args[0])
        pad = self._dim_arg(node, 1, "pad")
        if x is None or not isinstance(pad, (list, tuple)):
            return self.opaque(node, "pad with unknown sizes")
        k = len(pad) // 2
        if x.labelled and x.axis >= x.ndim - k and any(pad[2 * (x.ndim - 1 - x.axis): 2 * (x.ndim - 1 - x.axis) + 2]):
            self.block(x)
            return fixed(x.ndim)
        return x

    def f_flatten(self, node):
        x = self.label(node.args[0])
        if x is None:
            return self.opaque(node, "flatten of a non-tensor")
        return self.reshape(node, x, None)

    def getitem(self, node):
        src = node.args[0]
        lab = self.out.labels.get(src.name) if isinstance(src, fx.Node) else None
        if isinstance(lab, tuple):
            return lab[node.args[1]]
        x = self.label(src)
        nd = len(_shape(node))
        if x is None or not x.labelled:
            self.block_all(node.args[1])
            return fixed(nd)
        idx = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
        if any(isinstance(i, (fx.Node, list)) for i in idx):
            self.block(x)
            self.block_all(idx)
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
                    self.block(x)
                    return fixed(nd)
                dim += 1
            elif isinstance(i, slice):
                if dim == x.axis:
                    if i == slice(None):
                        return Label(nd, out, x.ids)
                    self.block(x)
                    return fixed(nd)
                dim += 1
                out += 1
        return Label(nd, out + x.axis - dim, x.ids)

    def f_split(self, node):
        x = self.label(node.args[0])
        metas = node.meta.get("tensor_meta")
        if x is None or not isinstance(metas, (list, tuple)):
            return self.opaque(node, "split of a non-tensor")
        name = _name(node.target)
        nd = x.ndim
        d = self._norm_dim(self._dim_arg(node, 2, default=0), nd)
        if not x.labelled:
            return tuple(fixed(nd) for _ in metas)
        if d != x.axis:
            return tuple(Label(nd, x.axis, x.ids) for _ in metas)
        if name == "tensor_split":
            self.block(x)
            return tuple(fixed(nd) for _ in metas)
        pieces, start = [], 0
        for m in metas:
            n = m.shape[d]
            pieces.append(x.ids[start:start + n])
            start += n
        self.out.rewrites.append(Rewrite(node.name, "split", d, pieces))
        return tuple(Label(nd, d, p) if len(p) > 1 else self._blocked_piece(p, nd) for p in pieces)

    def _blocked_piece(self, ids, nd):
        self.rec.block(ids)
        return fixed(nd)

    def f_unbind(self, node):
        x = self.label(node.args[0])
        metas = node.meta.get("tensor_meta") or ()
        d = self._dim_arg(node, 1, default=0)
        if x is None:
            return self.opaque(node, "unbind of a non-tensor")
        if x.labelled and self._norm_dim(d, x.ndim) == x.axis:
            self.block(x)
            return tuple(fixed(x.ndim - 1) for _ in metas)
        if not x.labelled:
            return tuple(fixed(x.ndim - 1) for _ in metas)
        axis = x.axis - (1 if self._norm_dim(d, x.ndim) < x.axis else 0)
        return tuple(Label(x.ndim - 1, axis, x.ids) for _ in metas)

    def f_matmul(self, node):
        a_node, b_node = node.args[0], node.args[1]
        a, b = self.label(a_node), self.label(b_node)
        sa, sb, so = _shape(a_node), _shape(b_node), _shape(node)
        if a is None or b is None or len(sa) < 2 or len(sb) < 2:
            return self.opaque(node, "matmul of vectors or non-tensors")
        nd = len(so)
        pa = a.axis + nd - len(sa) if a.labelled else None
        pb = b.axis + nd - len(sb) if b.labelled else None
        contracted = (a.labelled and a.axis == len(sa) - 1) or (b.labelled and b.axis == len(sb) - 2)
        if contracted:  # reading channels without weights: nothing to hold a gate
            self.block(a, b)
            self.out.opaque.append((node.name, "contracts channels without a weight"))
            return fixed(nd)
        batch = nd - 2
        if pa is not None and pb is not None:
            if pa == pb and pa < batch:
                self.rec.unite(a.ids, b.ids, tag="heads")
                return Label(nd, pa, a.ids)
            self.block(a, b)
            return fixed(nd)
        lab, p, s_other, other_off = (a, pa, sb, nd - len(sb)) if pa is not None else (b, pb, sa, nd - len(sa))
        if p is None:
            return fixed(nd)
        if p < batch:
            q = p - other_off
            if q >= 0 and s_other[q] > 1:
                self.block(lab)
                return fixed(nd)
        return Label(nd, p, lab.ids)

    def f_sdpa(self, node):
        q, k, v = (self.label(a) for a in node.args[:3])
        so = _shape(node)
        nd = len(so)
        if q is None or k is None or v is None:
            return self.opaque(node, "attention on non-tensors")
        if any(lab.labelled and lab.axis == lab.ndim - 1 for lab in (q, k)):
            self.block(q, k, v)
            self.out.opaque.append((node.name, "attention over channels"))
            return fixed(nd)
        labs = [lab for lab in (q, k, v) if lab.labelled]
        self.block_all((node.args[3:], node.kwargs))
        if not labs:
            return fixed(nd)
        heads = [lab for lab in labs if lab.axis < lab.ndim - 2]
        if len(heads) == 3 and len({h.axis for h in heads}) == 1:
            self.rec.unite(q.ids, k.ids, tag="heads")
            self.rec.unite(q.ids, v.ids, tag="heads")
            return Label(nd, q.axis, q.ids)
        if len(labs) == 1 and v.labelled and v.axis == v.ndim - 1:
            return Label(nd, nd - 1, v.ids)
        self.block(q, k, v)
        return fixed(nd)

    def f_linear(self, node):
        x = self.label(node.args[0])
        w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        wl = self.label(w)
        nd = len(_shape(node))
        self.block(x)
        if wl is not None and wl.labelled and wl.axis == 0:  # output rows come from a parameter
            bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            bl = self.label(bias)
            if bl is not None and bl.labelled:
                self.rec.unite(wl.ids, bl.ids)
            elif bias is not None:
                self.block(wl)
            return Label(nd, nd - 1, wl.ids)
        self.block(wl, self.label(node.args[2]) if len(node.args) > 2 else None)
        return fixed(nd)

    def f_layer_norm(self, node):
        x = self.label(node.args[0])
        shape = self._dim_arg(node, 1, "normalized_shape")
        if x is None or not isinstance(shape, (list, tuple)):
            return self.opaque(node, "layer_norm with unknown shape")
        self.block_all((node.args[2:], node.kwargs))
        return self.normalize(node, x, list(range(x.ndim - len(shape), x.ndim)), "layer_norm normalises over channels")

    def f_einsum(self, node):
        eq = node.args[0]
        ops = node.args[1:]
        if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
            ops = ops[0]
        if not isinstance(eq, str) or "..." in eq or "->" not in eq:
            return self.opaque(node, "einsum without explicit output")
        lhs, rhs = eq.replace(" ", "").split("->")
        terms = lhs.split(",")
        labs = [self.label(o) for o in ops]
        nd = len(rhs)
        axis_letter = None
        first = None
        for term, lab in zip(terms, labs):
            if lab is None or not lab.labelled:
                continue
            letter = term[lab.axis]
            if letter not in rhs or (axis_letter is not None and letter != axis_letter):
                for lb in labs:
                    self.block(lb)
                self.out.opaque.append((node.name, "einsum contracts channels"))
                return fixed(nd)
            axis_letter = letter
            if first is None:
                first = lab
            else:
                self.rec.unite(first.ids, lab.ids, tag="heads")
        if first is None:
            return fixed(nd)
        for term, lab, o in zip(terms, labs, ops):
            if (lab is None or not lab.labelled) and axis_letter in term and _shape(o)[term.index(axis_letter)] > 1:
                for lb in labs:
                    self.block(lb)
                return fixed(nd)
        return Label(nd, rhs.index(axis_letter), first.ids)

    FUNCTION_RULES: dict[str, Callable] = {}


def _fetch_attr(gm: nn.Module, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _register():
    P = Propagator
    table = [(UNARY, P.f_unary), (BINARY, P.f_binary), (RESHAPE, P.f_reshape), (PERMUTE, P.f_permute),
             (REDUCE, P.f_reduce), (SOFTMAX, P.f_softmax), (SPLIT, P.f_split), (POOL_FUNCS, P.f_pool)]
    for names, rule in table:
        P.FUNCTION_RULES.update(dict.fromkeys(names, rule))
    P.FUNCTION_RULES.update({
        "flatten": P.f_flatten, "cat": P.f_cat, "concat": P.f_cat, "concatenate": P.f_cat, "stack": P.f_stack,
        "expand": P.f_expand, "matmul": P.f_matmul, "bmm": P.f_matmul, "scaled_dot_product_attention": P.f_sdpa,
        "linear": P.f_linear, "layer_norm": P.f_layer_norm, "einsum": P.f_einsum, "unbind": P.f_unbind,
        "pad": P.f_pad,
    })


_register()


def propagate(gm: fx.GraphModule) -> Propagation:
    """Run the channel propagation over a shape-annotated graph module."""
    return Propagator(gm).run()
