"""Hidden-size (residual stream) pruning in RMSNorm transformers (issue 16, item 4): the stream is one
group gated at its writers (embedding, attention output, FFN output), every RMSNorm is rescaled
(weight * sqrt(C/C'), eps * C/C'), every reader is cut on its input columns, and the pruned model
computes what the gated one did, runs its own forward at the new width and exports to ONNX. Under
LayerNorm (BERT), on a base model whose output is the stream, and with tied embeddings the stream is
kept and ``inspect`` says why. Tiny random models (2 layers, hidden 32)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from bmrs_surgery.check import check_model, random_masks  # noqa: E402
from bmrs_surgery.gated import attach_gates, detach_gates  # noqa: E402
from bmrs_surgery.graph.export_trace import analyse_model  # noqa: E402
from bmrs_surgery.graph.rules.transformers_layers import stream_form  # noqa: E402
from bmrs_surgery.hf import from_config, load_spec, save_pretrained  # noqa: E402
from bmrs_surgery.inputs import InputSpec, call, make_inputs, output_tensors  # noqa: E402
from bmrs_surgery.recipe import apply_recipe, make_recipe, save_recipe  # noqa: E402
from bmrs_surgery.surgery import group_keep, shrink  # noqa: E402

TOKENS = [InputSpec("input_ids", torch.int64, (1, 12)), InputSpec("attention_mask", torch.int64, (1, 12))]
SIZES = dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=48, max_position_embeddings=32, pad_token_id=0, bos_token_id=0, eos_token_id=0,
             tie_word_embeddings=False)
FAMILIES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM", "phi3": "Phi3ForCausalLM", "gemma": "GemmaForCausalLM"}
HIDDEN = 32


def tiny(cls="LlamaForCausalLM", **over):
    sizes = dict(SIZES, **over)
    if cls.startswith(("Qwen3", "Gemma")):
        sizes["head_dim"] = 8  # Qwen3's and Gemma's configs would otherwise keep head_dim 128 / 256
    return from_config(cls, **sizes)


def stream_of(analysis):
    streams = [g for g in analysis.groups if g.kind == "stream"]
    assert len(streams) <= 1
    return streams[0] if streams else None


def run(model, examples):
    """Every output tensor in float64 (what the proof compares here)."""
    model.eval()
    with torch.no_grad():
        return [[t.detach().double() for t in output_tensors(call(model, x))] for x in examples]


def max_diff(a, b):
    return max(float((x - y).abs().max()) for xs, ys in zip(a, b) for x, y in zip(xs, ys))


def pruned_in_float64(cls="LlamaForCausalLM", ratio=0.3, seed=0, only_stream=False, **over):
    """(gated, pruned, analysis, keep by group) of a float64 model with random gates, ``ratio`` of
    every group (or of the stream only) pruned."""
    model = tiny(cls, **over).double()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # weights far from their initialisation, so that every channel matters
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) / (p.shape[-1] ** 0.5 if p.ndim > 1 else 1.0)
                    + (1.0 if p.ndim == 1 else 0.0))
    analysis = analyse_model(model, make_inputs(TOKENS, model))
    gated = attach_gates(model, analysis=analysis)
    bank = gated.bmrs_gates.double()
    with torch.no_grad():
        bank.posterior[0].copy_(torch.empty(bank.num_gates, dtype=torch.float64).uniform_(-0.7, 0.0, generator=gen))
        bank.posterior[1].copy_(torch.empty(bank.num_gates, dtype=torch.float64).uniform_(-3.0, -1.0, generator=gen))
        keep = random_masks(bank, ratio, gen)
        if only_stream:
            for i, g in enumerate(bank.groups):
                if g.kind != "stream":
                    keep[bank.slice_of(i)] = True
        bank.mask.copy_(keep.double())
    gated.eval()
    pruned = shrink(analysis, bank, keep)
    return gated, pruned, analysis, group_keep(bank, keep)


def examples(model, seeds=(11, 12)):
    return [make_inputs(TOKENS, model, batch=3, seed=s) for s in seeds]


def test_llama_stream_is_one_group_gated_at_every_writer():
    model = tiny()
    a = analyse_model(model, make_inputs(TOKENS, model))
    stream = stream_of(a)
    assert stream is not None and stream.size == HIDDEN
    writers = ["model.embed_tokens"] + [f"model.layers.{i}.{m}" for i in range(2)
                                         for m in ("self_attn.o_proj", "mlp.down_proj")]
    assert sorted(t.module for t in stream.taps) == sorted(writers)
    assert all(t.side == "out" and (t.index == np.arange(HIDDEN)).all() for t in stream.taps)
    norms = [f"model.layers.{i}.{n}" for i in range(2) for n in ("input_layernorm", "post_attention_layernorm")]
    assert sorted(stream.norms) == sorted(norms + ["model.norm"])
    cut = {s.target: s.dim for s in stream.slots}
    assert cut["model.embed_tokens.weight"] == 1 and cut["lm_head.weight"] == 1
    for i in range(2):
        for reader in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
            assert cut[f"model.layers.{i}.{reader}.weight"] == 1  # input columns
        for writer in ("self_attn.o_proj", "mlp.down_proj"):
            assert cut[f"model.layers.{i}.{writer}.weight"] == 0  # output rows
    # the heads (grouped-query) and FFN groups are still there, gated at their readers' inputs
    kinds = sorted(g.kind for g in a.groups)
    assert kinds == ["heads", "heads", "scale", "scale", "stream"]
    assert all(t.side == "in" for g in a.groups if g.kind != "stream" for t in g.taps)
    assert not [why for _, why in a.propagation.opaque if "stream" in why]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_check_prunes_the_stream_and_proves_it(family):
    model = tiny(FAMILIES[family])
    res = check_model(model, (1, 12), name=family, specs=TOKENS, ratio=0.3)
    assert res.ok, res.stages  # trace, groups, gates, surgery, proof, ONNX export and ORT parity
    assert res.max_abs_diff <= 1e-4 * res.output_scale and res.onnx_max_abs_diff is not None
    assert res.groups == 5 and res.structures == 2 * (2 + 48) + HIDDEN  # heads, FFN per layer; the stream
    assert res.structures_kept == 2 * (1 + 34) + HIDDEN - 10  # 30 % of every group, the stream's 32 too
    # the same counts by hand: 10 of the 32 stream channels are gone, and check's pruned model had
    # exactly this many parameters (with the stream kept it would have more)
    gated, pruned, analysis, keep = pruned_in_float64(FAMILIES[family])
    kept = int(keep[stream_of(analysis).id].sum())
    assert kept == HIDDEN - 10
    assert pruned.get_input_embeddings().weight.shape[1] == kept
    assert pruned.get_output_embeddings().weight.shape[1] == kept
    assert res.params_after == sum(p.numel() for p in pruned.parameters()) < res.params_before
    detach_gates(gated)


@pytest.mark.parametrize("family", ["llama", "qwen3", "phi3"])
def test_gated_equals_pruned_in_float64_and_the_rescale_is_what_makes_it_exact(family):
    gated, pruned, analysis, keep = pruned_in_float64(FAMILIES[family], seed=1)
    xs = examples(pruned)
    ref = run(gated, xs)
    scale = max(float(t.abs().max()) for ts in ref for t in ts)
    diff = max_diff(ref, run(pruned, xs))
    assert diff <= 1e-5 * scale, (diff, scale)  # the models' RMSNorm computes in float32 inside
    # without the rescale (the norms' weight and eps as sliced) the proof fails
    c = HIDDEN
    k = int(keep[stream_of(analysis).id].sum())
    plain = copy.deepcopy(pruned)
    for name in stream_of(analysis).norms:
        norm = plain.get_submodule(name)
        with torch.no_grad():
            norm.weight.div_((c / k) ** 0.5)
        norm.variance_epsilon = norm.variance_epsilon * k / c
    norm.variance_epsilon = 0.5  # a visible eps in the last norm too
    assert max_diff(ref, run(plain, xs)) > 1e-3 * scale
    detach_gates(gated)


def test_pruned_model_runs_its_own_forward_at_the_new_width():
    gated, pruned, analysis, keep = pruned_in_float64("Phi3ForCausalLM", seed=2)
    k = int(keep[stream_of(analysis).id].sum())
    assert k < HIDDEN
    eps = tiny("Phi3ForCausalLM").config.rms_norm_eps
    assert type(pruned).__name__ == "Phi3ForCausalLM" and pruned.config.hidden_size == k
    for name in stream_of(analysis).norms:
        norm = pruned.get_submodule(name)
        assert norm.weight.shape == (k,) and norm.variance_epsilon == pytest.approx(eps * HIDDEN / k)
    for layer in pruned.model.layers:
        assert layer.hidden_size == k and layer.mlp.gate_up_proj.in_features == k
        assert layer.self_attn.qkv_proj.in_features == k and layer.self_attn.o_proj.out_features == k
        assert layer.self_attn.head_dim == 8  # head_dim and RoPE untouched
    # another batch size and sequence length than the proof's
    ids = torch.randint(1, 50, (2, 7))
    out = pruned(input_ids=ids, attention_mask=torch.ones_like(ids))
    assert out.logits.shape == (2, 7, 50) and torch.isfinite(out.logits).all()
    detach_gates(gated)


def test_recipe_replays_the_stream_cut_and_the_rescale(tmp_path):
    gated, pruned, analysis, keep = pruned_in_float64("Qwen2ForCausalLM", seed=3)
    save_recipe(pruned, make_recipe(analysis, keep), tmp_path / "r")
    fresh = apply_recipe(tiny("Qwen2ForCausalLM").double(), tmp_path / "r")
    xs = examples(pruned)
    assert max_diff(run(pruned, xs), run(fresh, xs)) == 0.0
    for name in stream_of(analysis).norms:  # eps is an attribute, not a weight: the replay sets it
        assert fresh.get_submodule(name).variance_epsilon == pruned.get_submodule(name).variance_epsilon
    assert fresh.config.hidden_size == pruned.config.hidden_size < HIDDEN
    detach_gates(gated)


def test_from_pretrained_reloads_a_pruned_stream(tmp_path):
    from transformers import AutoModelForCausalLM

    gated, pruned, analysis, keep = pruned_in_float64("LlamaForCausalLM", seed=4, only_stream=True)
    why = save_pretrained(pruned, tmp_path / "p")  # 22 channels: not a multiple of the 4 heads
    assert why is not None and "apply_recipe" in why and not (tmp_path / "p").exists()
    detach_gates(gated)
    gated, pruned, analysis, keep = pruned_in_float64("LlamaForCausalLM", ratio=0.25, seed=4, only_stream=True)
    assert pruned.config.hidden_size == 24
    assert save_pretrained(pruned, tmp_path / "p") is None
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "p"), dtype=torch.float64).eval()
    xs = examples(pruned)
    assert max_diff(run(pruned, xs), run(loaded, xs)) == 0.0
    detach_gates(gated)


def test_qwen3_head_norms_share_the_config_eps_so_from_pretrained_refuses(tmp_path):
    gated, pruned, _, _ = pruned_in_float64("Qwen3ForCausalLM", seed=5, only_stream=True)
    why = save_pretrained(pruned, tmp_path / "q")
    assert why is not None and "apply_recipe" in why and not (tmp_path / "q").exists()
    detach_gates(gated)


def test_rmsnorm_forms_are_checked_on_the_module_not_taken_from_the_name():
    from transformers.models.bert.modeling_bert import BertModel  # noqa: F401 - LayerNorm models: nn.LayerNorm
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    assert stream_form(LlamaRMSNorm(16)) == "scale"
    assert stream_form(GemmaRMSNorm(16)) == "offset"  # (1 + w): 1 + w' = (1 + w) sqrt(C/C')

    class FakeRMSNorm(torch.nn.Module):  # named like one, but subtracts the mean (a LayerNorm)
        def __init__(self, n):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(n))
            self.eps = 1e-6

        def forward(self, x):
            x = x - x.mean(-1, keepdim=True)
            return self.weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    assert stream_form(FakeRMSNorm(16)) is None


def test_layernorm_model_keeps_its_stream_and_says_why():
    model = load_spec("hf:BertConfig:hidden_size=32,num_attention_heads=4,intermediate_size=48,vocab_size=50")
    a = analyse_model(model, make_inputs(TOKENS, model))
    assert stream_of(a) is None and len(a.groups) == 4  # heads and FFN per layer, nothing on the stream
    assert not any(s.target.startswith("embeddings.") for g in a.groups for s in g.slots)
    assert any("LayerNorm normalises over channels" in why for _, why in a.propagation.opaque)


def test_stream_kept_with_a_reason_when_it_is_the_output_or_tied():
    base = tiny("LlamaConfig")  # the base model: its output is the stream itself
    a = analyse_model(base, make_inputs(TOKENS, base))
    assert stream_of(a) is None
    assert any("reaches the model's output" in why for _, why in a.propagation.opaque)
    tied = tiny("LlamaConfig", tie_word_embeddings=True)  # tied, but no output layer reads a norm here
    a = analyse_model(tied, make_inputs(TOKENS, tied))
    assert stream_of(a) is None


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_tied_embeddings_prune_the_stream_and_the_last_norm_divides_out_the_gates(family, monkeypatch, tmp_path):
    """The embedding's E[theta], folded into its columns, also scales the tied output layer's input
    columns; dividing the last norm (which only the output layer reads) by it undoes that exactly.
    The pruned model keeps the tie, and from_pretrained gives it back (Gemma: its embedding scale
    follows the new hidden size). Without the division the proof fails."""
    from transformers import AutoModelForCausalLM

    model = tiny(FAMILIES[family], tie_word_embeddings=True)
    stream = stream_of(analyse_model(model, make_inputs(TOKENS, model)))
    assert stream is not None and ("model.norm", "divide") in [(t.module, t.side) for t in stream.taps]
    assert "model.norm" not in stream.consumers
    res = check_model(model, (1, 12), name=family, specs=TOKENS, ratio=0.3)
    assert res.ok, res.stages
    gated, pruned, analysis, keep = pruned_in_float64(FAMILIES[family], ratio=0.25, seed=4, only_stream=True,
                                                      tie_word_embeddings=True)
    assert pruned.config.hidden_size == 24 and pruned.lm_head.weight is pruned.model.embed_tokens.weight
    xs = examples(pruned)
    ref = run(gated, xs)
    scale = max(float(t.abs().max()) for ts in ref for t in ts)
    assert max_diff(ref, run(pruned, xs)) <= 1e-5 * scale
    assert save_pretrained(pruned, tmp_path / "p") is None
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "p"), dtype=torch.float64).eval()
    assert max_diff(run(pruned, xs), run(loaded, xs)) <= 1e-12 * scale
    detach_gates(gated)
    from bmrs_surgery.graph.rules import transformers_layers

    monkeypatch.setattr(transformers_layers, "divide", lambda mod, expected: None)
    broken = check_model(tiny(FAMILIES[family], tie_word_embeddings=True), (1, 12), specs=TOKENS, ratio=0.3)
    assert not broken.ok


def test_gemma_scaled_embedding_is_the_streams_first_writer():
    """Gemma's embedding multiplies the rows it looks up by sqrt(hidden size) in a forward of its
    own; its output is still linear in each column, so it is one call and a gate on its output
    folds into its columns (the stream is pruned in test_check_prunes_the_stream_and_proves_it)."""
    gemma = tiny("GemmaForCausalLM")
    stream = stream_of(analyse_model(gemma, make_inputs(TOKENS, gemma)))
    assert stream is not None and stream.size == HIDDEN
    assert "model.embed_tokens" in [t.module for t in stream.taps if t.side == "out"]
    # the analysis leaves the model as it was: the scale stays a buffer that is not saved
    assert gemma.model.embed_tokens._non_persistent_buffers_set == {"embed_scale"}


@pytest.mark.parametrize("noise", ["sample", "element"])
def test_stream_gates_on_the_writers_outputs_train(noise):
    model = tiny()
    a = analyse_model(model, make_inputs(TOKENS, model))
    gated = attach_gates(model, analysis=a, noise=noise)
    stream = next(i for i, g in enumerate(gated.bmrs_gates.groups) if g.kind == "stream")
    gated.train()
    out = call(gated, make_inputs(TOKENS, model, batch=2, seed=3))
    out.logits.square().mean().backward()
    grad = gated.bmrs_gates.posterior.grad[:, gated.bmrs_gates.slice_of(stream)]
    assert torch.isfinite(grad).all() and (grad[0] != 0).all()  # every stream gate's mean gets a gradient
    # gates off: the writers' hooks are gone, and the model computes what it did before gating
    plain = detach_gates(gated)
    assert not any(m._forward_hooks for m in plain.modules())


@pytest.mark.slow
def test_compress_a_gated_causal_lm_cuts_its_hidden_size(tmp_path):
    """The whole job on a gated LlamaForCausalLM with named inputs: the stream's gates with dF >= 0
    go, the proof and ONNX pass, and pruned.pt is the narrower model with its norms rescaled."""
    import json

    from test_cli import invoke, ok

    model = tiny()
    gated = attach_gates(model, analysis=analyse_model(model, make_inputs(TOKENS, model), tracer="export"))
    bank = gated.bmrs_gates
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # as if fitted: a few structures of every group at dF >= 0
        bank.posterior[0].copy_(torch.linspace(-6, 0.5, bank.num_gates)[torch.randperm(bank.num_gates, generator=gen)])
        bank.posterior[1].fill_(-2.0)
    torch.save(gated, tmp_path / "gated.pt")
    out = tmp_path / "out"
    ok(invoke(tmp_path / "gated.pt", "--trust-model", "--input", "input_ids:int64:1x12", "--input",
              "attention_mask:int64:1x12", "--bench-batch-sizes", "1", "--out", out, "--quiet"))
    doc = json.loads((out / "report.json").read_text())
    assert doc["surgery"]["proof"]["ok"]
    pruned = torch.load(out / "pruned.pt", weights_only=False)
    k = pruned.config.hidden_size
    assert k < HIDDEN and pruned.model.norm.weight.shape == (k,)
    assert pruned.model.norm.variance_epsilon == pytest.approx(SIZES.get("rms_norm_eps", 1e-6) * HIDDEN / k)
