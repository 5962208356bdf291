"""Project issue 15, items 9 and 10: mistakes found before any work (not after a multi-minute fit),
and messages that say what is really wrong.

Every user mistake ends in exit code 2, one ``Error:`` line on stderr, nothing written to --out
and the input left as it was.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from tests.test_cli import assert_one_line_error, invoke, ok

QUICK = ["--epochs", "1", "--finetune-epochs", "0", "-q", "--bench-batch-sizes", ""]


@pytest.fixture
def no_fit(monkeypatch):
    """A fit that fails the test: each case here must be refused before fitting."""

    def refuse(*args, **kwargs):
        raise AssertionError("the job reached the fit")

    monkeypatch.setattr("bmrs_surgery.pipeline.fit", refuse)
    return refuse


def _flat_npz(path: Path, n: int = 60, classes: int = 10) -> Path:
    rng = np.random.default_rng(0)
    np.savez(path, x=rng.standard_normal((n, 1024)).astype(np.float32), y=np.arange(n) % classes)
    return path


# ------------------------------------------------------------------------------------------------
# Item 9: everything checkable is checked before the fit
# ------------------------------------------------------------------------------------------------


def test_flattened_data_exports_with_the_datas_shape(tmp_path):
    """(N, 1024) data for the bundled mlp: export, proof and checkpoint use (1024,), not (1, 32, 32)."""
    data = _flat_npz(tmp_path / "flat.npz")
    out = tmp_path / "out"
    ok(invoke("mlp", "--data", data, *QUICK, "--out", out))
    model = onnx.load(str(out / "pruned.onnx"))
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]
    assert dims == [1024]
    ck = torch.load(out / "gated.pt", weights_only=True)
    assert list(ck["input_shape"]) == [1024]


def test_recorded_shape_gives_way_to_the_data(tmp_path):
    """A checkpoint recording (1, 32, 32), compressed with flattened data the model takes: the data wins."""
    data = _flat_npz(tmp_path / "flat.npz")
    first = tmp_path / "first"
    ok(invoke("mlp", "--data", "digits", *QUICK, "--out", first))
    out = tmp_path / "out"
    ok(invoke(first / "gated.pt", "--data", data, *QUICK, "--out", out))
    model = onnx.load(str(out / "pruned.onnx"))
    assert [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]] == [1024]


def test_absurd_bench_batch_size_refused_before_fit(tmp_path, no_fit):
    out = tmp_path / "out"
    r = invoke("mlp", "--data", "digits", "--epochs", "1", "--finetune-epochs", "0", "-q",
               "--bench-batch-sizes", "1,100000000", "--out", out)
    assert_one_line_error(r, "--bench-batch-sizes", "100000000", "limit")
    assert not out.exists()


def test_dangling_out_symlink_refused_before_any_work(tmp_path, no_fit):
    link = tmp_path / "out"
    link.symlink_to(tmp_path / "nowhere")
    r = invoke("mlp", "--data", "digits", *QUICK, "--out", link)
    assert_one_line_error(r, "--out", "does not exist")
    assert link.is_symlink() and not (tmp_path / "nowhere").exists()


# ------------------------------------------------------------------------------------------------
# Item 10: messages that say what is wrong
# ------------------------------------------------------------------------------------------------


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def _loop(path: Path) -> Path:
    path.symlink_to(path)
    return path


@pytest.mark.parametrize("make,fragment", [(_fifo, "is not a regular file (a FIFO)"), (_loop, "is a symlink loop")],
                         ids=["fifo", "symlink-loop"])
def test_model_path_not_a_regular_file(tmp_path, no_fit, make, fragment):
    path = make(tmp_path / "model.pt")
    out = tmp_path / "out"
    line = assert_one_line_error(invoke(path, "--data", "digits", *QUICK, "--out", out), fragment)
    assert "does not exist" not in line
    assert not out.exists()


@pytest.mark.parametrize("make,fragment", [(_fifo, "is not a regular file (a FIFO)"), (_loop, "is a symlink loop")],
                         ids=["fifo", "symlink-loop"])
def test_data_path_not_a_regular_file(tmp_path, no_fit, make, fragment):
    path = make(tmp_path / "data.npz")
    out = tmp_path / "out"
    line = assert_one_line_error(invoke("mlp", "--data", path, *QUICK, "--out", out), fragment)
    assert "not found" not in line
    assert not out.exists()


def _deny(monkeypatch, path: Path):
    """A file we may not read (simulated: the tests may run as root, whom chmod does not stop)."""
    real_open = os.open

    def fake_open(p, flags, *args, **kwargs):
        if os.fspath(p) == os.fspath(path):
            raise PermissionError(13, "Permission denied", os.fspath(p))
        return real_open(p, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", fake_open)


def test_model_permission_denied_is_not_damaged(tmp_path, monkeypatch, no_fit):
    path = tmp_path / "model.pt"
    torch.save({"format": "x"}, path)
    _deny(monkeypatch, path)
    out = tmp_path / "out"
    line = assert_one_line_error(invoke(path, "--data", "digits", *QUICK, "--out", out), "permission denied")
    assert "damaged" not in line
    assert not out.exists()


def test_data_permission_denied_is_not_damaged(tmp_path, monkeypatch, no_fit):
    path = _flat_npz(tmp_path / "data.npz")
    _deny(monkeypatch, path)
    out = tmp_path / "out"
    line = assert_one_line_error(invoke("mlp", "--data", path, *QUICK, "--out", out), "permission denied")
    assert "valid" not in line
    assert not out.exists()


def test_csv_renamed_npz_never_suggests_pickle(tmp_path, no_fit):
    path = tmp_path / "data.npz"
    path.write_text("x,y\n0.5,1\n0.25,0\n")
    before = path.read_bytes()
    line = assert_one_line_error(invoke("mlp", "--data", path, *QUICK, "--out", tmp_path / "out"),
                                 "not an .npz archive")
    assert "pickle" not in line
    assert path.read_bytes() == before


def test_npy_renamed_npz_is_named_as_such(tmp_path, no_fit):
    path = tmp_path / "data.npz"
    with open(path, "wb") as f:
        np.save(f, np.zeros((4, 1024), np.float32))
    line = assert_one_line_error(invoke("mlp", "--data", path, *QUICK, "--out", tmp_path / "out"),
                                 "single .npy array", "not an .npz archive")
    assert "pickle" not in line


def test_uint64_label_2_63_is_not_called_negative(tmp_path, no_fit):
    path = tmp_path / "data.npz"
    y = (np.arange(40) % 10).astype(np.uint64)
    y[3] = 2**63
    np.savez(path, x=np.zeros((40, 1, 32, 32), np.float32), y=y)
    line = assert_one_line_error(invoke("mlp", "--data", path, *QUICK, "--out", tmp_path / "out"),
                                 "labels must be 0..K-1, got 9223372036854775808")
    assert "negative" not in line


def _checkpoint_naming(path: Path, arch: str) -> Path:
    from bmrs_surgery.loading import CHECKPOINT_FORMAT

    torch.save({"format": CHECKPOINT_FORMAT, "arch": arch, "num_classes": 10, "input_shape": [1, 32, 32],
                "groups": [], "state_dict": {}}, path)
    return path


@pytest.mark.parametrize("arch,fragment", [("nope_module_xyz:small", "cannot import"),
                                           ("no-such-net", "not one this toolkit knows")])
def test_checkpoint_architecture_errors_do_not_blame_arch_option(tmp_path, no_fit, arch, fragment):
    path = _checkpoint_naming(tmp_path / "ck.pt", arch)
    line = assert_one_line_error(invoke(path, "--trust-model", "--data", "digits", *QUICK, "--out", tmp_path / "out"),
                                 "the checkpoint's architecture", fragment)
    assert "--arch" not in line


def test_fewer_classes_than_outputs_is_accepted(tmp_path):
    """9-class data for the 10-output mlp fits (only labels >= 10 would not)."""
    data = _flat_npz(tmp_path / "nine.npz", classes=9)
    out = tmp_path / "out"
    ok(invoke("mlp", "--data", data, *QUICK, "--out", out))
    assert (out / "report.json").is_file()


def test_labels_at_or_above_outputs_are_refused(tmp_path, no_fit):
    data = _flat_npz(tmp_path / "eleven.npz", classes=11)
    assert_one_line_error(invoke("mlp", "--data", data, *QUICK, "--out", tmp_path / "out"), "labels must be 0..9")


# ------------------------------------------------------------------------------------------------
# bench: a worker's crash and its memory are its own
# ------------------------------------------------------------------------------------------------


def _identity_onnx(path: Path) -> Path:
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("body,fragments", [
    ("import sys; sys.stderr.write('worker boom: out of widgets\\n'); sys.exit(3)",
     ["exited with code 3", "worker boom: out of widgets"]),
    ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", ["killed by SIGKILL"]),
], ids=["exit-code", "signal"])
def test_bench_worker_crash_says_how_it_ended(tmp_path, monkeypatch, body, fragments):
    from bmrs_surgery import bench

    worker = tmp_path / "worker.py"
    worker.write_text(body + "\n")
    monkeypatch.setattr(bench, "WORKER", worker)
    with pytest.raises(bench.BenchError) as exc:
        bench.benchmark([_identity_onnx(tmp_path / "m.onnx")], batch_sizes=(1,), runs=1, rounds=1, warmup=0)
    msg = str(exc.value)
    assert "\n" not in msg
    for fragment in fragments:
        assert fragment in msg, msg


def test_bench_peak_rss_is_the_workers_own(tmp_path):
    """The parent holds 600 MiB more than a worker ever does: the worker's figure must not include it."""
    from bmrs_surgery import bench

    ballast = np.ones(600 * 2**20, dtype=np.uint8)  # touched: resident in the parent
    result = bench.benchmark([_identity_onnx(tmp_path / "m.onnx")], batch_sizes=(1,), runs=2, rounds=1, warmup=0)
    peak = result["models"][0]["batches"][0]["peak_rss_mb"]
    assert 0 < peak < 500, peak
    del ballast
