"""Named inputs beyond ``check`` and ``inspect`` (issue 16, item 2): ``bench`` and ``compress`` with
``--input NAME:DTYPE:SHAPE`` / ``--inputs-file``, ONNX Runtime fed every input with its own dtype
and shape, and ONNX exports of named-input models with dynamic batch and sequence axes, run at two
batch sizes and two sequence lengths. Tiny random transformers (2 layers, hidden size 32)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")

from bmrs_surgery.export import onnx_bytes, session  # noqa: E402
from bmrs_surgery.hf import from_config  # noqa: E402
from bmrs_surgery.inputs import InputSpec, make_inputs  # noqa: E402
from test_cli import assert_one_line_error, invoke, ok  # noqa: E402

BERT_SIZES = dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=48, max_position_embeddings=64)
BERT = "hf:BertConfig:" + ",".join(f"{k}={v}" for k, v in BERT_SIZES.items())
TOKENS = [InputSpec("input_ids", torch.int64, (1, 16)), InputSpec("attention_mask", torch.int64, (1, 16))]
IDS = ["--input", "input_ids:int64:1x16", "--input", "attention_mask:int64:1x16"]
FAST = ["--runs", "3", "--warmup", "1", "--threads", "1", "--json"]


def tiny_bert():
    torch.manual_seed(0)
    return from_config("BertConfig", **BERT_SIZES).eval()


@pytest.fixture(scope="module")
def bert_onnx(tmp_path_factory):
    """A tiny BERT exported with named int64 inputs (dynamic batch and sequence axes)."""
    model = tiny_bert()
    path = tmp_path_factory.mktemp("named") / "bert.onnx"
    path.write_bytes(onnx_bytes(model, make_inputs(TOKENS, model, batch=2))[0])
    return path


def _gather_onnx(path, rows: int = 20, length: int = 8):
    """A hand-written ONNX model with two int64 inputs of fixed length: ``input_ids`` index a table of
    ``rows`` rows (ONNX Runtime's Gather fails on an id out of range), ``attention_mask`` scales them."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    table = numpy_helper.from_array(np.arange(rows * 4, dtype=np.float32).reshape(rows, 4), "table")
    nodes = [helper.make_node("Gather", ["table", "input_ids"], ["emb"]),
             helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["maskf", "axis"], ["mask3"]),
             helper.make_node("Mul", ["emb", "mask3"], ["output"])]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", length]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", length])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", length, 4])],
        [table, numpy_helper.from_array(np.array([-1], dtype=np.int64), "axis")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())
    return path


# ---- item 3: the export of a named-input model has dynamic batch and sequence axes ----------------

@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_named_onnx_runs_at_two_batch_sizes_and_two_sequence_lengths(exporter):
    if exporter == "dynamo":
        pytest.importorskip("onnxscript")  # torch's dynamo exporter needs it
    model = tiny_bert()
    data, used = onnx_bytes(model, make_inputs(TOKENS, model, batch=2), exporter)
    assert used == exporter
    sess = session(data)
    ins = {i.name: i for i in sess.get_inputs()}
    assert set(ins) == {"input_ids", "attention_mask"} and ins["input_ids"].type == "tensor(int64)"
    seen = set()
    for batch in (1, 3):
        for length in (5, 24):
            spec = [InputSpec(s.name, s.dtype, (batch, length)) for s in TOKENS]
            x = make_inputs(spec, model, seed=batch * 100 + length)
            x["attention_mask"][:, -2:] = 0  # a padded tail: the mask reaches the attention
            (out,) = sess.run(None, {k: v.numpy() for k, v in x.items()})
            with torch.no_grad():
                ref = model(**x).last_hidden_state.numpy()
            assert out.shape == (batch, length, 32)
            np.testing.assert_allclose(out, ref, atol=1e-4 * np.abs(ref).max())
            seen.add(out.shape)
    assert len(seen) == 4


# ---- issue 17, item 5: auto exports with TorchScript first (3-17x faster, same outputs) -----------

def _recording_export(monkeypatch, fail_torchscript: bool = False) -> list:
    """torch.onnx.export, recording the exporter of every call (and failing TorchScript if asked)."""
    calls, real = [], torch.onnx.export

    def export(*args, **kwargs):
        kind = "dynamo" if kwargs.get("dynamo") else "torchscript"
        calls.append(kind)
        if fail_torchscript and kind == "torchscript":
            raise RuntimeError("TorchScript refused (test)")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", export)
    return calls


