"""Datasets behind one interface: ``load_data(spec)`` -> :class:`DataSplits`.

``spec`` is one of :data:`DATASETS` (``"fashion-mnist"``, ``"digits"``) or a path to an ``.npz`` file
holding arrays ``x`` and ``y`` (optionally ``x_test`` and ``y_test``). Every split is a
``TensorDataset`` of ``(x float32, y int64)``.

Image datasets get the paper's preprocessing: pixel values 0..255 are resized bilinearly to 32x32
and normalised with ``(x - 127) / 255``, giving tensors of shape ``(N, 1, 32, 32)`` in about
``[-0.5, 0.5]``.
"""

from __future__ import annotations

import functools
import gzip
import math
import os
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from .errors import DataError, file_problem
from .limits import MAX_NUM_CLASSES, check_npz, check_seed

__all__ = ["DATASETS", "DataSplits", "NamedDataset", "check_fits", "eval_batch_size", "head", "load_data", "split_batches"]

DATASETS = ("fashion-mnist", "fashion-mnist-sample", "digits")

FASHION_MNIST_ENV = "BMRS_FASHION_MNIST_DIR"
FASHION_MNIST_DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
_FASHION_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
_IDX_IMAGES_MAGIC = 2051
_IDX_LABELS_MAGIC = 2049

IMAGE_SIZE = 32
TEST_FRACTION = 0.2  # held out as test when a dataset has no official test set
_RESIZE_CHUNK = 5000


@dataclass
class DataSplits:
    """Train/val/test splits of one dataset; each split is a TensorDataset of (x float32, y int64)
    (or a :class:`NamedDataset` for token data)."""

    name: str
    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    num_classes: int | None  # None: token data without labels (fitted by distillation, see distill.py)
    input_shape: tuple[int, ...]  # one example, no batch axis

    def sizes(self) -> tuple[int, int, int]:
        """Number of examples in (train, val, test)."""
        return len(self.train), len(self.val), len(self.test)

    @property
    def labelled(self) -> bool:
        """Whether the examples carry class labels (every split does, or none)."""
        return self.num_classes is not None


def _choices() -> str:
    return ", ".join(DATASETS) + ", imagefolder:DIR, csv:FILE or a path to an .npz file"


class NamedDataset:
    """Examples of named inputs (token ids, an attention mask, ...), with class labels or without:
    ``inputs`` maps each input's name to a tensor whose first axis is the example, ``labels`` is
    (N,) int64, or None for data without labels (then a batch's labels are None too). A batch is a
    dict of tensors, given to the model as keyword arguments (see :mod:`tokens`)."""

    def __init__(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor | None):
        self.inputs = dict(inputs)
        self.labels = labels

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values()))) if self.labels is None else len(self.labels)

    def head(self, n: int) -> dict[str, torch.Tensor]:
        return {k: v[:n] for k, v in self.inputs.items()}

    def take(self, idx) -> NamedDataset:
        return NamedDataset({k: v[idx] for k, v in self.inputs.items()},
                            None if self.labels is None else self.labels[idx])

    def batches(self, index_batches, device):
        inputs = {k: v.to(device) for k, v in self.inputs.items()}
        y = None if self.labels is None else self.labels.to(device)
        for idx in index_batches:
            idx = idx.to(device)
            yield {k: v[idx] for k, v in inputs.items()}, (None if y is None else y[idx])


def head(split, n: int):
    """The first ``n`` inputs of a split (a TensorDataset, a streamed image split, or named inputs:
    a dict of tensors)."""
    if isinstance(split, TensorDataset):
        return split.tensors[0][:n]
    return split.head(n)


STREAMED_EVAL_BATCH = 64  # images decoded per evaluation batch of a streamed split (224 px: 38 MB)


def eval_batch_size(split, batch_size: int) -> int:
    """The batch size to evaluate a split with: at most STREAMED_EVAL_BATCH for streamed images."""
    return batch_size if isinstance(split, (TensorDataset, NamedDataset)) else min(batch_size, STREAMED_EVAL_BATCH)


