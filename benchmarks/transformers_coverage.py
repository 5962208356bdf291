"""Coverage of Hugging Face transformers families (issue 16, item 7): each small random model
(2 layers, from its transformers config class, see ``bmrs_surgery.hf.SMALL``) through
``bmrs-compress check`` (torch.export capture, groups, random 30 % surgery, proof, ONNX, ORT
parity), and Torch-Pruning on the same model side by side (its transformer recipe: L2 magnitude,
``num_heads`` given for every q/k/v projection, the output head and pooler ignored, 30 % of heads
and FFN channels; the pruned model must still run its forward at the same output shape).

    python benchmarks/transformers_coverage.py [--only NAME ...] [--tp-timeout 60]

Each family's row goes to benchmarks/results/transformers_coverage/rows/NAME.json (families can
be run one at a time, each well under a minute); cpu.json and cpu.md are rebuilt from every row.
Torch-Pruning runs in a child process with a time limit (it hangs on some of these models).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import traceback
from pathlib import Path

import torch

from bmrs_surgery.check import check_model
from bmrs_surgery.hf import load_spec, update_size_attributes
from bmrs_surgery.inputs import InputSpec, make_inputs

TOKENS = [InputSpec("input_ids", torch.int64, (1, 16)), InputSpec("attention_mask", torch.int64, (1, 16))]
IMAGE = [InputSpec("pixel_values", torch.float32, (1, 3, 32, 32))]
T5 = TOKENS + [InputSpec("decoder_input_ids", torch.int64, (1, 8))]
FAMILIES = [
    ("BERT", "hf:BertConfig", TOKENS), ("DistilBERT", "hf:DistilBertConfig", TOKENS),
    ("RoBERTa", "hf:RobertaConfig", TOKENS), ("GPT-2", "hf:GPT2Config", TOKENS),
    ("Llama (GQA 4q/2kv)", "hf:LlamaConfig", TOKENS), ("Mistral (GQA)", "hf:MistralConfig", TOKENS),
    ("Qwen2 (GQA)", "hf:Qwen2Config", TOKENS), ("Qwen3 (GQA)", "hf:Qwen3Config", TOKENS),
    ("Phi-3 (GQA)", "hf:Phi3Config", TOKENS), ("Gemma (GQA)", "hf:GemmaConfig", TOKENS),
    ("ViT", "hf:ViTConfig", IMAGE), ("Swin", "hf:SwinConfig", IMAGE), ("T5 (stretch)", "hf:T5Config", T5),
    # with a language-model head the residual stream is no longer the output: its width (the hidden
    # size) is pruned under RMSNorm (issue 16, item 4); Gemma ties its embeddings, so it keeps it
    ("LlamaForCausalLM", "hf:LlamaForCausalLM", TOKENS), ("MistralForCausalLM", "hf:MistralForCausalLM", TOKENS),
    ("Qwen2ForCausalLM", "hf:Qwen2ForCausalLM", TOKENS), ("Qwen3ForCausalLM", "hf:Qwen3ForCausalLM", TOKENS),
    ("Phi3ForCausalLM", "hf:Phi3ForCausalLM", TOKENS), ("GemmaForCausalLM", "hf:GemmaForCausalLM", TOKENS),
]
OUT = Path(__file__).parent / "results" / "transformers_coverage"


def bmrs_row(spec, specs):
    t = time.perf_counter()
    try:
        model = load_spec(spec)
    except Exception as exc:  # noqa: BLE001
        return {"ok": False, "failed": "load", "error": str(exc).splitlines()[0]}
    res = check_model(model, specs[0].shape, name=spec, specs=specs, ratio=0.3)
    from bmrs_surgery.graph.export_trace import analyse_model

    kinds, hidden = [], None
    if res.stages.get("groups") == "ok":
        a = analyse_model(model, make_inputs(specs, model))
        kinds = sorted({g.kind for g in a.groups})
        stream = next((g for g in a.groups if g.kind == "stream"), None)
        if stream is not None:  # the stream width before -> after check's random 30 %
            hidden = [stream.size, stream.size - min(int(round(0.3 * stream.size)), stream.size - 1)]
    failed = next((s for s, v in res.stages.items() if v != "ok"), None)
    return {"ok": res.ok, "failed": failed, "error": res.stages.get(failed) if failed else None,
            "groups": res.groups, "structures": res.structures, "kept": res.structures_kept, "kinds": kinds,
            "params_before": res.params_before, "params_after": res.params_after,
            "hidden": hidden,
            "max_abs_diff": res.max_abs_diff, "onnx_max_abs_diff": res.onnx_max_abs_diff,
            "seconds": round(time.perf_counter() - t, 1)}


def _heads_of(model):
    """Torch-Pruning's num_heads: every q/k/v projection -> its module's head count."""
    out = {}
    for _, mod in model.named_modules():
        count = next((getattr(mod, a) for a in ("num_heads", "num_attention_heads", "n_head", "n_heads")
                      if isinstance(getattr(mod, a, None), int)), None)
        kv = getattr(mod, "num_key_value_heads", None)
        if count is None:
            hd = getattr(mod, "head_dim", None)
            q = getattr(mod, "q_proj", None)
            if isinstance(hd, int) and isinstance(q, torch.nn.Linear):
                count = q.out_features // hd
                k = getattr(mod, "k_proj", None)
                kv = k.out_features // hd if isinstance(k, torch.nn.Linear) else None
        if count is None:
            continue
        for name in ("query", "key", "value", "q_proj", "k_proj", "v_proj", "q_lin", "k_lin", "v_lin", "q", "k", "v"):
            child = getattr(mod, name, None)
            if isinstance(child, torch.nn.Linear):
                out[child] = kv if (kv and name in ("key", "value", "k_proj", "v_proj", "k", "v")) else count
    return out


def tp_row(spec, specs):
    import torch_pruning as tp

    t = time.perf_counter()
    try:
        model = load_spec(spec)
    except Exception as exc:  # noqa: BLE001
        return {"ok": False, "error": str(exc).splitlines()[0]}
    example = make_inputs(specs, model, batch=1)
    with torch.no_grad():
        ref = model(**example)
    ref = next(iter(ref.values())) if isinstance(ref, dict) else ref[0]
    before = sum(p.numel() for p in model.parameters())
    ignored = [m for n, m in model.named_modules() if n.endswith(("pooler.dense", "lm_head", "classifier"))]
    emb = [m for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    hidden = emb[0].weight.shape[1] if emb else None
    try:
        pruner = tp.pruner.MetaPruner(
            model, example, importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=0.3,
            num_heads=_heads_of(model), prune_head_dims=False, prune_num_heads=True, head_pruning_ratio=0.3,
            ignored_layers=ignored + emb, global_pruning=False)
        for g in pruner.step(interactive=True):
            g.prune()
        update_size_attributes(model)
        for mod in model.modules():  # what TP's examples do after pruning heads
            if hasattr(mod, "num_key_value_groups") and hasattr(mod, "head_dim"):
                q, k = getattr(mod, "q_proj", None), getattr(mod, "k_proj", None)
                if isinstance(q, torch.nn.Linear) and isinstance(k, torch.nn.Linear):
                    mod.num_key_value_groups = q.out_features // k.out_features
        with torch.no_grad():
            out = model(**make_inputs(specs, model, batch=2, seed=1))
        out = next(iter(out.values())) if isinstance(out, dict) else out[0]
        shape_ok = tuple(out.shape[1:]) == tuple(ref.shape[1:])
    except Exception as exc:  # noqa: BLE001 - report, never crash
        return {"ok": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200],
                "trace": traceback.format_exc().splitlines()[-3:]}
    after = sum(p.numel() for p in model.parameters())
    hidden_kept = not emb or emb[0].weight.shape[1] == hidden
    return {"ok": bool(shape_ok), "params_before": before, "params_after": after, "output_shape_same": shape_ok,
            "hidden_kept": hidden_kept, "seconds": round(time.perf_counter() - t, 1),
            "note": "runs; no equivalence proof (Torch-Pruning removes weights without one)"}


def _tp_child(spec, specs, queue):
    queue.put(tp_row(spec, specs))


def tp_limited(spec, specs, timeout: float):
    """Torch-Pruning in a child process, killed after ``timeout`` seconds."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # a forked child deadlocks in OpenMP
    queue = ctx.Queue()
    proc = ctx.Process(target=_tp_child, args=(spec, specs, queue))
    proc.start()
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join()
        return {"ok": False, "error": f"did not finish in {timeout:g} s (killed)"}
    return queue.get() if not queue.empty() else {"ok": False, "error": f"child exited with {proc.exitcode}"}


