"""Tests for bmrs_surgery.data: load_data (fashion-mnist, digits, .npz) and check_fits."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from bmrs_surgery.data import DATASETS, DataSplits, check_fits, load_data
from bmrs_surgery.errors import BmrsError, DataError
from models import get_model

FASHION_DIR = Path(os.environ.get("BMRS_FASHION_MNIST_DIR") or "/usr/share/datasets/fashion-mnist")
HAVE_FASHION = (FASHION_DIR / "train-images-idx3-ubyte.gz").is_file()
needs_fashion = pytest.mark.skipif(not HAVE_FASHION, reason="dataset-fashion-mnist not installed")


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg, msg
    return msg


# ------------------------------------------------------------------------------------------------
# fashion-mnist
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fashion() -> DataSplits:
    if not HAVE_FASHION:
        pytest.skip("dataset-fashion-mnist not installed")
    return load_data("fashion-mnist")


@needs_fashion
def test_fashion_shapes_dtypes_and_sizes(fashion):
    assert fashion.name == "fashion-mnist"
    assert fashion.num_classes == 10
    assert fashion.input_shape == (1, 32, 32)
    assert (len(fashion.train), len(fashion.val), len(fashion.test)) == (48000, 12000, 10000)
    for ds in (fashion.train, fashion.val, fashion.test):
        x, y = ds.tensors
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.shape[1:] == (1, 32, 32) and len(x) == len(y)


@needs_fashion
def test_fashion_value_range_and_labels(fashion):
    for ds in (fashion.train, fashion.val, fashion.test):
        x, y = ds.tensors
        assert x.min() >= -0.5 and x.max() <= 0.51
        assert x.min() < -0.45 and x.max() > 0.45  # uses the full range
        assert int(y.min()) == 0 and int(y.max()) == 9
    assert set(fashion.train.tensors[1].unique().tolist()) == set(range(10))


@needs_fashion
def test_fashion_seed_determinism(fashion):
    again = load_data("fashion-mnist", seed=0)
    assert torch.equal(again.train.tensors[1], fashion.train.tensors[1])
    assert torch.equal(again.val.tensors[0][:50], fashion.val.tensors[0][:50])
    other = load_data("fashion-mnist", seed=1)
    assert not torch.equal(other.train.tensors[1], fashion.train.tensors[1])
    # test set is the official t10k set whatever the seed
    assert torch.equal(other.test.tensors[1], fashion.test.tensors[1])
    # train and val together are the whole 60k training set
    assert len(other.train) + len(other.val) == 60000


@needs_fashion
def test_fashion_limit(fashion):
    small = load_data("fashion-mnist", limit=100)
    assert (len(small.train), len(small.val), len(small.test)) == (100, 100, 100)
    assert torch.equal(small.train.tensors[0], fashion.train.tensors[0][:100])


@needs_fashion
def test_fashion_val_fraction():
    s = load_data("fashion-mnist", val_fraction=0.1, limit=None)
    assert (len(s.train), len(s.val)) == (54000, 6000)


def test_fashion_missing_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("BMRS_FASHION_MNIST_DIR", str(tmp_path))
    with pytest.raises(DataError) as exc:
        load_data("fashion-mnist")
    msg = _one_line(exc)
    assert "apt-get install dataset-fashion-mnist" in msg
    assert str(tmp_path) in msg and "BMRS_FASHION_MNIST_DIR" in msg


def _write_gz(path: Path, payload: bytes) -> None:
    with gzip.open(path, "wb") as fh:
        fh.write(payload)


_NAMES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def _write_valid_idx(d: Path, n_train: int = 20, n_test: int = 5) -> None:
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        imgs = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        _write_gz(d / f"{prefix}-images-idx3-ubyte.gz", struct.pack(">iiii", 2051, n, 28, 28) + imgs.tobytes())
        _write_gz(d / f"{prefix}-labels-idx1-ubyte.gz", struct.pack(">ii", 2049, n) + labels.tobytes())


def test_fashion_small_valid_idx_parses(tmp_path, monkeypatch):
    _write_valid_idx(tmp_path)
    monkeypatch.setenv("BMRS_FASHION_MNIST_DIR", str(tmp_path))
    s = load_data("fashion-mnist")
    assert (len(s.train), len(s.val), len(s.test)) == (16, 4, 5)
    assert s.train.tensors[0].shape == (16, 1, 32, 32)
    assert s.test.tensors[1].tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    "corrupt",
    ["not-gzip", "garbage-gz", "bad-magic", "truncated", "count-mismatch"],
)
def test_fashion_corrupt_idx(tmp_path, monkeypatch, corrupt):
    _write_valid_idx(tmp_path)
    target = tmp_path / "train-images-idx3-ubyte.gz"
    if corrupt == "not-gzip":
        target.write_bytes(b"this is not gzip at all")
    elif corrupt == "garbage-gz":
        _write_gz(target, os.urandom(100))
    elif corrupt == "bad-magic":
        _write_gz(target, struct.pack(">iiii", 1234, 20, 28, 28) + bytes(20 * 28 * 28))
    elif corrupt == "truncated":
        _write_gz(target, struct.pack(">iiii", 2051, 20, 28, 28) + bytes(100))
    elif corrupt == "count-mismatch":
        _write_gz(target, struct.pack(">iiii", 2051, 19, 28, 28) + bytes(19 * 28 * 28))
    monkeypatch.setenv("BMRS_FASHION_MNIST_DIR", str(tmp_path))
    with pytest.raises(DataError) as exc:
        load_data("fashion-mnist")
    msg = _one_line(exc)
    assert "corrupt" in msg


def test_fashion_all_files_garbage(tmp_path, monkeypatch):
    for name in _NAMES:
        (tmp_path / name).write_bytes(os.urandom(64))
    monkeypatch.setenv("BMRS_FASHION_MNIST_DIR", str(tmp_path))
    with pytest.raises(DataError) as exc:
        load_data("fashion-mnist")
    # the first file read is named, with what is wrong with it
    assert _one_line(exc).startswith(f"corrupt Fashion-MNIST file {tmp_path / 'train-images-idx3-ubyte.gz'}: "
                                     "not a readable gzip file")


# ------------------------------------------------------------------------------------------------
# digits
# ------------------------------------------------------------------------------------------------


def test_digits_shapes():
    d = load_data("digits")
    assert d.name == "digits" and d.num_classes == 10 and d.input_shape == (1, 32, 32)
    assert len(d.train) + len(d.val) + len(d.test) == 1797
    assert len(d.test) == 360
    assert len(d.val) == pytest.approx(0.2 * (1797 - 360), abs=1)
    for ds in (d.train, d.val, d.test):
        x, y = ds.tensors
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.shape[1:] == (1, 32, 32)
        assert x.min() >= -0.5 and x.max() <= 0.51
        assert 0 <= int(y.min()) and int(y.max()) <= 9
    # splits are disjoint and cover everything: compare the multiset of examples
    total = torch.cat([d.train.tensors[0], d.val.tensors[0], d.test.tensors[0]])
    assert len(torch.unique(total.flatten(1), dim=0)) > 1700


def test_digits_seed():
    a, b, c = load_data("digits", seed=0), load_data("digits", seed=0), load_data("digits", seed=3)
    assert torch.equal(a.train.tensors[0], b.train.tensors[0])
    assert not torch.equal(a.train.tensors[1], c.train.tensors[1])
    lim = load_data("digits", limit=50)
    assert (len(lim.train), len(lim.val), len(lim.test)) == (50, 50, 50)


# ------------------------------------------------------------------------------------------------
# .npz
# ------------------------------------------------------------------------------------------------


def test_npz_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, size=(50, 3, 7, 7)).astype(np.uint8)
    y = np.arange(50) % 4
    path = tmp_path / "toy.npz"
    np.savez(path, x=x, y=y)
    s = load_data(str(path))
    assert s.name == "toy"
    assert s.num_classes == 4
    assert s.input_shape == (3, 7, 7)
    assert (len(s.train), len(s.val), len(s.test)) == (32, 8, 10)
    xs = torch.cat([s.train.tensors[0], s.val.tensors[0], s.test.tensors[0]])
    ys = torch.cat([s.train.tensors[1], s.val.tensors[1], s.test.tensors[1]])
    assert xs.dtype == torch.float32 and ys.dtype == torch.int64
    # every example survives unchanged (no preprocessing for npz), paired with its label
    orig = {tuple(xi.flatten().tolist()): int(yi) for xi, yi in zip(x.astype(np.float32), y)}
    for xi, yi in zip(xs, ys):
        assert orig[tuple(xi.flatten().tolist())] == int(yi)
    # same seed -> same split; accepts a Path too
    again = load_data(path)
    assert torch.equal(again.train.tensors[0], s.train.tensors[0])


def test_npz_with_test_arrays(tmp_path):
    path = tmp_path / "tt.npz"
    np.savez(
        path,
        x=np.zeros((40, 5), np.float64),
        y=np.arange(40) % 2,
        x_test=np.ones((7, 5), np.float32),
        y_test=np.array([0, 1, 2, 0, 1, 2, 0]),
    )
    s = load_data(str(path), val_fraction=0.25)
    assert (len(s.train), len(s.val), len(s.test)) == (30, 10, 7)
    assert s.num_classes == 3
    assert s.input_shape == (5,)
    assert torch.equal(s.test.tensors[0], torch.ones(7, 5))


def _npz(tmp_path: Path, name: str = "bad.npz", **arrays) -> str:
    path = tmp_path / name
    np.savez(path, **arrays)
    return str(path)


GOOD_X = np.zeros((10, 4), np.float32)
GOOD_Y = np.arange(10) % 2


@pytest.mark.parametrize(
    "arrays, needle",
    [
        (dict(y=GOOD_Y), "'x'"),
        (dict(x=GOOD_X), "'y'"),
        (dict(x=GOOD_X, y=GOOD_Y[:9]), "len(x)"),
        (dict(x=np.zeros((0, 4), np.float32), y=np.zeros(0, np.int64)), "empty"),
        (dict(x=GOOD_X, y=GOOD_Y + 0.5), "integer"),
        (dict(x=GOOD_X, y=np.array(["a"] * 10)), "integer"),
        (dict(x=GOOD_X, y=GOOD_Y - 1), "negative"),
        (dict(x=np.where(np.eye(10, 4) > 0, np.nan, 0.0), y=GOOD_Y), "NaN"),
        (dict(x=np.full((10, 4), np.inf), y=GOOD_Y), "inf"),
        (dict(x=np.zeros(10), y=GOOD_Y), "2 dims"),
        (dict(x=GOOD_X, y=GOOD_Y, x_test=GOOD_X), "together"),
        (dict(x=GOOD_X, y=GOOD_Y, x_test=np.zeros((3, 5)), y_test=np.zeros(3, np.int64)), "shape"),
    ],
    ids=["no-x", "no-y", "len-mismatch", "empty", "float-labels", "str-labels", "negative", "nan", "inf",
         "1d-x", "half-test", "test-shape"],
)
def test_npz_errors(tmp_path, arrays, needle):
    path = _npz(tmp_path, **arrays)
    with pytest.raises(DataError) as exc:
        load_data(path)
    msg = _one_line(exc)
    assert needle in msg
    assert "bad.npz" in msg


def test_npz_missing_file(tmp_path):
    with pytest.raises(DataError) as exc:
        load_data(str(tmp_path / "nope.npz"))
    assert "nope.npz" in _one_line(exc) and "not found" in str(exc.value)


def test_npz_not_an_npz(tmp_path):
    path = tmp_path / "garbage.npz"
    path.write_bytes(b"definitely not a zip file\n" * 10)
    with pytest.raises(DataError) as exc:
        load_data(str(path))
    assert "garbage.npz" in _one_line(exc)


def test_npz_object_array_rejected(tmp_path):
    path = tmp_path / "obj.npz"
    np.savez(path, x=np.array([[1, "a"]] * 4, dtype=object), y=np.zeros(4, np.int64))
    with pytest.raises(DataError) as exc:
        load_data(str(path))
    assert "obj.npz" in _one_line(exc)


def test_npz_float_integral_labels_accepted(tmp_path):
    path = _npz(tmp_path, "ok.npz", x=GOOD_X, y=GOOD_Y.astype(np.float32))
    s = load_data(path)
    assert s.num_classes == 2 and s.train.tensors[1].dtype == torch.int64


# ------------------------------------------------------------------------------------------------
# spec and argument validation
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["mnist", "cifar10", "", "data.csv", "/tmp/x.txt"])
def test_unknown_spec(spec):
    with pytest.raises(DataError) as exc:
        load_data(spec)
    msg = _one_line(exc)
    for name in DATASETS:
        assert name in msg
    assert ".npz" in msg


def test_data_errors_are_caught_as_bmrs_errors():
    """Callers (the CLI among them) catch BmrsError for the user's mistakes: a bad data spec is one."""
    with pytest.raises(BmrsError) as exc:
        load_data("mnist")
    assert type(exc.value) is DataError
    assert _one_line(exc).startswith("unknown dataset 'mnist': choose ")


