"""The coupled group: one typed record shared by analysis, ``inspect``, gates, plan, accounting,
surgery and reports.

A *structure* (a neuron, a channel, an attention head, a residual-stream channel) is the unit that
is kept or removed. A :class:`Group` is a set of structures that touch exactly the same parameter
dimensions: removing structure ``i`` of a group removes index ``i`` wherever the group reaches.

* :class:`Slot`: a parameter (or buffer) dimension the group's structures own; ``index`` gives the
  structure of each index along ``dim`` (``-1``: not this group's, left alone).
* :class:`Tap`: the input of a weighted layer that reads the group's channels; the gate multiplies
  that input along ``axis`` (``index`` as for slots), and a kept gate's E[theta] folds into the
  layer's input columns. A tap with ``side="out"`` sits on the *output* of a layer that writes the
  channels instead (the residual stream of an RMSNorm model, where a pruned channel must be zero
  in the stream itself); its E[theta] folds into that layer's output rows. A tap with
  ``side="mask"`` sits on the input of a norm over the group's channels (timm's
  GlobalResponseNorm) and multiplies it by the keep-mask alone (0 or 1, nothing to fold): a
  removed channel is zero there, so the narrower norm can be made exact. A tap with
  ``side="divide"`` runs no gate: at surgery the RMSNorm it names has its weight divided by E[theta],
  undoing the E[theta] that tied embeddings fold into the output layer it feeds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Slot:
    target: str  # parameter or buffer, fully qualified
    dim: int
    index: np.ndarray  # structure per index of ``dim``, -1 where not in this group
    role: str  # out | in | norm | param
    module: str  # the module owning ``target`` ("" for the root)

    def state(self) -> dict:
        return {"target": self.target, "dim": self.dim, "index": self.index.tolist(), "role": self.role,
                "module": self.module}


@dataclass
class Tap:
    module: str  # the layer whose input the gate scales
    axis: int
    index: np.ndarray  # structure per input index along ``axis``, -1 where not in this group
    node: str = ""  # the graph node of the call (empty for a group loaded from a file)
    side: str = "in"  # "in": the gate scales the layer's input; "out": its output (a writer of the stream);
    # "mask": the keep-mask alone multiplies the input of a norm over the channels; "divide": no gate,
    # surgery divides this RMSNorm's weight by E[theta] (tied embeddings: the output layer it feeds)

    def state(self) -> dict:
        state = {"module": self.module, "axis": self.axis, "index": self.index.tolist()}
        if self.side != "in":
            state["side"] = self.side
        return state


def _unique(items) -> list[str]:
    return list(dict.fromkeys(i for i in items if i))


@dataclass
class Group:
    id: int
    size: int  # number of structures
    kind: str = "channels"
    tags: list[str] = field(default_factory=list)
    slots: list[Slot] = field(default_factory=list)
    taps: list[Tap] = field(default_factory=list)
    name: str = ""
    classes: np.ndarray | None = None  # channel-id classes, one per structure (None when loaded from a file)

    @property
    def producers(self) -> list[str]:
        """Layers (or parameters) that write the group's channels."""
        return _unique(s.module or s.target for s in self.slots if s.role in ("out", "param"))

    @property
    def norms(self) -> list[str]:
        return _unique(s.module for s in self.slots if s.role == "norm")

    @property
    def consumers(self) -> list[str]:
        """Layers that read the group's channels through their weights (where its gates sit)."""
        return _unique(t.module for t in self.taps if t.side in ("in", "out"))

    @property
    def channels(self) -> int:
        """Channels of the first producer (structures x channels per structure)."""
        for s in self.slots:
            if s.role in ("out", "norm", "param"):
                return int((s.index >= 0).sum())
        return self.size

    @property
    def channels_per_structure(self) -> int:
        return max(1, self.channels // self.size)

    def members(self) -> list[dict]:
        seen: dict[tuple[str, str], dict] = {}
        for s in self.slots:
            key = (s.module or s.target, s.role)
            if key not in seen:
                seen[key] = {"name": s.module or s.target, "role": s.role, "channels": int((s.index >= 0).sum())}
        return list(seen.values())

    def to_dict(self) -> dict:
        """The group as ``inspect`` and reports show it."""
        return {"id": self.id, "name": self.name, "kind": self.kind, "structures": self.size,
                "channels": self.channels, "tags": list(self.tags), "members": self.members(),
                "gates": [t.module for t in self.taps]}

    def state(self) -> dict:
        """Plain data for a checkpoint (see :meth:`from_state`)."""
        return {"id": self.id, "name": self.name, "size": self.size, "kind": self.kind, "tags": list(self.tags),
                "taps": [t.state() for t in self.taps], "slots": [s.state() for s in self.slots]}

    @classmethod
    def from_state(cls, state: dict, default_id: int = 0) -> Group:
        """A group from :meth:`state` (or a version-2 checkpoint's gate site, the same fields)."""
        return cls(
            id=int(state.get("id", default_id)), size=int(state["size"]), kind=str(state.get("kind", "channels")),
            tags=list(state.get("tags", [])), name=str(state["name"]),
            taps=[Tap(str(t["module"]), int(t["axis"]), np.asarray(t["index"], dtype=np.int64),
                      side=str(t.get("side", "in"))) for t in state["taps"]],
            slots=[Slot(str(s["target"]), int(s["dim"]), np.asarray(s["index"], dtype=np.int64), str(s["role"]),
                        str(s.get("module", ""))) for s in state["slots"]],
        )

    def same_structure(self, other: Group) -> bool:
        """Whether two groups gate and slice exactly the same places (names, axes, indices)."""
        a, b = self.state(), other.state()
        return all(a[k] == b[k] for k in ("name", "size", "taps", "slots"))
