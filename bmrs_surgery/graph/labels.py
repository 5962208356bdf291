"""Which dimension of each tensor carries prunable channels, and whose channels they are.

A :class:`Label` says that dimension ``axis`` of a tensor is indexed by channel ids (one id per
index; ids come from the parameter dimensions that produced the channels, see
:mod:`unionfind`). ``axis=None`` means the tensor carries no prunable dimension: it is fixed.
Keeping at most one labelled axis per tensor is what makes every pruned tensor rectangular.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Label:
    ndim: int
    axis: int | None = None
    ids: np.ndarray | None = None

    @property
    def labelled(self) -> bool:
        return self.axis is not None

    def moved(self, axis: int | None, ndim: int | None = None) -> Label:
        if axis is None:
            return Label(self.ndim if ndim is None else ndim)
        return Label(self.ndim if ndim is None else ndim, axis, self.ids)


def fixed(ndim: int) -> Label:
    return Label(ndim)


def reshape_groups(src: tuple[int, ...], dst: tuple[int, ...]) -> list[tuple[range, range]]:
    """Pair runs of input dims with runs of output dims that hold the same elements.

    ``(2, 6, 4) -> (2, 3, 2, 4)`` gives ``[(0..1, 0..1), (1..2, 1..3), (2..3, 3..4)]``. Size-1
    dims join the run before them (or the first run).
    """
    groups: list[tuple[range, range]] = []
    i = j = 0
    n, m = len(src), len(dst)
    while i < n or j < m:
        i0, j0 = i, j
        pi = src[i] if i < n else 1
        pj = dst[j] if j < m else 1
        i += 1 if i < n else 0
        j += 1 if j < m else 0
        while pi != pj:
            if pi < pj and i < n:
                pi *= src[i]
                i += 1
            elif j < m:
                pj *= dst[j]
                j += 1
            else:
                break
        while i < n and src[i] == 1 and (j >= m or dst[j] != 1):
            i += 1
        while j < m and dst[j] == 1 and (i >= n or src[i] != 1):
            j += 1
        groups.append((range(i0, i), range(j0, j)))
        if i0 == i and j0 == j:
            break
    return groups


def expand_ids(ids: np.ndarray, sizes: tuple[int, ...], pos: int) -> np.ndarray:
    """Ids of every element of a run of dims ``sizes`` (row-major) when dim ``pos`` carries ``ids``."""
    before = int(np.prod(sizes[:pos], dtype=np.int64))
    after = int(np.prod(sizes[pos + 1 :], dtype=np.int64))
    out = np.repeat(ids, after) if after > 1 else ids
    return np.tile(out, before) if before > 1 else out
