"""Hugging Face transformers through torch.export (issue 16): tiny random BERT, GPT-2 (Conv1D),
Llama with grouped-query attention and Swin with its per-head relative-position tables. Groups
exactly as expected, surgery, proof, ONNX with named int64 inputs and dynamic axes, recipe replay,
from_pretrained where widths are uniform, and token inputs through the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from bmrs_surgery.check import check_model  # noqa: E402
from bmrs_surgery.gated import attach_gates  # noqa: E402
from bmrs_surgery.graph.export_trace import analyse_model  # noqa: E402
from bmrs_surgery.hf import from_config  # noqa: E402
from bmrs_surgery.inputs import InputSpec, make_inputs, outputs  # noqa: E402
from bmrs_surgery.surgery import group_keep, shrink  # noqa: E402
from bmrs_surgery.verify import compare  # noqa: E402

TOKENS = [InputSpec("input_ids", torch.int64, (1, 12)), InputSpec("attention_mask", torch.int64, (1, 12))]
TINY = {
    "bert": ("BertConfig", dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=48, max_position_embeddings=32)),
    "gpt2": ("GPT2Config", dict(vocab_size=50, n_embd=32, n_layer=2, n_head=4, n_positions=32, bos_token_id=0,
                                eos_token_id=0)),
    "llama": ("LlamaConfig", dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, intermediate_size=48, max_position_embeddings=32,
                                  pad_token_id=0, bos_token_id=0, eos_token_id=0)),
}


def tiny(name):
    cls, sizes = TINY[name]
    return from_config(cls, **sizes)


def analysed(name):
    model = tiny(name)
    return model, analyse_model(model, make_inputs(TOKENS, model))


def by_name(analysis):
    return {g.name: g for g in analysis.groups}


def slot(group, target):
    return next(s for s in group.slots if s.target == target)


def test_bert_groups_are_heads_and_ffn_neurons():
    _, a = analysed("bert")
    assert a.tracer == "export"
    groups = by_name(a)
    assert len(groups) == 4  # per layer: one head group, one FFN group; the LayerNorm stream stays
    for i in range(2):
        heads = groups[f"encoder.layer.{i}.attention.self.query"]
        assert heads.kind == "heads" and heads.size == 4
        assert heads.consumers == [f"encoder.layer.{i}.attention.output.dense"]
        for proj in ("query", "key", "value"):  # rows 8h..8h+7 are head h in q, k and v
            s = slot(heads, f"encoder.layer.{i}.attention.self.{proj}.weight")
            assert s.dim == 0 and s.index.tolist() == np.repeat(np.arange(4), 8).tolist()
        out = slot(heads, f"encoder.layer.{i}.attention.output.dense.weight")
        assert out.dim == 1 and out.index.tolist() == np.repeat(np.arange(4), 8).tolist()
        ffn = groups[f"encoder.layer.{i}.intermediate.dense"]
        assert ffn.size == 48 and ffn.consumers == [f"encoder.layer.{i}.output.dense"]
    assert any("LayerNorm" in why for _, why in a.propagation.opaque)  # inspect says why the stream stays


def test_gpt2_conv1d_heads_span_q_k_v_of_the_fused_projection():
    _, a = analysed("gpt2")
    groups = by_name(a)
    heads = groups["h.0.attn.c_attn"]
    assert heads.kind == "heads" and heads.size == 4 and heads.consumers == ["h.0.attn.c_proj"]
    w = slot(heads, "h.0.attn.c_attn.weight")  # Conv1D: (in, out), the out dim is 1
    assert w.dim == 1 and w.index.tolist() == np.tile(np.repeat(np.arange(4), 8), 3).tolist()
    assert slot(heads, "h.0.attn.c_attn.bias").dim == 0
    assert slot(heads, "h.0.attn.c_proj.weight").dim == 0  # c_proj reads heads on its input rows
    ffn = groups["h.0.mlp.c_fc"]
    assert ffn.size == 128 and ffn.consumers == ["h.0.mlp.c_proj"]


def test_llama_gqa_structure_is_a_kv_head_with_its_query_heads():
    _, a = analysed("llama")
    groups = by_name(a)
    heads = groups["layers.0.self_attn.q_proj"]
    assert heads.kind == "heads" and heads.size == 2  # two key/value heads, each with two query heads
    q = slot(heads, "layers.0.self_attn.q_proj.weight")
    k = slot(heads, "layers.0.self_attn.k_proj.weight")
    assert q.index.tolist() == np.repeat(np.arange(2), 16).tolist()  # query heads 0,1 -> kv 0; 2,3 -> kv 1
    assert k.index.tolist() == np.repeat(np.arange(2), 8).tolist()
    ffn = groups["layers.0.mlp.gate_proj"]
    assert ffn.size == 48
    assert {s.target for s in ffn.slots} == {"layers.0.mlp.gate_proj.weight", "layers.0.mlp.up_proj.weight",
                                             "layers.0.mlp.down_proj.weight"}
    assert slot(ffn, "layers.0.mlp.down_proj.weight").dim == 1


def _pruned(name, drop_first=True):
    return _cut(*analysed(name), drop_first)


def _cut(model, a, drop_first=True):
    gated = attach_gates(model, analysis=a)
    bank = gated.bmrs_gates
    keep = torch.ones(bank.num_gates, dtype=torch.bool)
    for i in range(len(bank.groups)):  # drop the first structure of every group (the same in every layer)
        if drop_first:
            keep[bank.slice_of(i).start] = False
    with torch.no_grad():
        bank.mask.copy_(keep.float())
    gated.eval()
    return model, a, gated, bank, keep, shrink(a, bank, keep)


def test_llama_pruned_keeps_its_class_and_repeat_kv_shapes():
    model, a, gated, bank, keep, pruned = _pruned("llama")
    assert type(pruned) is type(model)
    att = pruned.layers[0].self_attn
    assert att.q_proj.out_features == 16 and att.k_proj.out_features == 8 and att.o_proj.in_features == 16
    assert att.num_key_value_groups == 2  # one kv head with its two query heads went: the ratio holds
    assert pruned.layers[0].mlp.down_proj.in_features == 47
    xs = [make_inputs(TOKENS, model, batch=2, seed=s) for s in (1, 2)]
    proof = compare(outputs(gated, xs), outputs(pruned, xs), 1e-4)
    assert proof.ok, proof.max_abs_diff
    assert model.layers[0].self_attn.q_proj.out_features == 32  # the analysed model is untouched


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bert", "gpt2", "llama"])
def test_check_passes_with_token_inputs(name):
    res = check_model(tiny(name), (1, 12), name=name, specs=TOKENS, ratio=0.5)
    assert res.ok, res.stages
    assert res.tracer == "export"
    assert res.params_after < res.params_before
    assert res.max_abs_diff <= 1e-4 * res.output_scale
    assert res.onnx_max_abs_diff is not None  # ONNX Runtime ran batch 2, batch 3 and one token fewer


def test_onnx_named_int64_inputs_with_dynamic_axes():
    pytest.importorskip("onnxruntime")
    from bmrs_surgery.export import onnx_bytes, ort_parity, session

    *_, pruned = _pruned("bert")
    example = make_inputs(TOKENS, pruned, batch=2)
    data, _ = onnx_bytes(pruned, example)
    sess = session(data)
    ins = {i.name: i for i in sess.get_inputs()}
    assert set(ins) == {"input_ids", "attention_mask"}
    assert ins["input_ids"].type == "tensor(int64)"
    assert not isinstance(ins["input_ids"].shape[0], int) and not isinstance(ins["input_ids"].shape[1], int)
    assert ort_parity(pruned, data, [example], 1e-4) <= 1e-4 * 10


def test_recipe_replays_on_a_fresh_instance(tmp_path):
    from bmrs_surgery import apply_recipe
    from bmrs_surgery.recipe import make_recipe, save_recipe

    model, a, gated, bank, keep, pruned = _pruned("gpt2")
    recipe = make_recipe(a, group_keep(bank, keep))
    assert [g["kept"] for g in recipe["groups"]][0] == [1, 2, 3]
    save_recipe(pruned, recipe, tmp_path / "r")
    assert json.loads((tmp_path / "r" / "recipe.json").read_text())["format"] == "bmrs-surgery/recipe/1"
    fresh = tiny("gpt2")  # a new instance of the user's class (its own random weights)
    replayed = apply_recipe(fresh, tmp_path / "r")
    assert type(replayed) is type(model) and replayed.h[0].attn.num_heads == 3
    xs = [make_inputs(TOKENS, model, batch=2, seed=s) for s in (3, 4)]
    proof = compare(outputs(pruned, xs), outputs(replayed, xs), 1e-6)
    assert proof.ok and proof.max_abs_diff == 0.0


def test_recipe_refuses_another_model():
    from bmrs_surgery import apply_recipe
    from bmrs_surgery.errors import ModelLoadError
    from bmrs_surgery.recipe import make_recipe

    _, a, _, bank, keep, _ = _pruned("llama")
    with pytest.raises(ModelLoadError, match="does not have|recipe expects"):
        apply_recipe(tiny("bert"), make_recipe(a, group_keep(bank, keep)))


def test_from_pretrained_reloads_uniform_widths(tmp_path):
    from transformers import AutoModel

    from bmrs_surgery.hf import save_pretrained

    model, _, _, _, _, pruned = _pruned("llama")
    assert save_pretrained(pruned, tmp_path / "hf") is None
    again = AutoModel.from_pretrained(str(tmp_path / "hf"), local_files_only=True)
    assert again.config.num_key_value_heads == 1 and again.config.head_dim == 8
    xs = [make_inputs(TOKENS, model, batch=2, seed=5)]
    assert compare(outputs(pruned, xs), outputs(again, xs), 1e-6).ok


def test_from_pretrained_says_what_loads_per_layer_widths(tmp_path):
    from bmrs_surgery.hf import save_pretrained

    model, a = analysed("bert")
    gated = attach_gates(model, analysis=a)
    bank = gated.bmrs_gates
    keep = torch.ones(bank.num_gates, dtype=torch.bool)
    keep[bank.slice_of(0).start] = False  # one head of layer 0 only
    pruned = shrink(a, bank, keep)
    why = save_pretrained(pruned, tmp_path / "hf")
    assert why is not None and "apply_recipe" in why
    assert not (tmp_path / "hf").exists()


def test_hf_folder_loads_offline_and_names_a_missing_file(tmp_path):
    from bmrs_surgery.errors import ModelLoadError
    from bmrs_surgery.loading import load_model

    tiny("bert").save_pretrained(str(tmp_path / "m"), safe_serialization=True)
    loaded = load_model(f"hf:{tmp_path / 'm'}")
    assert type(loaded.model).__name__ == "BertModel"
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="model.safetensors is missing"):
        load_model(f"hf:{tmp_path / 'm'}")


def test_input_specs_are_parsed_and_refused_in_one_line():
    from bmrs_surgery.errors import JobError
    from bmrs_surgery.inputs import parse_input, parse_inputs

    s = parse_input("input_ids:int64:2x128")
    assert s.dtype == torch.int64 and s.shape == (2, 128) and str(s) == "input_ids:int64:2x128"
    for bad in ("input_ids:int64", "input_ids:int65:1x4", "1x:int64:1x4", "ids:int64:0x4", "ids:int64:1xa"):
        with pytest.raises(JobError):
            parse_input(bad)
    with pytest.raises(JobError, match="batch"):
        parse_inputs(["a:int64:1x4", "b:int64:2x4"])


@pytest.mark.slow
def test_cli_check_and_inspect_with_token_inputs(tmp_path):
    from click.testing import CliRunner

    from cli.main import cli

    tiny("llama").save_pretrained(str(tmp_path / "m"), safe_serialization=True)
    runner = CliRunner()
    res = runner.invoke(cli, ["inspect", f"hf:{tmp_path / 'm'}", "--input", "input_ids:int64:1x12",
                              "--format", "json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert doc["tracer"] == "export" and [g["kind"] for g in doc["groups"]].count("heads") == 2
    res = runner.invoke(cli, ["check", f"hf:{tmp_path / 'm'}", "--input", "input_ids:int64:1x12",
                              "--input", "attention_mask:int64:1x12", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["ok"] and out["inputs"] == ["input_ids:int64:1x12", "attention_mask:int64:1x12"]
    res = runner.invoke(cli, ["check", f"hf:{tmp_path / 'm'}", "--input", "input_ids:int64:1x12", "--tracer", "fx"])
    assert res.exit_code == 2 and "--tracer fx" in res.output


@pytest.mark.slow
def test_phi3_fused_qkv_and_gate_up_prune_by_kv_groups():
    """Phi-3: q/k/v in one projection (sliced by the model's own attributes, which surgery updates
    in a per-layer copy of the config), gate and up in one projection (chunked)."""
    from bmrs_surgery.loading import load_model

    model = load_model("hf:Phi3Config:num_hidden_layers=1").model
    a = analyse_model(model, make_inputs(TOKENS, model))
    kinds = sorted(g.kind for g in a.groups)
    assert kinds == ["heads", "scale"]
    heads = next(g for g in a.groups if g.kind == "heads")
    assert heads.size == 2  # 4 query heads over 2 key/value heads
    res = check_model(model, (1, 12), name="phi3", specs=TOKENS, ratio=0.5, onnx=False)
    assert res.ok, res.stages


class _DataDependent(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x) if x.sum() > 0 else x


def test_when_both_tracers_fail_one_line_names_the_construct():
    from bmrs_surgery.errors import GraphError

    with pytest.raises(GraphError) as err:
        analyse_model(_DataDependent(), torch.randn(1, 4))
    msg = str(err.value)
    assert "\n" not in msg and "neither tracer" in msg
    assert "torch.fx:" in msg and "torch.export:" in msg
    assert "test_transformers.py" in msg and "in forward" in msg  # where export stopped


def test_export_tracer_on_a_plain_module_matches_fx_groups():
    """The same groups from both front ends on a model fx can trace (names and sizes)."""
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 5), torch.nn.GELU(),
                              torch.nn.Linear(5, 3))
    x = torch.randn(2, 6)
    fx_groups = [(g.name, g.size, g.consumers) for g in analyse_model(net, x, tracer="fx").groups]
    ex_groups = [(g.name, g.size, g.consumers) for g in analyse_model(net, x, tracer="export").groups]
    assert fx_groups == ex_groups == [("0", 8, ["2"]), ("2", 5, ["4"])]


def test_recipe_replays_an_fx_pruned_network_on_the_users_class():
    """Any model: the recipe of an fx-traced network (a GraphModule after surgery) replays on a fresh
    instance of the user's own class, which then computes what the pruned GraphModule computes."""
    from bmrs_surgery import apply_recipe
    from bmrs_surgery.recipe import make_recipe

    def net():
        torch.manual_seed(3)
        return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                   torch.nn.Conv2d(8, 6, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                   torch.nn.Linear(6 * 4 * 4, 5)).eval()

    model = net()
    a = analyse_model(model, torch.randn(1, 3, 8, 8), tracer="fx")
    gated = attach_gates(model, analysis=a)
    bank = gated.bmrs_gates
    keep = torch.ones(bank.num_gates, dtype=torch.bool)
    keep[[0, 3, 9]] = False
    pruned = shrink(a, bank, keep)
    replayed = apply_recipe(net(), make_recipe(a, group_keep(bank, keep)), weights=pruned.state_dict())
    assert type(replayed) is torch.nn.Sequential and replayed[0].out_channels == 6
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(pruned(x), replayed(x))


