"""Project issue 15, items 9 and 10: mistakes found before any work (not after a multi-minute fit),
and messages that say what is really wrong.

Every user mistake ends in exit code 2, one ``Error:`` line on stderr, nothing written to --out
and the input left as it was.
"""

from __future__ import annotations

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