def split_batches(split, index_batches, device):
    """(x, y) on ``device`` for each index tensor in ``index_batches``: indexed in memory, or read
    by a streamed split's DataLoader workers."""
    if not isinstance(split, TensorDataset):
        yield from split.batches(list(index_batches), device)
        return
    x, y = (t.to(device) for t in split.tensors)
    for idx in index_batches:
        idx = idx.to(device)
        yield x[idx], y[idx]


# ------------------------------------------------------------------------------------------------
# Public entry point
# ------------------------------------------------------------------------------------------------


def load_data(
    spec: str | os.PathLike,
    *,
    val_fraction: float = 0.2,
    seed: int = 0,
    limit: int | None = None,
    target: str | None = None,
    image=None,
) -> DataSplits:
    """Load the dataset named by ``spec`` and split it into train/val/test.

    ``val_fraction`` of the training data goes to validation (seeded random split, ``seed``);
    ``limit``, if given, keeps the first ``limit`` training examples and at most ``limit`` of val
    and test (for fast tests). ``imagefolder:DIR`` (streamed; ``image`` is its
    :class:`~.imagefolder.ImageOptions`) and ``csv:FILE`` (``target`` names the class column) are
    read by :mod:`imagefolder` and :mod:`tabular`. Raises :class:`DataError` with a one-line message
    on any problem.
    """
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not (
        0.0 <= float(val_fraction) < 1.0
    ):
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise DataError(f"limit must be a positive integer, got {limit!r}")
    seed = check_seed(seed, error=DataError)  # torch, numpy and scikit-learn all take 0..2**32-1

    raw = os.fspath(spec) if isinstance(spec, os.PathLike) else spec
    if not isinstance(raw, str) or not raw.strip():
        raise DataError(f"unknown dataset {spec!r}: choose {_choices()}")
    name = raw.strip().lower().replace("_", "-")
    if name.startswith("imagefolder:"):
        from .imagefolder import ImageOptions, load_image_folder

        return load_image_folder(raw.strip().split(":", 1)[1], image or ImageOptions(), seed)
    if name.startswith("csv:"):
        from .tabular import load_csv

        return _apply_limit(load_csv(raw.strip().split(":", 1)[1], target, float(val_fraction), seed), limit)
    if name in ("fashion-mnist", "fashionmnist"):
        splits = _load_fashion_mnist(float(val_fraction), seed)
    elif name == "fashion-mnist-sample":
        splits = _load_fashion_sample(float(val_fraction), seed)
    elif name == "digits":
        splits = _load_digits(float(val_fraction), seed)
    elif raw.strip().lower().endswith(".npz"):
        splits = _load_npz(Path(raw.strip()).expanduser(), float(val_fraction), seed)
    else:
        raise DataError(f"unknown dataset {raw!r}: choose {_choices()}")
    return _apply_limit(splits, limit)


# ------------------------------------------------------------------------------------------------
# Shared helpers
# ------------------------------------------------------------------------------------------------