def _g(x) -> str:
    return "-" if x is None else f"{x:.2g}"


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--no-tp", action="store_true")
    ap.add_argument("--tp-timeout", type=float, default=60.0)
    args = ap.parse_args()
    torch.manual_seed(0)
    (OUT / "rows").mkdir(parents=True, exist_ok=True)
    for name, spec, specs in FAMILIES:
        if args.only and not any(name.lower().startswith(o.lower()) for o in args.only):
            continue
        row = {"family": name, "spec": spec, "inputs": [str(s) for s in specs], "bmrs": bmrs_row(spec, specs)}
        if not args.no_tp:
            row["torch_pruning"] = tp_limited(spec, specs, args.tp_timeout)
        print(json.dumps(row), flush=True)
        (OUT / "rows" / f"{_slug(name)}.json").write_text(json.dumps(row, indent=1) + "\n")
    import transformers

    rows = [json.loads(p.read_text()) for p in sorted((OUT / "rows").glob("*.json"))]
    order = [f[0] for f in FAMILIES]
    rows.sort(key=lambda r: order.index(r["family"]) if r["family"] in order else len(order))
    meta = {"command": "for f in bert distil roberta gpt llama mistral qwen2 qwen3 phi gemma vit swin t5; do "
                       "python benchmarks/transformers_coverage.py --only $f --tp-timeout 60; done; "
                       "python benchmarks/transformers_coverage.py --tp-timeout 120 --only llamafor mistralfor qwen2for "
                       "qwen3for phi3for gemmafor", "torch": torch.__version__,
            "transformers": transformers.__version__, "machine": platform.machine(), "rows": rows}
    (OUT / "cpu.json").write_text(json.dumps(meta, indent=1) + "\n")
    lines = ["| family | bmrs check | prunes | groups | params before -> after | proof max abs diff | ONNX/ORT diff "
             "| Torch-Pruning |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b, t = r["bmrs"], r.get("torch_pruning", {})
        status = "PASS" if b["ok"] else f"FAIL at {b.get('failed')}: {b.get('error')}"
        kinds = b.get("kinds") or []
        prunes = " + ".join((["heads"] if "heads" in kinds else []) + (["FFN"] if set(kinds) - {"heads", "stream"} else [])
                            + ([f"hidden {b['hidden'][0]}->{b['hidden'][1]}" if b.get("hidden") else "hidden"]
                               if "stream" in kinds else [])) or "-"
        params = f"{b.get('params_before', 0):,} -> {b['params_after']:,}" if b.get("params_after") else "-"
        if t.get("ok"):
            tps = f"runs, {t['params_before']:,} -> {t['params_after']:,}"
            if t["params_after"] == t["params_before"]:
                tps += " (nothing pruned)"
        elif t.get("output_shape_same") is False:
            tps = f"runs, {t['params_before']:,} -> {t['params_after']:,}, but the output width changed (hidden size cut)"
        elif not t:
            tps = "not run (--no-tp)"
        else:
            tps = f"fails: {t.get('error', 'not run')}"
        lines.append(f"| {r['family']} | {status} | {prunes} | {b.get('groups', '-')} | {params} | "
                     f"{_g(b.get('max_abs_diff'))} | {_g(b.get('onnx_max_abs_diff'))} | {tps} |")
    (OUT / "cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
