"""Coupled groups: the structures that must be removed together, shared by inspect, gates and surgery.

``analyse(model, example)`` traces the model, propagates channels (see :mod:`propagate`) and
solves the equalities. A *structure* is one class of channel ids: removing it removes every
parameter index in the class (producer rows, norm entries, consumer columns, parameters added to a
residual stream) at once. Structures that touch exactly the same parameter dimensions form a
:class:`Group` (a layer's output channels, a residual stream, a block of attention heads, ...).
Only structures read by at least one weighted layer (a *sink*, where the gate sits) and not held by
the model's inputs, outputs or an operation without a rule are prunable.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import networkx as nx
import numpy as np
import torch
from torch import fx, nn

from ..errors import GatePlacementError
from .group import Group, Slot, Tap
from .lower import lower_attention
from .propagate import Propagation, propagate
from .trace import propagate_shapes, symbolic_trace, to_networkx
from .unionfind import Solution

KIND_ORDER = ("heads", "concat", "interleave", "grouped", "depthwise", "residual", "scale", "flatten")
KIND_NAMES = {"interleave": "shuffle"}


@dataclass
class Analysis:
    model: nn.Module
    gm: fx.GraphModule
    example_shape: tuple[int, ...]
    propagation: Propagation
    solution: Solution
    groups: list[Group]
    opaque_modules: list[str]
    timings: dict[str, float]
    lowered: list[str] = field(default_factory=list)  # attention modules written out in ``gm``
    _graph: nx.DiGraph | None = None

    @property
    def network(self) -> nn.Module:
        """The module to gate and fit: the model itself, or ``gm`` when attention was written out."""
        return self.gm if self.lowered else self.model

    @property
    def graph(self) -> nx.DiGraph:
        if self._graph is None:
            self._graph = to_networkx(self.gm, self.propagation.labels)
            for g in self.groups:
                for t in g.taps:
                    self._graph.nodes[t.node].setdefault("groups", []).append(g.id)
        return self._graph

    def kept(self, ids: np.ndarray, keep: dict[int, np.ndarray]) -> np.ndarray:
        """Whether each channel id survives when group ``g`` keeps structures ``keep[g]``."""
        n = self.solution.root.shape[0]
        alive = np.ones(n + 1, dtype=bool)  # the extra last entry stands for -1 (always kept)
        for g in self.groups:
            if g.id in keep:
                alive[g.classes] = np.asarray(keep[g.id], dtype=bool)
        ids = np.asarray(ids, dtype=np.int64)
        cls = self.solution.classes(ids)
        return alive[np.where(cls >= 0, cls, n)]

    def summary(self) -> list[dict]:
        return [g.to_dict() for g in self.groups]


def _unique_small(values: np.ndarray) -> np.ndarray:
    """np.unique for the common case of one repeated value (most slots belong to one group)."""
    if values.size == 0:
        return values
    first = values[0]
    if (values == first).all():
        return values[:1]
    return np.unique(values)


def _group_of_classes(slot_cls: list[np.ndarray], sink_cls: list[np.ndarray], n: int) -> list[np.ndarray]:
    """Prunable classes (read by a sink, not blocked), grouped by the set of parameter dimensions
    and gates they touch (a hash of that set per class)."""
    if not sink_cls:
        return []
    valid = np.zeros(n, dtype=bool)
    allc = np.concatenate(sink_cls)
    valid[allc[allc >= 0]] = True
    arrays = slot_cls + sink_cls
    cls = np.concatenate(arrays)
    key = np.repeat(np.arange(len(arrays), dtype=np.int64), [len(a) for a in arrays])
    keep = cls >= 0
    cls, key = cls[keep], key[keep]
    # two hashes of each class's multiset of slots: integer-valued float sums (exact below 2**53)
    rng = np.random.default_rng(0)
    h = np.stack([np.bincount(cls, weights=rng.integers(1, 2**20, size=len(arrays)).astype(np.float64)[key],
                              minlength=n) for _ in range(2)], axis=1)
    cand = np.flatnonzero(valid)
    if cand.size == 0:
        return []
    hc = h[cand]
    order = np.lexsort((hc[:, 1], hc[:, 0]))
    hs = hc[order]
    cuts = np.flatnonzero(np.any(np.diff(hs, axis=0) != 0, axis=1)) + 1
    groups = [np.sort(part) for part in np.split(cand[order], cuts)]
    groups.sort(key=lambda g: int(g[0]))
    return groups


def build_groups(prop: Propagation, sol: Solution) -> list[Group]:
    n = sol.root.shape[0]
    slot_cls = [sol.classes(s.ids) for s in prop.slots]
    sink_cls = [sol.classes(s.ids) for s in prop.sinks]
    class_groups = _group_of_classes(slot_cls, sink_cls, n)
    gid_of = np.full(n + 1, -1, dtype=np.int64)
    idx_of = np.full(n + 1, -1, dtype=np.int64)
    groups: list[Group] = []
    for gi, classes in enumerate(class_groups):
        gid_of[classes] = gi
        idx_of[classes] = np.arange(len(classes))
        groups.append(Group(gi, len(classes), classes=classes))

    def per_group(c):
        c = np.where(c >= 0, c, n)
        return gid_of[c], idx_of[c]

    for s, c in zip(prop.slots, slot_cls):
        g, idx = per_group(c)
        for gi in _unique_small(g[g >= 0]):
            groups[gi].slots.append(Slot(s.target, s.dim, np.where(g == gi, idx, -1), s.role, s.module))
    for s, c in zip(prop.sinks, sink_cls):
        g, idx = per_group(c)
        for gi in _unique_small(g[g >= 0]):
            groups[gi].taps.append(Tap(s.module, s.axis, np.where(g == gi, idx, -1), s.node, side=s.side))
    group_tags: list[set[str]] = [set() for _ in groups]
    for root, t in sol.tags.items():
        if gid_of[root] >= 0:
            group_tags[gid_of[root]] |= t
    for grp, tags in zip(groups, group_tags):
        if not tags & {"heads", "interleave", "grouped"} and any(
                (t.index >= 0).sum() > len(_unique_small(t.index[t.index >= 0])) for t in grp.taps if t.side == "in"):
            tags.add("flatten")
        grp.tags = sorted(KIND_NAMES.get(t, t) for t in tags)
        kind = next((k for k in KIND_ORDER if k in tags), "channels")
        grp.kind = KIND_NAMES.get(kind, kind)
    _name_groups(groups)
    return groups


def _name_groups(groups: list[Group]) -> None:
    """Each group named after its first producer (``group<id>`` without one), unique."""
    used: set[str] = set()
    for g in groups:
        name = g.producers[0] if g.producers else f"group{g.id}"
        if name in used:
            name = f"{name}#{g.id}"
        used.add(name)
        g.name = name


def solve_groups(model: nn.Module, prop, ignore: tuple[str, ...] = ()):
    """(solution, groups) of a propagation, with the outputs of the ``ignore`` layers kept whole;
    shared by the torch.fx and torch.export front ends."""
    for s in prop.slots:
        if s.module in ignore and s.role == "out":
            prop.recorder.block(s.ids)
    unknown = [n for n in ignore if n not in dict(model.named_modules())]
    if unknown:
        raise GatePlacementError(f"ignored layer {unknown[0]!r} is not a module of the model")
    sol = prop.recorder.solve()
    return sol, build_groups(prop, sol)


def analyse(model: nn.Module, example: torch.Tensor, ignore: tuple[str, ...] = ()) -> Analysis:
    """Trace, propagate channels, solve and group: everything later stages need."""
    t0 = time.perf_counter()
    gm, opaque = symbolic_trace(model)
    lowered = lower_attention(gm)
    t1 = time.perf_counter()
    propagate_shapes(gm, example)
    t2 = time.perf_counter()
    prop = propagate(gm)
    sol, groups = solve_groups(model, prop, ignore)
    t3 = time.perf_counter()
    return Analysis(model, gm, tuple(example.shape), prop, sol, groups, opaque,
                    {"trace_s": t1 - t0, "shapes_s": t2 - t1, "groups_s": t3 - t2}, lowered)


def prunable_share(analysis) -> float:
    """The *reach*: the share of the network's parameters that pruning can remove at all, i.e. the
    elements lying on an index that some group owns (a row of a producer, a column of a consumer,
    an entry of a norm). What an operation without a rule holds, or a group that touches the
    inputs or outputs, stays out of it; 0.3 means at most 30% of the parameters could go."""
    params = dict(analysis.network.named_parameters())
    reached: dict[str, list] = {}
    for g in analysis.groups:
        for s in g.slots:
            t = params.get(s.target)
            if t is None or s.dim >= t.ndim or len(s.index) != t.shape[s.dim]:
                continue
            dims = reached.setdefault(s.target, [np.zeros(n, dtype=bool) for n in t.shape])
            dims[s.dim] |= np.asarray(s.index) >= 0
    total = sum(t.numel() for t in params.values())
    # an element is out of reach only when each of its indices is out of reach on its dimension
    inside = sum(params[n].numel() - int(np.prod([(~d).sum() for d in dims], dtype=np.float64))
                 for n, dims in reached.items())
    return inside / total if total else 0.0
