"""Channel propagation: one pass over an fx graph with shapes, recording what shrinks together.

For every node the operation's rule (see :mod:`registry`; the rules live in :mod:`rules`) computes
the output :class:`Label` from the inputs' labels and records in the :class:`Recorder` which
channel ids must go together, which must stay, where parameters are sliced (:class:`ChannelSlot`),
where gates can sit (:class:`ChannelSink`: a module input that reads channels through its weights)
and which literal sizes in the graph must be rewritten after pruning (:class:`Rewrite`). These are
raw records over channel ids; :mod:`groups` solves them into :class:`~.group.Group` objects. An
operation without a rule keeps every channel it touches: the result is always safe, only less
compressed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from . import registry
from .labels import Label, expand_ids, fixed, reshape_groups
from .unionfind import Recorder


@dataclass
class ChannelSlot:
    """Dimension ``dim`` of parameter/buffer ``target`` is indexed by ``ids``."""

    target: str
    dim: int
    ids: np.ndarray
    role: str  # out | in | norm | param
    module: str


@dataclass
class ChannelSink:
    """Module ``module`` reads channels ``ids`` on input axis ``axis`` through its weights (or, with
    ``side="mask"``, normalises over them: the group's keep-mask zeroes a removed channel there)."""

    module: str
    axis: int
    ids: np.ndarray
    node: str
    side: str = "in"


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
    slots: list[ChannelSlot] = field(default_factory=list)
    sinks: list[ChannelSink] = field(default_factory=list)
    rewrites: list[Rewrite] = field(default_factory=list)
    opaque: list[tuple[str, str]] = field(default_factory=list)  # (node, why channels stay)


NON_TENSOR = {"size", "dim", "getattr", "_assert", "eq", "ne", "floordiv", "numel", "len"}


def _shape(node: fx.Node):
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _name(target) -> str:
    if isinstance(target, str):
        return target
    return getattr(target, "__name__", str(target))


class Propagator:
    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.rec = Recorder()
        self.out = Propagation(self.rec, {})
        self._module_ids: dict[tuple[str, str], np.ndarray] = {}
        self._attr_labels: dict[str, Label] = {}

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
        if any(self.labelled_any(a) for a in node.all_input_nodes):
            self.out.opaque.append((node.name, why))
        self.block_all((node.args, node.kwargs))
        return self.fixed_like(node)

    def labelled_any(self, node: fx.Node) -> bool:
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
                self.out.slots.append(ChannelSlot(f"{module}.{p}" if module else p, dim, ids, role, module))

    @staticmethod
    def norm_dim(d: int, ndim: int) -> int:
        return d + ndim if d < 0 else d

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
        meta = node.meta.get("tensor_meta")
        if meta is None:
            if name in NON_TENSOR or not any(self.label(a) for a in node.all_input_nodes):
                return None
            if name == "getitem" and isinstance(self.out.labels.get(node.args[0].name), tuple):
                return self.out.labels[node.args[0].name][node.args[1]]
            return self.opaque(node, f"{name} returns no tensor")
        if name != "getitem" and not any(
                isinstance(self.out.labels.get(a.name), (Label, tuple)) for a in node.all_input_nodes):
            return self.fixed_like(node)  # made from nothing prunable (constants, shapes)
        rule = registry.function_rule(name)
        if rule is not None and (_shape(node) is not None or isinstance(meta, (list, tuple))):
            return rule(self, node)
        return self.opaque(node, f"no rule for {name}")

    def get_attr(self, node: fx.Node):
        """A parameter or buffer read directly: its last non-trivial dimension is taken as its
        channel dimension (positional embeddings, class tokens, layer scales); rules that know
        better (a functional convolution's weight) ask :meth:`param_ids` for other dimensions."""
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
            lab = Label(t.ndim, d, self.param_ids(node.target, d, "param"))
        self._attr_labels[node.target] = lab
        return lab

    def param_ids(self, target: str, dim: int, role: str) -> np.ndarray:
        """Channel ids of dimension ``dim`` of parameter ``target`` (made, with their slot, once)."""
        ids = self._module_ids.get((target, f"dim{dim}"))
        if ids is None:
            t = _fetch_attr(self.gm, target)
            ids = self.rec.fresh(t.shape[dim])
            self._module_ids[(target, f"dim{dim}")] = ids
            module, _, _ = target.rpartition(".")
            self.out.slots.append(ChannelSlot(target, dim, ids, role, module))
        return ids

    def call_module(self, node: fx.Node, mod: nn.Module):
        rule = registry.module_rule(mod)
        if rule is None:
            return self.opaque(node, f"{type(mod).__name__} has no rule")
        x = self.label(node.args[0]) if node.args else None
        if x is None and rule.needs_input:
            return self.opaque(node, f"{type(mod).__name__} on a non-tensor")
        return rule.propagate(self, node, mod, x)

    # -- helpers for rules ------------------------------------------------------------------------
    def dense(self, node, x: Label | None, n_in: int, n_out: int, in_params=("weight",), out_params=("weight", "bias"),
              in_dim: int = 1, out_dim: int = 0):
        """A layer that reads its input's last axis through a weight matrix (``nn.Linear`` and its
        kind): input channels on ``in_dim`` of ``in_params`` (a gate can sit there), output channels
        on ``out_dim`` of ``out_params`` and on the output's last axis."""
        name = node.target
        out_ids, new_out = self.module_ids(name, "out", n_out)
        if x is not None and x.axis == x.ndim - 1 and len(x.ids) == n_in:
            in_ids = self._module_ids.get((name, "in"))
            if in_ids is None:
                self._module_ids[(name, "in")] = x.ids
                self.slot(name, in_params, in_dim, x.ids, "in")
            else:
                self.rec.unite(in_ids, x.ids)
            self.out.sinks.append(ChannelSink(name, x.ndim - 1, x.ids, node.name))
        else:
            in_ids, new = self.module_ids(name, "in", n_in)
            if new:
                self.slot(name, in_params, in_dim, in_ids, "in")
            self.rec.block(in_ids)
            self.block(x)
        if new_out:  # a layer called several times (shared MLPs) is sliced once
            self.slot(name, out_params, out_dim, out_ids, "out")
        ndim = len(_shape(node))
        if n_out < 2:
            self.rec.block(out_ids)
            return fixed(ndim)
        return Label(ndim, ndim - 1, out_ids)

    def set_role(self, target: str, role: str) -> None:
        """Name what a parameter's recorded dimensions are (e.g. "norm" for batch-norm statistics
        read by a functional call), for reports."""
        for s in self.out.slots:
            if s.target == target:
                s.role = role

    def channelwise(self, node, x: Label, params, axis: int):
        """A layer whose ``params`` hold one entry per channel on ``axis`` (norms, scales)."""
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

    def dim_arg(self, node, pos: int, key: str = "dim", default=None):
        if len(node.args) > pos:
            return node.args[pos]
        return node.kwargs.get(key, default)

    def shape_args(self, node) -> list | None:
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

    def reshape(self, node, x: Label, sizes):
        src = _shape(node.args[0])
        dst = _shape(node)
        nd = len(dst)
        if not x.labelled:
            return fixed(nd)
        for ins, outs in reshape_groups(src, dst):  # noqa: B007 - outs is used after the break
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
            fused = len(big) >= 3 and dst[big[0]] in (2, 3)
            # a fused projection split as (3, heads, head_dim) (timm's qkv) or (2, heads, head_dim)
            # (k and v): a structure is one head across q, k and v; also with the head size written
            # -1 (EVA's ``reshape(B, N, 3, heads, -1)``) when the 3 is written and nothing but the
            # channels is split (SAM's ``reshape(3, B * heads, H * W, -1)`` mixes in the tokens)
            only_channels = all(src[i] == 1 for i in ins if i != x.axis)
            if sizes is not None and len(free) == 1 and not (fused and only_channels and kinds[0] == dst[big[0]]):
                p = free[0]
            elif fused:
                p = big[1]
            else:
                p = big[0]
            grid = full.reshape([dst[o] for o in big])
            grid = np.moveaxis(grid, big.index(p), 0).reshape(dst[p], -1)
            self.rec.unite(np.broadcast_to(grid[:, :1], grid.shape), grid,
                           tag="heads" if p != big[-1] else "interleave")
            ids = grid[:, 0].copy()
        merged = sizes is not None and p < len(sizes) and isinstance(sizes[p], fx.Node) and \
            _name(sizes[p].target) in ("mul", "imul") and x.axis > 0 and src[x.axis - 1] == 1
        if (p == 0 and src[0] == 1 and x.axis != 0 and len(src) > 1) or merged or (
                len(ins) > 1 and any(src[i] == 1 for i in ins if i < x.axis)):
            # channels merged with the batch axis (``reshape(B * heads, ...)``, also after a permute
            # put q/k/v first: SAM's ``reshape(3, B * heads, H * W, -1)``, a size computed as a
            # product next to a size-1 axis): the analysis runs at
            # batch 1, where that looks like a channel axis; at any other batch size it is not
            self.block(x)
            return fixed(nd)
        # the channel count, a literal or read off another tensor (``reshape(B, N, C)`` with C the
        # attention's input width, which pruned heads no longer match): written as the kept count
        if sizes is not None and p < len(sizes) and (
                isinstance(sizes[p], fx.Node) or (isinstance(sizes[p], int) and sizes[p] != -1)):
            self.rewrite(node, "shape", p, [ids])
        return Label(nd, p, ids)

    def rewrite(self, node, kind: str, index: int, ids: list[np.ndarray]) -> None:
        """A literal size that counts channels: rewritten after pruning (:class:`Rewrite`). A graph
        captured with torch.export is analysis only; the pruned network is the eager model, whose
        code is not rewritten, and only transformers' modules get their size attributes updated at
        surgery (``hf.update_size_attributes``). A size in any other module's code (Hiera's
        ``reshape(B, -1, self.dim_out)``) cannot follow: those channels are kept."""
        owner = _eager_owner(node)
        if owner is None or owner.startswith("transformers."):
            self.out.rewrites.append(Rewrite(node.name, kind, index, ids))
            return
        for piece in ids:
            self.rec.block(piece)
        where = f"{owner.rpartition('.')[2]}'s code" if owner else "the model's code"
        self.out.opaque.append((node.name, f"a size written in {where} (captured with torch.export) "
                                           "cannot follow pruned channels"))

    def softmax_rule(self, node, x: Label, dim):
        nd = x.ndim
        if dim is None or (x.labelled and self.norm_dim(dim, nd) == x.axis):
            self.block(x)
            return fixed(nd)
        return x

    def blocked_piece(self, ids, nd):
        self.rec.block(ids)
        return fixed(nd)


def _eager_owner(node: fx.Node) -> str | None:
    """None for a torch.fx node (the pruned network is the graph itself); for an ATen node of a
    torch.export capture, the type of the innermost module whose code it runs ("" at the top)."""
    if not isinstance(node.target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return None
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    entry = list(stack.values())[-1]
    typ = entry[1] if isinstance(entry, tuple) and len(entry) > 1 else ""
    return typ if isinstance(typ, str) else f"{typ.__module__}.{typ.__qualname__}"


def _fetch_attr(gm: nn.Module, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def propagate(gm: fx.GraphModule) -> Propagation:
    """Run the channel propagation over a shape-annotated graph module."""
    registry._load_builtin()
    from .rules.timm_layers import register_loaded

    register_loaded()  # timm's copies of torch layers, once timm is imported
    return Propagator(gm).run()