def _resize_normalise(pixels: np.ndarray) -> torch.Tensor:
    """(N, H, W) pixel values in 0..255 -> (N, 1, 32, 32) float32, bilinear resize, (x - 127) / 255."""
    n = pixels.shape[0]
    out = torch.empty((n, 1, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.float32)
    for start in range(0, n, _RESIZE_CHUNK):
        chunk = torch.from_numpy(np.ascontiguousarray(pixels[start : start + _RESIZE_CHUNK], dtype=np.float32))
        chunk = chunk.unsqueeze(1)
        if chunk.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
            chunk = F.interpolate(chunk, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
        out[start : start + chunk.shape[0]] = (chunk - 127.0) / 255.0
    return out


def _generator(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(int(seed))
    return g


def _split_train_val(
    x: torch.Tensor, y: torch.Tensor, val_fraction: float, seed: int
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Seeded random split of (x, y) into train and val; val gets round(n * val_fraction) examples."""
    n = len(x)
    n_val = int(round(n * val_fraction))
    n_val = min(n_val, n - 1) if n > 0 else 0  # keep at least one training example
    perm = torch.randperm(n, generator=_generator(seed))
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    return (x[train_idx], y[train_idx]), (x[val_idx], y[val_idx])


def _apply_limit(splits: DataSplits, limit: int | None) -> DataSplits:
    if limit is None:
        return splits

    def cut(ds):
        if isinstance(ds, NamedDataset):
            return ds if len(ds) <= limit else ds.take(slice(0, limit))
        x, y = ds.tensors
        if len(x) <= limit:
            return ds
        return TensorDataset(x[:limit].clone(), y[:limit].clone())

    return DataSplits(
        name=splits.name,
        train=cut(splits.train),
        val=cut(splits.val),
        test=cut(splits.test),
        num_classes=splits.num_classes,
        input_shape=splits.input_shape,
    )


def _dataset(x: torch.Tensor, y: torch.Tensor) -> TensorDataset:
    return TensorDataset(x.to(torch.float32).contiguous(), y.to(torch.int64).contiguous())


# ------------------------------------------------------------------------------------------------
# Fashion-MNIST (IDX gz files from the Debian package dataset-fashion-mnist)
# ------------------------------------------------------------------------------------------------


def _fashion_dir() -> Path:
    return Path(os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_DEFAULT_DIR).expanduser()


def _read_gz(path: Path) -> bytes:
    try:
        with gzip.open(path, "rb") as fh:
            return fh.read()
    except (OSError, EOFError, zlib.error) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"corrupt Fashion-MNIST file {path}: not a readable gzip file ({reason})") from None


def _parse_idx_images(path: Path) -> np.ndarray:
    data = _read_gz(path)
    if len(data) < 16:
        raise DataError(f"corrupt Fashion-MNIST file {path}: too short for an IDX image header")
    magic, n, rows, cols = struct.unpack(">iiii", data[:16])
    if magic != _IDX_IMAGES_MAGIC:
        raise DataError(f"corrupt Fashion-MNIST file {path}: magic number {magic}, expected {_IDX_IMAGES_MAGIC}")
    if n <= 0 or rows <= 0 or cols <= 0:
        raise DataError(f"corrupt Fashion-MNIST file {path}: bad header sizes {n}x{rows}x{cols}")
    expected = 16 + n * rows * cols
    if len(data) != expected:
        raise DataError(
            f"corrupt Fashion-MNIST file {path}: {len(data)} bytes, expected {expected} for {n}x{rows}x{cols} images"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=16).reshape(n, rows, cols)


def _parse_idx_labels(path: Path) -> np.ndarray:
    data = _read_gz(path)
    if len(data) < 8:
        raise DataError(f"corrupt Fashion-MNIST file {path}: too short for an IDX label header")
    magic, n = struct.unpack(">ii", data[:8])
    if magic != _IDX_LABELS_MAGIC:
        raise DataError(f"corrupt Fashion-MNIST file {path}: magic number {magic}, expected {_IDX_LABELS_MAGIC}")
    if n <= 0 or len(data) != 8 + n:
        raise DataError(f"corrupt Fashion-MNIST file {path}: {len(data)} bytes, expected {8 + max(n, 0)} for {n} labels")
    labels = np.frombuffer(data, dtype=np.uint8, offset=8)
    if labels.max() > 9:
        raise DataError(f"corrupt Fashion-MNIST file {path}: label {int(labels.max())} outside 0..9")
    return labels


def _file_key(directory: Path) -> tuple:
    """Cache key: the directory and each file's size and mtime, so a changed file is re-read."""
    key = []
    for fname in _FASHION_FILES.values():
        st = (directory / fname).stat()
        key.append((fname, st.st_size, st.st_mtime_ns))
    return tuple(key)


@functools.lru_cache(maxsize=2)
def _fashion_arrays(directory: str, _key: tuple) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Decoded, resized, normalised Fashion-MNIST: (x_train, y_train, x_test, y_test)."""
    d = Path(directory)
    pairs = []
    for images_key, labels_key in (("train_images", "train_labels"), ("test_images", "test_labels")):
        images = _parse_idx_images(d / _FASHION_FILES[images_key])
        labels = _parse_idx_labels(d / _FASHION_FILES[labels_key])
        if len(images) != len(labels):
            raise DataError(
                f"corrupt Fashion-MNIST files in {d}: {len(images)} images but {len(labels)} labels "
                f"({_FASHION_FILES[images_key]}, {_FASHION_FILES[labels_key]})"
            )
        x = _resize_normalise(images)
        y = torch.from_numpy(labels.astype(np.int64))
        pairs.extend((x, y))
    return tuple(pairs)  # type: ignore[return-value]


def _load_fashion_mnist(val_fraction: float, seed: int) -> DataSplits:
    directory = _fashion_dir()
    missing = [f for f in _FASHION_FILES.values() if not (directory / f).is_file()]
    if missing:
        raise DataError(
            f"Fashion-MNIST not found in {directory} (missing {', '.join(missing)}): install it with "
            f"`apt-get install dataset-fashion-mnist` (or set {FASHION_MNIST_ENV})"
        )
    x_train, y_train, x_test, y_test = _fashion_arrays(str(directory.resolve()), _file_key(directory))
    (xt, yt), (xv, yv) = _split_train_val(x_train, y_train, val_fraction, seed)
    return DataSplits(
        name="fashion-mnist",
        train=_dataset(xt, yt),
        val=_dataset(xv, yv),
        test=_dataset(x_test.clone(), y_test.clone()),
        num_classes=10,
        input_shape=tuple(x_train.shape[1:]),
    )


def _load_fashion_sample(val_fraction: float, seed: int) -> DataSplits:
    """6000 training and 2000 test images of Fashion-MNIST shipped with the package (for the demo)."""
    path = Path(__file__).resolve().parent / "samples" / "fashion_mnist_sample.npz"
    if not path.is_file():
        raise DataError(f"the bundled Fashion-MNIST sample is missing ({path}): reinstall bmrs-surgery")
    with np.load(path) as z:
        x_train, y_train = _resize_normalise(z["x_train"]), torch.from_numpy(z["y_train"].astype(np.int64))
        x_test, y_test = _resize_normalise(z["x_test"]), torch.from_numpy(z["y_test"].astype(np.int64))
    (xt, yt), (xv, yv) = _split_train_val(x_train, y_train, val_fraction, seed)
    return DataSplits(name="fashion-mnist-sample", train=_dataset(xt, yt), val=_dataset(xv, yv),
                      test=_dataset(x_test, y_test), num_classes=10, input_shape=tuple(x_train.shape[1:]))


# ------------------------------------------------------------------------------------------------
# scikit-learn digits (8x8, bundled with scikit-learn, offline)
# ------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels = bunch.images.astype(np.float32) * (255.0 / 16.0)
    return _resize_normalise(pixels), torch.from_numpy(bunch.target.astype(np.int64))


def _load_digits(val_fraction: float, seed: int) -> DataSplits:
    from sklearn.model_selection import train_test_split

    x, y = _digits_arrays()
    idx = np.arange(len(y))
    labels = y.numpy()
    rest_idx, test_idx = train_test_split(idx, test_size=TEST_FRACTION, random_state=seed, stratify=labels)
    if val_fraction > 0:
        train_idx, val_idx = train_test_split(
            rest_idx, test_size=val_fraction, random_state=seed, stratify=labels[rest_idx]
        )
    else:
        train_idx, val_idx = rest_idx, rest_idx[:0]

    def take(i: np.ndarray) -> TensorDataset:
        t = torch.from_numpy(np.asarray(i, dtype=np.int64))
        return _dataset(x[t], y[t])

    return DataSplits(
        name="digits",
        train=take(train_idx),
        val=take(val_idx),
        test=take(test_idx),
        num_classes=10,
        input_shape=tuple(x.shape[1:]),
    )


# ------------------------------------------------------------------------------------------------
# .npz files
# ------------------------------------------------------------------------------------------------


def _check_x(path: Path, key: str, x: np.ndarray) -> np.ndarray:
    if x.ndim < 2:
        raise DataError(f"{path}: '{key}' must have at least 2 dims (N, ...), got shape {x.shape}")
    if x.dtype.kind not in "biuf":
        raise DataError(f"{path}: '{key}' must be numeric, got dtype {x.dtype}")
    x = x.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        raise DataError(f"{path}: '{key}' contains NaN or inf values")
    return x


def _check_y(path: Path, key: str, y: np.ndarray) -> np.ndarray:
    if y.ndim != 1:
        raise DataError(f"{path}: '{key}' must be 1-D class labels, got shape {y.shape}")
    if y.dtype.kind == "f":
        if not np.isfinite(y).all() or not np.all(y == np.round(y)):
            raise DataError(f"{path}: '{key}' must hold integer class labels 0..K-1, got non-integer values")
    elif y.dtype.kind not in "iu":
        raise DataError(f"{path}: '{key}' must hold integer class labels 0..K-1, got dtype {y.dtype}")
    if y.size:  # the range checked in the labels' own type (exact Python ints), before any cast to int64
        lo, hi = int(y.min()), int(y.max())
        if lo < 0:
            raise DataError(f"{path}: '{key}' has negative labels (min {lo}); labels must be 0..K-1")
        if hi >= MAX_NUM_CLASSES:
            raise DataError(f"{path}: '{key}' labels must be 0..K-1, got {hi} (K at most {MAX_NUM_CLASSES:,})")
    return y.astype(np.int64)


_NPZ_HINT = "save x and y with numpy.savez(path, x=..., y=...)"


def _check_npz_kind(path: Path) -> None:
    """An .npz is a zip archive: a single .npy array, or any other file, renamed .npz is named as
    such (numpy would read either as something else, and its own messages suggest unsafe loading)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(6)
    except PermissionError:
        raise DataError(f"data file {path} cannot be read: permission denied") from None
    except OSError as exc:
        raise DataError(f"data file {path} cannot be read ({exc.strerror})") from None
    if head == b"\x93NUMPY":
        raise DataError(f"{path} is a single .npy array, not an .npz archive with x and y: {_NPZ_HINT}")
    if not zipfile.is_zipfile(path):
        raise DataError(f"{path} is not an .npz archive (not a zip file): {_NPZ_HINT}")


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of the .npz file ``path`` (never unpickling), or one DataError line."""
    problem = file_problem(path, missing="not found")  # a FIFO, a loop or an unreadable file is not "missing"
    if problem:
        raise DataError(f"data file {path} {problem}")
    _check_npz_kind(path)
    try:
        check_npz(path, error=DataError)  # sizes from the .npy headers, before anything is decompressed
        with np.load(path, allow_pickle=False) as npz:
            if not hasattr(npz, "files"):
                raise DataError(f"{path} is not a valid .npz archive")
            arrays = {k: npz[k] for k in npz.files}
    except DataError:
        raise
    except PermissionError:
        raise DataError(f"data file {path} cannot be read: permission denied") from None
    except Exception as exc:  # noqa: BLE001 - np.load raises many types on bad input
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        if "pickle" in reason:  # never suggest numpy's unsafe loading
            reason = "it holds pickled Python objects, which are never loaded"
        raise DataError(f"{path} is not a valid .npz file ({reason})") from None
    return arrays


def _load_npz(path: Path, val_fraction: float, seed: int) -> DataSplits:
    arrays = read_npz(path)
    missing = [k for k in ("x", "y") if k not in arrays]
    if missing:
        found = ", ".join(sorted(arrays)) or "none"
        raise DataError(f"{path}: missing array(s) {', '.join(repr(k) for k in missing)} (found: {found})")
    has_xt, has_yt = "x_test" in arrays, "y_test" in arrays
    if has_xt != has_yt:
        raise DataError(f"{path}: 'x_test' and 'y_test' must be given together")

    x = _check_x(path, "x", arrays["x"])
    y = _check_y(path, "y", arrays["y"])
    if len(x) != len(y):
        raise DataError(f"{path}: len(x) = {len(x)} but len(y) = {len(y)}")
    if len(x) == 0:
        raise DataError(f"{path}: empty dataset (x has no examples)")

    if has_xt:
        x_test = _check_x(path, "x_test", arrays["x_test"])
        y_test = _check_y(path, "y_test", arrays["y_test"])
        if len(x_test) != len(y_test):
            raise DataError(f"{path}: len(x_test) = {len(x_test)} but len(y_test) = {len(y_test)}")
        if x_test.shape[1:] != x.shape[1:]:
            raise DataError(
                f"{path}: x_test examples have shape {x_test.shape[1:]} but x examples have shape {x.shape[1:]}"
            )
        xr, yr = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y)
        xte, yte = torch.from_numpy(np.ascontiguousarray(x_test)), torch.from_numpy(y_test)
    else:
        xa, ya = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y)
        n = len(xa)
        n_test = min(int(math.floor(n * TEST_FRACTION)), n - 1)
        perm = torch.randperm(n, generator=_generator(seed))
        test_idx, rest_idx = perm[:n_test], perm[n_test:]
        xte, yte = xa[test_idx], ya[test_idx]
        xr, yr = xa[rest_idx], ya[rest_idx]

    # A different stream for the val split than for the test hold-out.
    (xt, yt), (xv, yv) = _split_train_val(xr, yr, val_fraction, seed + 1)
    all_labels = torch.cat([yr, yte])
    num_classes = int(all_labels.max()) + 1
    return DataSplits(
        name=path.stem,
        train=_dataset(xt, yt),
        val=_dataset(xv, yv),
        test=_dataset(xte, yte),
        num_classes=num_classes,
        input_shape=tuple(x.shape[1:]),
    )


# ------------------------------------------------------------------------------------------------
# Does the data fit the model?
# ------------------------------------------------------------------------------------------------


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def check_fits(model: nn.Module, splits: DataSplits) -> None:
    """Run ``model`` on 2 training examples (no grad, eval mode) and raise DataError if they do not fit.

    The model's training/eval modes are restored afterwards. The output must be 2-D with one column
    per class of the data.
    """
    shape = tuple(splits.input_shape)
    x = head(splits.train, 2)
    if len(x) == 0:
        raise DataError(f"data of shape {shape} has no training examples")
    param = next(iter(model.parameters()), None)
    if param is None:
        param = next(iter(model.buffers()), None)
    if param is not None:
        x = x.to(device=param.device)
        if param.dtype.is_floating_point:
            x = x.to(dtype=param.dtype)

    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as exc:  # noqa: BLE001 - any failure means the data does not fit
        raise DataError(f"data of shape {shape} does not fit the model: {_first_line(exc)}") from None
    finally:
        for m, mode in modes:
            m.training = mode

    if not isinstance(out, torch.Tensor):
        raise DataError(
            f"data of shape {shape} does not fit the model: output is {type(out).__name__}, expected a tensor"
        )
    if out.dim() != 2 or out.shape[0] != len(x):
        raise DataError(
            f"data of shape {shape} does not fit the model: output has shape {tuple(out.shape)}, "
            f"expected ({len(x)}, {splits.num_classes})"
        )
    if out.shape[1] < splits.num_classes:  # data with fewer classes than the model's outputs is fine
        raise DataError(f"the data has {splits.num_classes} classes (labels up to {splits.num_classes - 1}) but the "
                        f"model has {out.shape[1]} outputs: labels must be 0..{out.shape[1] - 1}")
