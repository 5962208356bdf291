"""``bmrs-compress bench`` and ``bmrs-compress sweep``, and the bundled demo model and data."""

from __future__ import annotations

import json

import pytest
import torch

from bmrs_surgery.export import onnx_bytes
from models import get_model
from test_cli import assert_one_line_error, invoke, ok


@pytest.fixture(scope="module")
def onnx_pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("onnx")
    x = torch.randn(2, 3, 16, 16)
    a, b = d / "a.onnx", d / "b.onnx"
    a.write_bytes(onnx_bytes(get_model("resnet_block").eval(), x)[0])
    b.write_bytes(onnx_bytes(get_model("depthwise_separable").eval(), x)[0])
    return a, b


def test_bench_two_onnx_files_interleaved_with_ratios(onnx_pair):
    a, b = onnx_pair
    doc = json.loads(ok(invoke("bench", a, b, "--batch-sizes", "1,4", "--runs", "6", "--warmup", "1",
                               "--threads", "1", "--json")).stdout)
    s = doc["session"]
    assert s["provider"] == "CPUExecutionProvider" and s["intra_op_threads"] == 1
    assert s["graph_optimization"] == "ORT_ENABLE_ALL"
    for m in doc["models"]:
        assert [x["batch"] for x in m["batches"]] == [1, 4] and m["file_size_bytes"] > 1000
        for x in m["batches"]:
            assert x["runs"] >= 5 and 0 < x["min_ms"] <= x["median_ms"] <= x["p90_ms"]
            assert x["throughput_per_s"] == pytest.approx(x["batch"] * 1000 / x["median_ms"])
            assert x["peak_rss_mb"] > 10
    r = doc["ratios_vs_first"][0]["batches"]
    assert r[0]["median_ratio"] == pytest.approx(doc["models"][1]["batches"][0]["median_ms"]
                                                 / doc["models"][0]["batches"][0]["median_ms"])


def test_bench_exports_a_model_on_the_fly():
    doc = json.loads(ok(invoke("bench", "mlp", "--batch-sizes", "2", "--runs", "3", "--warmup", "0", "--json")).stdout)
    assert doc["models"][0]["model"] == "mlp" and doc["models"][0]["batches"][0]["batch"] == 2


@pytest.mark.parametrize("make,fragments", [
    (lambda d, pair: [d / "missing.onnx"], ["does not exist"]),
    (lambda d, pair: [_write(d / "junk.onnx", b"not onnx")], ["not a valid ONNX model"]),
    (lambda d, pair: [pair[0], _write(d / "mlp.onnx", onnx_bytes(get_model("mlp").eval(), torch.randn(2, 1, 32, 32))[0])],
     ["different inputs"]),
    (lambda d, pair: [pair[0], "--batch-sizes", "0,2"], ["--batch-sizes"]),
])
def test_bench_bad_input(tmp_path, onnx_pair, make, fragments):
    assert_one_line_error(invoke("bench", *make(tmp_path, onnx_pair)), *fragments)


def _write(path, data):
    path.write_bytes(data)
    return path


def test_sweep_curves_per_criterion_with_bmrs_stop(tmp_path):
    out = tmp_path / "sw"
    ok(invoke("sweep", "lenet5", "--data", "digits", "--epochs", "1", "--levels", "3", "--out", out))
    doc = json.loads((out / "sweep.json").read_text())
    assert set(doc["curves"]) == {"bmrs_n", "bmrs_u", "snr", "l2"}
    for pts in doc["curves"].values():
        assert len(pts) == 4
        comp = [p["compression"] for p in pts]
        assert comp == sorted(comp) and comp[0] == 0.0 and comp[-1] > 0.9
        assert all(0.0 <= p["accuracy"] <= 1.0 for p in pts)
    assert doc["bmrs_stop"]["criterion"] == "bmrs_u8"
    assert "data:image/png;base64," in (out / "sweep.html").read_text()


def test_sweep_bad_criterion_is_one_line(tmp_path):
    assert_one_line_error(invoke("sweep", "lenet5", "--data", "digits", "--criteria", "foo", "--out", tmp_path / "x"),
                          "--criteria")


def test_bundled_model_and_sample_data():
    from bmrs_surgery.data import load_data
    from bmrs_surgery.fit import accuracy

    data = load_data("fashion-mnist-sample")
    assert [len(d) for d in (data.train, data.val, data.test)] == [4800, 1200, 2000]
    assert data.input_shape == (1, 32, 32)
    assert accuracy(get_model("lenet5-fmnist"), data.test) > 0.85