SWIN = dict(image_size=16, patch_size=4, embed_dim=16, depths=[2, 1], num_heads=[2, 4], window_size=2, mlp_ratio=2.0)
IMAGE = [InputSpec("pixel_values", torch.float32, (1, 3, 16, 16))]
TABLE = "relative_position_bias.relative_position_bias_table"


def tiny_swin():
    """Stage 0: a 4x4 patch grid, 2 heads of 8, its second block shifted (the bias plus the window
    mask); stage 1: 2x2, 4 heads of 8. transformers starts the bias tables at zero, where a wrongly
    sliced table would not show in the proof: here they are random."""
    model = from_config("SwinConfig", **SWIN)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(TABLE):
                p.normal_()
    return model


def test_swin_heads_slice_q_k_v_and_the_relative_position_bias_table(tmp_path):
    """Swin's attention adds ``table[index]`` (one table column per head, rules.aten.index) to the
    scores: a head is its q/k/v rows, its o_proj columns and its table column, and the pruned model
    runs its own forward, proven equal, and replays from a recipe."""
    from bmrs_surgery import apply_recipe
    from bmrs_surgery.recipe import make_recipe, save_recipe

    model = tiny_swin()
    a = analyse_model(model, make_inputs(IMAGE, model))
    blocks = {"encoder.layers.0.blocks.0.attention": 2, "encoder.layers.0.blocks.1.attention": 2,
              "encoder.layers.1.blocks.0.attention": 4}
    heads = [g for g in a.groups if g.kind == "heads"]
    assert [(g.consumers, g.size) for g in heads] == [([f"{att}.o_proj"], n) for att, n in blocks.items()]
    for g, (att, n) in zip(heads, blocks.items()):
        assert slot(g, f"{att}.{TABLE}").dim == 1 and slot(g, f"{att}.{TABLE}").index.tolist() == list(range(n))
        for proj in ("q_proj", "k_proj", "v_proj"):  # rows 8h..8h+7 are head h
            assert slot(g, f"{att}.{proj}.weight").index.tolist() == np.repeat(np.arange(n), 8).tolist()
        assert slot(g, f"{att}.o_proj.weight").dim == 1
    assert sorted(g.size for g in a.groups if g.kind != "heads") == [32, 32, 64]  # the FFN neurons

    model, a, gated, bank, keep, pruned = _cut(model, a)  # head 0 of every attention goes
    for att, n in blocks.items():
        cut = pruned.get_submodule(att)
        assert cut.num_attention_heads == n - 1 and cut.q_proj.out_features == 8 * (n - 1)
        table = model.get_submodule(att).relative_position_bias.relative_position_bias_table
        assert torch.equal(cut.relative_position_bias.relative_position_bias_table, table[:, 1:])
    xs = [make_inputs(IMAGE, model, batch=2, seed=s) for s in (1, 2)]
    proof = compare(outputs(gated, xs), outputs(pruned, xs), 1e-4)
    assert proof.ok and proof.max_abs_diff < 1e-5, proof.max_abs_diff

    save_recipe(pruned, make_recipe(a, group_keep(bank, keep)), tmp_path / "r")
    replayed = apply_recipe(tiny_swin(), tmp_path / "r")
    assert replayed.encoder.layers[1].blocks[0].attention.num_attention_heads == 3
    proof = compare(outputs(pruned, xs), outputs(replayed, xs), 1e-6)
    assert proof.ok and proof.max_abs_diff == 0.0
