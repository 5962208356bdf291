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
from .propagate import Propagation, propagate
from .lower import lower_attention
from .trace import propagate_shapes, symbolic_trace, to_networkx
from .unionfind import Solution

KIND_ORDER = ("heads", "concat", "interleave", "grouped", "depthwise", "residual", "scale", "flatten")
KIND_NAMES = {"interleave": "shuffle"}


@dataclass
class GroupSlot:
    target: str  # parameter or buffer, fully qualified
    dim: int
    index: np.ndarray  # structure index per index of the dimension, -1 where not in this group
    role: str
    module: str


@dataclass
class Tap:
    module: str  # module whose input the gate scales
    axis: int
    index: np.ndarray  # structure index per input index along axis, -1 where not in this group
    node: str


@dataclass
class Group:
    id: int
    kind: str
    tags: list[str]
    classes: np.ndarray  # class ids, one per structure
    slots: list[GroupSlot] = field(default_factory=list)
    taps: list[Tap] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.classes)

    @property
    def channels(self) -> int:
        """Channels of the first producer (structures x channels per structure)."""
        for s in self.slots:
            if s.role in ("out", "norm", "param"):
                return int((s.index >= 0).sum())
        return self.size

    def members(self) -> list[dict]:
        seen: dict[tuple[str, str], dict] = {}
        for s in self.slots:
            key = (s.module or s.target, s.role)
            if key not in seen:
                seen[key] = {"name": s.module or s.target, "role": s.role, "channels": int((s.index >= 0).sum())}
        return list(seen.values())

    def to_dict(self) -> dict:
        return {"id": self.id, "kind": self.kind, "structures": self.size, "channels": self.channels,
                "tags": self.tags, "members": self.members(), "gates": [t.module for t in self.taps]}


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


def _group_of_classes(prop: Propagation, sol: Solution) -> tuple[list[np.ndarray], np.ndarray]:
    """Prunable classes, grouped by the set of parameter dimensions and gates they touch."""
    n = sol.root.shape[0]
    sink_cls = [sol.classes(s.ids) for s in prop.sinks]
    if not sink_cls:
        return [], np.zeros(0, dtype=np.int64)
    valid = np.zeros(n, dtype=bool)
    allc = np.concatenate(sink_cls)
    valid[allc[allc >= 0]] = True
    keys = []
    members = []
    for i, arr in enumerate([sol.classes(s.ids) for s in prop.slots] + sink_cls):
        c = np.unique(arr[arr >= 0])
        keys.append(np.full(c.shape, i, dtype=np.int64))
        members.append(c)
    cls = np.concatenate(members)
    key = np.concatenate(keys)
    rng = np.random.default_rng(0)
    rnd = rng.integers(1, 2**62, size=len(keys), dtype=np.int64).astype(np.uint64)
    h = np.zeros(n, dtype=np.uint64)
    np.add.at(h, cls, rnd[key])
    cand = np.flatnonzero(valid)
    if cand.size == 0:
        return [], cand
    order = np.argsort(h[cand], kind="stable")
    hs = h[cand][order]
    cuts = np.flatnonzero(np.diff(hs)) + 1
    groups = [np.sort(cand[order][s]) for s in np.split(np.arange(len(cand)), cuts)]
    groups.sort(key=lambda g: int(g[0]))
    return groups, cand


def build_groups(prop: Propagation, sol: Solution) -> list[Group]:
    class_groups, _ = _group_of_classes(prop, sol)
    n = sol.root.shape[0]
    gid_of = np.full(n + 1, -1, dtype=np.int64)
    idx_of = np.full(n + 1, -1, dtype=np.int64)
    groups: list[Group] = []
    for gi, classes in enumerate(class_groups):
        gid_of[classes] = gi
        idx_of[classes] = np.arange(len(classes))
        tags = set()
        for c in classes[:1]:
            tags |= sol.tags.get(int(c), set())
        groups.append(Group(gi, "", [], classes))

    def per_group(ids):
        c = sol.classes(ids)
        c = np.where(c >= 0, c, n)
        g = gid_of[c]
        return g, idx_of[c]

    for s in prop.slots:
        g, idx = per_group(s.ids)
        for gi in np.unique(g[g >= 0]):
            groups[gi].slots.append(GroupSlot(s.target, s.dim, np.where(g == gi, idx, -1), s.role, s.module))
    for s in prop.sinks:
        g, idx = per_group(s.ids)
        for gi in np.unique(g[g >= 0]):
            groups[gi].taps.append(Tap(s.module, s.axis, np.where(g == gi, idx, -1), s.node))
    for grp in groups:
        tags = set()
        for c in grp.classes:
            tags |= sol.tags.get(int(c), set())
        if any(np.bincount(t.index[t.index >= 0]).max() > 1 for t in grp.taps if (t.index >= 0).any()) and \
                not tags & {"heads", "interleave", "grouped"}:
            tags.add("flatten")
        grp.tags = sorted(KIND_NAMES.get(t, t) for t in tags)
        kind = next((k for k in KIND_ORDER if k in tags), None)
        if kind is None:
            kind = "channels"
        grp.kind = KIND_NAMES.get(kind, kind)
    return groups


def analyse(model: nn.Module, example: torch.Tensor, ignore: tuple[str, ...] = ()) -> Analysis:
    """Trace, propagate channels, solve and group: everything later stages need."""
    t0 = time.perf_counter()
    gm, opaque = symbolic_trace(model)
    lowered = lower_attention(gm)
    t1 = time.perf_counter()
    propagate_shapes(gm, example)
    t2 = time.perf_counter()
    prop = propagate(gm)
    for s in prop.slots:
        if s.module in ignore and s.role == "out":
            prop.recorder.block(s.ids)
    unknown = [n for n in ignore if n not in dict(model.named_modules())]
    if unknown:
        raise GatePlacementError(f"ignored layer {unknown[0]!r} is not a module of the model")
    sol = prop.recorder.solve()
    groups = build_groups(prop, sol)
    t3 = time.perf_counter()
    return Analysis(model, gm, tuple(example.shape), prop, sol, groups, opaque,
                    {"trace_s": t1 - t0, "shapes_s": t2 - t1, "groups_s": t3 - t2}, lowered)