@pytest.mark.parametrize("kwargs, message", [
    (dict(val_fraction=1.0), "val_fraction must be in [0, 1), got 1.0"),
    (dict(val_fraction=-0.1), "val_fraction must be in [0, 1), got -0.1"),
    (dict(limit=0), "limit must be a positive integer, got 0"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(DataError) as exc:
        load_data("digits", **kwargs)
    assert _one_line(exc) == message


# ------------------------------------------------------------------------------------------------
# check_fits
# ------------------------------------------------------------------------------------------------


def _check_fits_runs_the_model(model, splits) -> None:
    """check_fits runs ``model`` once, in eval mode without gradients, on the first 2 training
    examples, and gets one row of class scores per example."""
    calls = []

    def spy(module, args, out):
        calls.append((module.training, torch.is_grad_enabled(), args[0].clone(), tuple(out.shape)))

    hook = model.register_forward_hook(spy)
    try:
        assert check_fits(model, splits) is None
    finally:
        hook.remove()
    assert len(calls) == 1
    training, grad, x, out_shape = calls[0]
    assert not training and not grad
    assert torch.equal(x, splits.train.tensors[0][:2])
    assert out_shape == (2, splits.num_classes)


@pytest.mark.parametrize("model_name", ["lenet5", "mlp"])
def test_check_fits_digits(model_name):
    model = get_model(model_name)
    model.train()
    _check_fits_runs_the_model(model, load_data("digits", limit=8))
    assert all(m.training for m in model.modules())  # modes restored
    model.eval()
    model[1].train()  # a mix of modes comes back as it was
    _check_fits_runs_the_model(model, load_data("digits", limit=8))
    assert [m.training for m in model.modules()] == [m is model[1] for m in model.modules()]


@needs_fashion
@pytest.mark.parametrize("model_name", ["lenet5", "mlp"])
def test_check_fits_fashion(model_name):
    _check_fits_runs_the_model(get_model(model_name), load_data("fashion-mnist", limit=8))


@pytest.mark.parametrize("model_name", ["lenet5", "mlp"])
def test_check_fits_wrong_shape(tmp_path, model_name):
    path = _npz(tmp_path, "rgb.npz", x=np.zeros((20, 3, 7, 7), np.float32), y=np.arange(20) % 10)
    splits = load_data(path)
    assert splits.num_classes == 10
    with pytest.raises(DataError) as exc:
        check_fits(get_model(model_name), splits)
    msg = _one_line(exc)
    assert msg.startswith("data of shape (3, 7, 7) does not fit the model: ")


@pytest.mark.parametrize("model_name", ["lenet5", "mlp"])
def test_check_fits_wrong_num_classes(tmp_path, model_name):
    """Labels at or above the model's outputs are an error; data using fewer classes than the model
    has outputs (3 of 10) fits."""
    path = _npz(tmp_path, "three.npz", x=np.zeros((20, 1, 32, 32), np.float32), y=np.arange(20) % 3)
    splits = load_data(path)
    assert splits.num_classes == 3
    check_fits(get_model(model_name), splits)
    path = _npz(tmp_path, "twelve.npz", x=np.zeros((24, 1, 32, 32), np.float32), y=np.arange(24) % 12)
    with pytest.raises(DataError) as exc:
        check_fits(get_model(model_name), load_data(path))
    assert _one_line(exc) == "the data has 12 classes (labels up to 11) but the model has 10 outputs: labels must be 0..9"


def test_check_fits_non_2d_output():
    splits = load_data("digits", limit=4)
    model = torch.nn.Flatten(0)
    with pytest.raises(DataError) as exc:
        check_fits(model, splits)
    assert "does not fit the model" in _one_line(exc)