def test_auto_exports_a_tensor_model_with_torchscript_first(monkeypatch):
    from bmrs_surgery.export import AUTO_ORDER

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 5)).eval()
    calls = _recording_export(monkeypatch)
    data, used = onnx_bytes(model, torch.randn(2, 3, 16, 16))
    assert AUTO_ORDER == ("torchscript", "dynamo")
    assert used == "torchscript" and calls == ["torchscript"]  # dynamo was never tried
    x = torch.randn(5, 3, 16, 16)  # another batch than the example's
    (out,) = session(data).run(None, {"input": x.numpy()})
    with torch.no_grad():
        ref = model(x).numpy()
    assert out.shape == (5, 5)
    np.testing.assert_allclose(out, ref, atol=1e-5 * np.abs(ref).max())


def test_auto_exports_named_token_inputs_with_torchscript_first(monkeypatch):
    model = tiny_bert()
    calls = _recording_export(monkeypatch)
    data, used = onnx_bytes(model, make_inputs(TOKENS, model, batch=2))
    assert used == "torchscript" and calls == ["torchscript"]
    spec = [InputSpec(s.name, s.dtype, (3, 9)) for s in TOKENS]  # batch 3, 9 tokens; the example had 2 x 16
    x = make_inputs(spec, model, seed=7)
    x["attention_mask"][:, -3:] = 0
    (out,) = session(data).run(None, {k: v.numpy() for k, v in x.items()})
    with torch.no_grad():
        ref = model(**x).last_hidden_state.numpy()
    assert out.shape == (3, 9, 32)
    np.testing.assert_allclose(out, ref, atol=1e-4 * np.abs(ref).max())


class _Attention(torch.nn.Module):
    """timm's Attention in small: forward takes a mask and ``is_causal`` after the input."""

    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(8, 24)

    def forward(self, x, attn_mask=None, is_causal: bool = False):
        q, k, v = self.qkv(x).reshape(x.shape[0], x.shape[1], 3, 8).unbind(2)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)


