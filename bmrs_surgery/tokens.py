"""Token data for ``--data FILE.npz`` with named inputs (``--input input_ids:int64:1x128 ...``).

The file holds one array per model input, named as the ``--input`` specs name them (``input_ids``,
``attention_mask``, ``token_type_ids``, ...; integer arrays of shape (N, seq) for integer inputs),
and optionally ``labels``, (N,) class ids 0..K-1 for a model with a classification head. As for
``x``/``y`` files, a held-out test split may be given as ``NAME_test`` arrays (and ``labels_test``
when there are ``labels``: both splits are labelled, or neither); without them 20% of the examples
(seeded) are the test split, and ``val_fraction`` of the rest the validation split. Every split is a
:class:`~.data.NamedDataset` (a batch is a dict of tensors).

With labels, the loss is cross entropy on the model's logits (a tensor, or a transformers output's
``.logits``). Without them (``num_classes`` None, every split's ``labels`` None) the likelihood is
the original model's own outputs: the gates are fitted by distillation to them (plain text and an
encoder without a head, e.g. a sentence-embedding BERT; the rule for what the outputs are and the
loss are in :mod:`distill`), and the report measures the mean cosine to them instead of accuracy.
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .data import TEST_FRACTION, DataSplits, NamedDataset, _check_y, _first_line, _generator, read_npz
from .errors import DataError

LABELS = "labels"
NO_LABELS = ("the data has no labels, so the likelihood is distillation to the original model's outputs: pass the "
             "model as it was before the gates, fit(..., teacher=original) (bmrs-compress does this by itself)")


def is_token_file(spec) -> bool:
    """``--data`` names an .npz file (with named inputs, read as token data)."""
    return isinstance(spec, str) and spec.strip().lower().endswith(".npz")


def _inputs(path: Path, arrays: dict, specs, suffix: str) -> dict[str, torch.Tensor]:
    out = {}
    n = None
    for s in specs:
        key = s.name + suffix
        a = arrays[key]
        if s.dtype.is_floating_point:
            if a.dtype.kind not in "biuf" or not np.isfinite(a.astype(np.float64, copy=False)).all():
                raise DataError(f"{path}: '{key}' must hold finite numbers for input {s}")
        elif a.dtype.kind not in "biu":
            raise DataError(f"{path}: '{key}' must be an integer array (token ids or a mask) for input {s}, "
                            f"got dtype {a.dtype}")
        if a.ndim != len(s.shape) or tuple(a.shape[1:]) != tuple(s.shape[1:]):
            raise DataError(f"{path}: '{key}' has shape {a.shape}, but --input {s} needs (N, "
                            f"{', '.join(map(str, s.shape[1:]))})")
        if n is not None and len(a) != n:
            raise DataError(f"{path}: '{key}' has {len(a)} examples but '{specs[0].name + suffix}' has {n}")
        n = len(a)
        if a.dtype.kind in "iu" and a.size and (int(a.min()) < 0 and not s.dtype.is_floating_point):
            raise DataError(f"{path}: '{key}' holds negative values (min {int(a.min())})")
        out[s.name] = torch.from_numpy(np.ascontiguousarray(a)).to(s.dtype)
    return out


def load_tokens(path, specs, *, val_fraction: float = 0.2, seed: int = 0) -> DataSplits:
    """Token data of ``path`` for the named inputs ``specs`` (see the module docstring); a
    :class:`DataError` with one line on any problem."""
    path = Path(str(path).strip()).expanduser()
    arrays = read_npz(path)
    names = [s.name for s in specs]
    allowed = set(names) | {n + "_test" for n in names} | {LABELS, LABELS + "_test"}
    extra = sorted(k for k in arrays if k not in allowed)
    if extra:
        raise DataError(f"{path}: array {extra[0]!r} is not an input of the model (inputs given with --input: "
                        f"{', '.join(names)}; plus an optional '{LABELS}')", param="data")
    labelled = LABELS in arrays
    if LABELS + "_test" in arrays and not labelled:
        raise DataError(f"{path}: '{LABELS}_test' without '{LABELS}': label both splits or neither", param="data")
    missing = [n for n in names if n not in arrays]
    if missing:
        raise DataError(f"{path}: no array {missing[0]!r} for --input {missing[0]} (found: "
                        f"{', '.join(sorted(arrays))})", param="data")
    test_keys = [k for k in arrays if k.endswith("_test")]
    needed = [n + "_test" for n in names] + ([LABELS + "_test"] if labelled else [])
    if test_keys and sorted(test_keys) != sorted(needed):
        also = f"'{LABELS}_test' and " if labelled else ""
        raise DataError(f"{path}: a test split needs {also}one NAME_test array for every input "
                        f"({', '.join(n + '_test' for n in names)})", param="data")

    def part(suffix: str) -> NamedDataset:
        x = _inputs(path, arrays, specs, suffix)
        n = len(next(iter(x.values())))
        y = None
        if labelled:
            y = _check_y(path, LABELS + suffix, arrays[LABELS + suffix])
            if len(y) != n:
                raise DataError(f"{path}: '{LABELS + suffix}' has {len(y)} labels but '{names[0] + suffix}' has {n} "
                                "examples", param="data")
        if n == 0:
            raise DataError(f"{path}: no examples in '{names[0] + suffix}'", param="data")
        return NamedDataset(x, None if y is None else torch.from_numpy(y))

    rest = part("")
    if test_keys:
        test = part("_test")
    else:
        n = len(rest)
        n_test = min(int(math.floor(n * TEST_FRACTION)), n - 1)
        perm = torch.randperm(n, generator=_generator(seed))
        test, rest = rest.take(perm[:n_test]), rest.take(perm[n_test:])
    n = len(rest)
    n_val = min(int(round(n * val_fraction)), n - 1)
    perm = torch.randperm(n, generator=_generator(seed + 1))  # another stream than the test hold-out
    val, train = rest.take(perm[:n_val]), rest.take(perm[n_val:])
    num_classes = int(torch.cat([rest.labels, test.labels]).max()) + 1 if labelled else None
    return DataSplits(name=path.stem, train=train, val=val, test=test, num_classes=num_classes,
                      input_shape=tuple(specs[0].shape[1:]))


def logits(out) -> torch.Tensor:
    """The class scores of a model's output: a tensor, or a transformers output's ``logits``."""
    if isinstance(out, torch.Tensor):
        return out
    got = getattr(out, "logits", None)
    if got is None and isinstance(out, dict):
        got = out.get("logits")
    if not isinstance(got, torch.Tensor):
        raise DataError(f"the model's output ({type(out).__name__}) has no logits: token data with labels fits a "
                        "model with a classification head (e.g. ...ForSequenceClassification); without 'labels' the "
                        "model is fitted to its own outputs", param="data")
    return got


def check_token_fits(model: nn.Module, splits: DataSplits) -> None:
    """The named inputs are the model's keyword arguments, token ids stay below its vocabulary, and
    the model's output on 2 training examples is usable: with labels, logits with one column per
    class; without, an output :func:`~.distill.model_output` can distil to (a DataError otherwise)."""
    from .distill import attention_mask, model_output
    from .inputs import fill_for, vocab_size

    train: NamedDataset = splits.train
    params = inspect.signature(model.forward).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        bad = next((n for n in train.inputs if n not in params), None)
        if bad is not None:
            raise DataError(f"input {bad!r} is not an argument of {type(model).__name__}.forward", param="data")
    high = vocab_size(model)
    for split in (splits.train, splits.val, splits.test):
        for name, t in split.inputs.items():
            if high and fill_for(name, str(t.dtype).removeprefix("torch.")) == "ids" and t.numel() \
                    and int(t.max()) >= high:
                raise DataError(f"'{name}' holds token id {int(t.max())}, but the model's vocabulary has {high} "
                                "entries", param="data")
    x = train.head(2)
    batch = len(next(iter(x.values())))
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            raw = model(**x)
            out = logits(raw) if splits.labelled else model_output(raw, attention_mask(x)).value
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure means the data does not fit
        raise DataError(f"the named inputs do not fit the model: {_first_line(exc)}", param="data") from None
    finally:
        for m, mode in modes:
            m.training = mode
    if not splits.labelled:
        if out.shape[0] != batch:
            raise DataError(f"the model's output has {out.shape[0]} rows for a batch of {batch} examples: without "
                            "labels its output must have one row per example", param="data")
        return
    if out.dim() != 2 or out.shape[0] != batch:
        raise DataError(f"the model's logits have shape {tuple(out.shape)}, expected (batch, classes): token data "
                        "with labels fits a model with a classification head", param="data")
    if out.shape[1] < splits.num_classes:
        raise DataError(f"the labels go up to {splits.num_classes - 1} but the model's head has {out.shape[1]} "
                        f"classes: labels must be 0..{out.shape[1] - 1}", param="data")
