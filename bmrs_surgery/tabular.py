"""``csv:FILE`` with ``--target COLUMN``: a table of numeric features and one class column.

The first row names the columns. ``COLUMN`` holds the class of each row (integers 0..K-1, or any
labels, numbered in sorted order); every other column must be numeric. Features are standardised
with the training rows' mean and standard deviation (computed in float64). 20% of the rows (seeded)
are held out as the test split and ``val_fraction`` of the rest as validation, as for ``.npz``.
A missing column, an empty cell, a non-numeric feature or a ragged row is one line naming it.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import torch

from .errors import DataError, file_problem
from .limits import MAX_NUM_CLASSES

MAX_CSV_BYTES = 2 << 30  # tabular data is read whole: larger files belong in an .npz or image folder


def _read(path: Path) -> tuple[list[str], list[list[str]]]:
    problem = file_problem(path, missing="not found")
    if problem:
        raise DataError(f"data file {path} {problem}")
    if path.stat().st_size > MAX_CSV_BYTES:
        raise DataError(f"{path} is over {MAX_CSV_BYTES >> 30} GiB: tabular data is read whole")
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.reader(fh))
    except UnicodeDecodeError:
        raise DataError(f"{path} is not a UTF-8 text CSV file") from None
    except csv.Error as exc:
        raise DataError(f"{path} is not a readable CSV file ({exc})") from None
    rows = [r for r in rows if any(c.strip() for c in r)]
    if not rows:
        raise DataError(f"{path} is empty (expected a header row and data rows)")
    header, body = [c.strip() for c in rows[0]], rows[1:]
    if not body:
        raise DataError(f"{path} has a header but no data rows")
    for i, r in enumerate(body, start=2):
        if len(r) != len(header):
            raise DataError(f"{path}: row {i} has {len(r)} cells but the header has {len(header)}")
    return header, body


def load_csv(spec: str, target: str | None, val_fraction: float, seed: int):
    """:class:`~.data.DataSplits` of a CSV file (see the module doc)."""
    from .data import DataSplits, _dataset, _generator, _split_train_val

    path = Path(spec).expanduser()
    if not target:
        raise DataError(f"{path}: name the class column with --target COLUMN", param="target")
    header, body = _read(path)
    if target not in header:
        shown = ", ".join(header[:10]) + (", ..." if len(header) > 10 else "")
        raise DataError(f"{path} has no column {target!r} (columns: {shown})", param="target")
    if len(header) < 2:
        raise DataError(f"{path}: no feature columns besides {target!r}")
    t = header.index(target)
    raw_labels = [r[t].strip() for r in body]
    empty = next((i for i, v in enumerate(raw_labels) if not v), None)
    if empty is not None:
        raise DataError(f"{path}: row {empty + 2} has no value in column {target!r}")
    y = _labels(path, target, raw_labels)
    cols = [j for j in range(len(header)) if j != t]
    x = np.empty((len(body), len(cols)), dtype=np.float64)
    for i, r in enumerate(body):
        for k, j in enumerate(cols):
            cell = r[j].strip()
            try:
                x[i, k] = float(cell)
            except ValueError:
                what = "is empty" if not cell else f"is {cell[:30]!r}, not a number"
                raise DataError(f"{path}: row {i + 2}, column {header[j]!r} {what}") from None
            if not math.isfinite(x[i, k]):
                raise DataError(f"{path}: row {i + 2}, column {header[j]!r} is {cell}, not a finite number")
    n = len(y)
    if n < 3:
        raise DataError(f"{path} has {n} data row(s): at least 3 are needed (train, validation, test)")
    n_test = max(1, min(int(math.floor(n * 0.2)), n - 2))
    perm = torch.randperm(n, generator=_generator(seed))
    xa, ya = torch.from_numpy(x), torch.from_numpy(y)
    xte, yte = xa[perm[:n_test]], ya[perm[:n_test]]
    (xt, yt), (xv, yv) = _split_train_val(xa[perm[n_test:]], ya[perm[n_test:]], val_fraction, seed + 1)
    mean = xt.mean(0)
    std = xt.std(0, unbiased=False)
    std = torch.where(std > 0, std, torch.ones_like(std))  # a constant column stays 0 after centring

    def norm(v: torch.Tensor) -> torch.Tensor:
        return ((v - mean) / std).float()

    splits = DataSplits(name=path.stem, train=_dataset(norm(xt), yt), val=_dataset(norm(xv), yv),
                        test=_dataset(norm(xte), yte), num_classes=int(y.max()) + 1, input_shape=(len(cols),))
    splits.features = [header[j] for j in cols]
    return splits


def _labels(path: Path, target: str, values: list[str]) -> np.ndarray:
    """Integers 0..K-1 as they are; any other labels numbered in sorted order."""
    try:
        ints = [int(v) for v in values]
    except ValueError:
        ints = None
    if ints is not None and min(ints) >= 0:
        if max(ints) >= MAX_NUM_CLASSES:
            raise DataError(f"{path}: column {target!r} has label {max(ints)} (at most {MAX_NUM_CLASSES - 1:,})")
        return np.asarray(ints, dtype=np.int64)
    names = sorted(set(values))
    if len(names) > MAX_NUM_CLASSES:
        raise DataError(f"{path}: column {target!r} has {len(names):,} distinct labels (at most {MAX_NUM_CLASSES:,})")
    index = {v: i for i, v in enumerate(names)}
    return np.asarray([index[v] for v in values], dtype=np.int64)