def test_torchscript_exports_an_fx_module_with_defaulted_parameters():
    # TorchScript passed is_causal=False as a traced tensor, which SDPA refused (timm's ViT after fx)
    torch.manual_seed(0)
    model = torch.fx.symbolic_trace(_Attention().eval())
    data, used = onnx_bytes(model, torch.randn(2, 5, 8), "torchscript")
    sess = session(data)
    assert [i.name for i in sess.get_inputs()] == ["input"]
    x = torch.randn(3, 5, 8)
    (out,) = sess.run(None, {"input": x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(out, model(x).numpy(), atol=1e-5)


def test_auto_falls_back_to_dynamo_when_torchscript_fails(monkeypatch):
    from bmrs_surgery.errors import ExportError

    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.ReLU()).eval()
    calls = _recording_export(monkeypatch, fail_torchscript=True)
    try:
        import onnxscript  # noqa: F401 - the dynamo exporter needs it
    except ImportError:
        with pytest.raises(ExportError, match=r"\(torchscript: TorchScript refused \(test\); dynamo: "):
            onnx_bytes(model, torch.randn(2, 6))
    else:
        data, used = onnx_bytes(model, torch.randn(2, 6))
        assert used == "dynamo"
        x = torch.randn(3, 6)
        (out,) = session(data).run(None, {"input": x.numpy()})
        np.testing.assert_allclose(out, model(x).detach().numpy(), atol=1e-6)
    assert calls == ["torchscript", "dynamo"]


def test_a_graph_that_fails_onnx_runtime_is_exported_again_with_the_other_exporter(monkeypatch):
    import bmrs_surgery.export as export

    exported, checked = [], []
    monkeypatch.setattr(export, "onnx_bytes", lambda m, x, kind="auto": (
        exported.append(kind) or (b"graph-" + (b"ts" if kind in ("auto", "torchscript") else b"dy"),
                                  "torchscript" if kind == "auto" else kind)))

    def parity(model, data, inputs, tolerance):
        checked.append(data)
        if data == b"graph-ts":  # say, a batch size fixed in the graph
            raise export.ExportError("ONNX Runtime output shape (2, 5) != torch (3, 5)")
        return 1e-7

    monkeypatch.setattr(export, "ort_parity", parity)
    assert export.verified_onnx(None, None, []) == (b"graph-dy", "dynamo", 1e-7)
    assert exported == ["auto", "dynamo"] and checked == [b"graph-ts", b"graph-dy"]
    monkeypatch.setattr(export, "ort_parity", lambda *a: (_ for _ in ()).throw(export.ExportError("first")))
    with pytest.raises(export.ExportError, match="^first$"):  # neither passes: the first failure is told
        export.verified_onnx(None, None, [])


# ---- item 1: bench feeds every input with its own dtype and shape ---------------------------------

def test_bench_model_spec_with_token_inputs():
    doc = json.loads(ok(invoke("bench", BERT, *IDS, "--batch-sizes", "1,3", *FAST)).stdout)
    assert doc["session"]["inputs"] == ["input_ids:int64:Bx16 (ids in [0, 50))",
                                        "attention_mask:int64:Bx16 (all ones)"]
    (m,) = doc["models"]
    assert m["inputs"] == ["input_ids", "attention_mask"]
    assert [b["batch"] for b in m["batches"]] == [1, 3] and all(b["runs"] >= 3 for b in m["batches"])


def test_bench_onnx_file_against_a_model_spec_with_named_inputs(bert_onnx):
    doc = json.loads(ok(invoke("bench", bert_onnx, BERT, *IDS, "--batch-sizes", "2", *FAST)).stdout)
    assert [m["model"] for m in doc["models"]] == [str(bert_onnx), BERT]
    assert doc["ratios_vs_first"][0]["batches"][0]["median_ratio"] > 0


def test_bench_plain_onnx_reads_its_graph_inputs(tmp_path):
    path = _gather_onnx(tmp_path / "fixed.onnx", rows=20, length=8)
    doc = json.loads(ok(invoke("bench", path, "--batch-sizes", "1,4", *FAST)).stdout)
    assert doc["session"]["inputs"] == ["input_ids:int64:Bx8 (ids in [0, 20))", "attention_mask:int64:Bx8 (all ones)"]


def test_bench_token_ids_stay_below_the_onnx_vocabulary(tmp_path):
    """ids asked below 1000 are capped by the 3-row table found in the graph; uncapped, ORT's Gather fails."""
    from bmrs_surgery.bench import benchmark

    path = _gather_onnx(tmp_path / "small.onnx", rows=3, length=8)
    feeds = [{"name": "input_ids", "dtype": "int64", "shape": [8], "fill": "ids", "high": 1000},
             {"name": "attention_mask", "dtype": "int64", "shape": [8], "fill": "ones", "high": None}]
    doc = benchmark([path], (64,), threads=1, warmup=0, runs=2, rounds=1, feeds=feeds)
    assert doc["session"]["inputs"][0] == "input_ids:int64:Bx8 (ids in [0, 3))"
    sess = session(str(path))  # and ids out of range do fail there: the cap is what lets the run pass
    with pytest.raises(Exception):  # noqa: B017 - onnxruntime's own error types
        sess.run(None, {"input_ids": np.full((1, 8), 5, dtype=np.int64), "attention_mask": np.ones((1, 8), np.int64)})


def test_bench_symbolic_sequence_without_input_says_so(bert_onnx):
    line = assert_one_line_error(invoke("bench", bert_onnx, "--batch-sizes", "1"), "symbolic", "--input")
    assert "input_ids" in line or "attention_mask" in line


def test_bench_onnx_file_with_input_and_with_inputs_file(bert_onnx, tmp_path):
    from safetensors.torch import save_file

    doc = json.loads(ok(invoke("bench", bert_onnx, *IDS, "--batch-sizes", "1,5", *FAST)).stdout)
    assert doc["session"]["inputs"][0] == "input_ids:int64:Bx16 (ids in [0, 50))"  # the table read from the graph
    example = {"input_ids": torch.randint(0, 50, (2, 16)), "attention_mask": torch.ones(2, 16, dtype=torch.int64)}
    save_file(example, str(tmp_path / "ex.safetensors"))
    doc = json.loads(ok(invoke("bench", bert_onnx, "--inputs-file", tmp_path / "ex.safetensors",
                               "--batch-sizes", "3", *FAST)).stdout)
    assert doc["session"]["inputs"] == ["input_ids:int64:Bx16 (rows of --inputs-file)",
                                        "attention_mask:int64:Bx16 (rows of --inputs-file)"]


@pytest.mark.parametrize("args,fragments", [
    (["--input", "input_ids:int64"], ["--input", "NAME:DTYPE:SHAPE"]),
    (["--input", "input_ids:int64:1x16", "--input-shape", "1,16"], ["exclude each other"]),
    (["--input", "input_ids:int64:1x16"], ["attention_mask", "do not include"]),
    (["--input", "input_ids:int32:1x16", "--input", "attention_mask:int64:1x16"], ["input_ids is int64", "int32"]),
    (["--input", "input_ids:int64:1x16", "--input", "attention_mask:int64:1x16x2"], ["attention_mask has shape"]),
    (["--inputs-file", "missing.safetensors"], ["--inputs-file", "no such file"]),
    (["--input", "input_ids:int64:1x16", "--input", "attention_mask:int64:1x16", "--batch-sizes", "0"],
     ["--batch-sizes"]),
])
def test_bench_bad_named_inputs_are_one_line(bert_onnx, tmp_path, monkeypatch, args, fragments):
    monkeypatch.chdir(tmp_path)
    assert_one_line_error(invoke("bench", bert_onnx, *args), *fragments)
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_bench_help_lists_the_input_options():
    text = ok(invoke("bench", "--help")).stdout
    assert "--input NAME:DTYPE:SHAPE" in text and "--inputs-file" in text


# ---- compress: a model that carries fitted gates, with named inputs --------------------------------

@pytest.fixture(scope="module")
def gated_bert(tmp_path_factory):
    """A tiny BERT gated through torch.export (the Python API), its gates set as if fitted: the
    first layer's heads and some FFN neurons have dF >= 0, the second layer's none."""
    from bmrs_surgery.gated import attach_gates
    from bmrs_surgery.graph.export_trace import analyse_model

    model = tiny_bert()
    gated = attach_gates(model, analysis=analyse_model(model, make_inputs(TOKENS, model), tracer="export"))
    bank = gated.bmrs_gates
    with torch.no_grad():
        bank.posterior[0].copy_(torch.linspace(-6, 0.5, bank.num_gates))
        bank.posterior[1].fill_(-2.0)
    path = tmp_path_factory.mktemp("gated") / "gated_bert.pt"
    torch.save(gated, path)
    return path


@pytest.mark.slow
def test_compress_gated_token_model_with_named_inputs(gated_bert, tmp_path):
    import onnxruntime as ort

    out = tmp_path / "out"
    ok(invoke(gated_bert, "--trust-model", *IDS, "--bench-batch-sizes", "1,3", "--out", out, "--quiet"))
    doc = json.loads((out / "report.json").read_text())
    assert doc["inputs"] == ["input_ids:int64:1x16", "attention_mask:int64:1x16"]
    sur = doc["surgery"]
    assert sur["counts"]["params_after"] < sur["counts"]["params_before"]
    assert sur["proof"]["max_abs_diff"] <= 1e-4 * max(1.0, sur["proof"]["output_scale"])
    assert sur["benchmark"]["session"]["inputs"] == ["input_ids:int64:Bx16 (ids in [0, 50))",
                                                     "attention_mask:int64:Bx16 (all ones)"]
    assert [b["batch"] for b in sur["benchmark"]["models"][1]["batches"]] == [1, 3]
    # pruned.onnx: int64 inputs with dynamic batch and sequence axes, equal to pruned.pt at other sizes
    pruned = torch.load(out / "pruned.pt", weights_only=False).eval()
    sess = ort.InferenceSession(str(out / "pruned.onnx"), providers=["CPUExecutionProvider"])
    assert [(i.name, i.type) for i in sess.get_inputs()] == [("input_ids", "tensor(int64)"),
                                                            ("attention_mask", "tensor(int64)")]
    for batch, length in ((1, 9), (4, 20)):
        x = make_inputs([InputSpec(s.name, s.dtype, (batch, length)) for s in TOKENS], pruned, seed=length)
        (got,) = sess.run(None, {k: v.numpy() for k, v in x.items()})
        with torch.no_grad():
            ref = pruned(**x).last_hidden_state.numpy()
        np.testing.assert_allclose(got, ref, atol=1e-4 * np.abs(ref).max())
    # the gated.pt written holds the gates and the decision: it compresses again, from an inputs file
    from safetensors.torch import save_file

    save_file({"input_ids": torch.randint(0, 50, (2, 12)), "attention_mask": torch.ones(2, 12, dtype=torch.int64)},
              str(tmp_path / "ex.safetensors"))
    res = ok(invoke(out / "gated.pt", "--trust-model", "--inputs-file", tmp_path / "ex.safetensors",
                    "--bench-batch-sizes", "2", "--out", tmp_path / "again", "--json"))
    again = json.loads(res.stdout)  # --json: nothing else on stdout
    assert sorted(again["inputs"]) == ["attention_mask:int64:2x12", "input_ids:int64:2x12"]
    assert again["surgery"]["counts"]["params_after"] == sur["counts"]["params_after"]
    assert sorted(again["surgery"]["benchmark"]["session"]["inputs"]) == [
        "attention_mask:int64:Bx12 (rows of --inputs-file)", "input_ids:int64:Bx12 (rows of --inputs-file)"]


def test_compress_gated_token_model_meets_a_latency_budget_with_latency_widths(gated_bert, tmp_path):
    """A budget and --round-to auto measure the network on the named inputs: the latency is timed
    in ONNX Runtime fed token ids and a mask, and the run removes structures beyond BMRS's stop."""
    out = tmp_path / "out"
    ok(invoke(gated_bert, "--trust-model", *IDS, "--target-macs", "0.4", "--round-to", "auto",
              "--bench-batch-sizes", "", "--out", out, "--quiet"))
    doc = json.loads((out / "report.json").read_text())
    budget = doc["plan"]["budget"]
    assert budget["met"] and budget["removed_beyond_bmrs"] > 0 and budget["budget"]["macs_ratio"] <= 0.4
    assert budget["bmrs"]["macs_ratio"] > 0.4  # BMRS's own stop alone would not have met it
    assert doc["surgery"]["proof"]["ok"]
    table = doc["plan"]["latency_table"]  # widths were timed in ONNX Runtime on the token inputs
    assert table["entries_measured"] + table["entries_reused"] > 0
    # the widths chosen by latency are reported, unless on a loaded machine they grew past the target
    # and the exact widths were kept, which the note says
    assert doc["plan"]["widths"] or "exact widths kept" in budget["note"]


@pytest.mark.parametrize("extra,fragments", [
    (["--data", "digits"], ["--input", "without --data"]),
    (["--inputs-file", "ex.safetensors"], ["exclude each other"]),
    (["--input", "token_type_ids:int64"], ["--input", "NAME:DTYPE:SHAPE"]),
    (["--input", "token_type_ids:int64:2x16"], ["--input", "batch"]),
    (["--sweep", "3"], ["--data", "sweep"]),
    (["--epochs", "auto"], ["--input", "--epochs auto"]),
    (["--bench-batch-sizes", "300000000"], ["--bench-batch-sizes", "limit"]),
])
def test_compress_bad_named_inputs_are_one_line_and_write_nothing(gated_bert, tmp_path, extra, fragments):
    out = tmp_path / "out"
    assert_one_line_error(invoke(gated_bert, "--trust-model", *IDS, *extra, "--out", out), *fragments)
    assert not out.exists() or list(out.iterdir()) == []


def test_compress_named_inputs_need_fitted_gates(tmp_path):
    out = tmp_path / "out"
    assert_one_line_error(invoke(BERT, *IDS, "--out", out), "--input", "carries no fitted gates")
    assert not out.exists() or list(out.iterdir()) == []
    assert_one_line_error(invoke(BERT, "--inputs-file", tmp_path / "none.safetensors", "--out", out),
                          "--inputs-file", "no such file")


def test_compress_help_lists_the_input_options():
    text = ok(invoke("compress", "--help")).stdout
    assert "--input NAME:DTYPE:SHAPE" in text and "--inputs-file" in text
