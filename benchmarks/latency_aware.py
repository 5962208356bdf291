"""--round-to auto against fixed rounding and Torch-Pruning, at matched MACs, in ONNX Runtime on CPU.

    flock /tmp/bmrs-heavy.lock python benchmarks/latency_aware.py \
        [--models torchvision:resnet18,torchvision:mobilenet_v2,torchvision:efficientnet_b0]

For each model, one keep-mask (random within each group, seeded; what is measured is how widths
turn MACs into time, not accuracy) is deployed three ways by the library's own path (analysis,
surgery, proof): exact widths, widths rounded up to a multiple of 8, and widths chosen by measured
latency (``latency_table.round_auto``, the ``--round-to auto`` of ``bmrs-compress``). The per-group
share pruned is chosen so the round-to-8 network has about half the original MACs. Torch-Pruning's
MagnitudePruner (L2 magnitude, per layer, ``round_to=8``, classifier kept) is then bisected on its
pruning ratio to the MACs of the auto network. All five ONNX files (original and four pruned) are
timed interleaved in ONNX Runtime worker processes at batch 1 and 32. Goal: latency ratio / MACs
ratio <= 1.0 for auto on every model. Writes benchmarks/results/latency_aware/cpu.{json,md} and the
layer timings it measured (latency_table.json, reused by a later run on the same machine).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

import bmrs_surgery as bmrs
from bmrs_surgery.bench import benchmark
from bmrs_surgery.check import random_masks
from bmrs_surgery.deploy import count, plain_network
from bmrs_surgery.export import onnx_bytes, ort_parity
from bmrs_surgery.latency_table import LatencyTable, round_auto
from bmrs_surgery.loading import build_arch
from bmrs_surgery.plan import plan_keep
from bmrs_surgery.surgery import shrink
from bmrs_surgery.verify import prove, random_inputs

RESULTS = Path(__file__).resolve().parent / "results" / "latency_aware"
BATCHES = (1, 32)


def deploy_keep(gated, keep, shape):
    bank = gated.bmrs_gates
    with torch.no_grad():
        bank.mask.copy_(keep.float())
    gated.eval()
    pruned = shrink(gated.analysis, bank, keep)
    proof = prove(gated, pruned, random_inputs(shape))
    assert proof.ok, proof
    return pruned


def ours(spec: str, seed: int, table: LatencyTable, target: float = 0.5):
    """(original, {variant: pruned network}, shape, share pruned per group, widths chosen)."""
    torch.manual_seed(seed)
    net, shape = build_arch(spec)
    shape = (1,) + tuple(shape)
    gated = bmrs.attach_gates(net.eval(), torch.randn(shape))
    bank = gated.bmrs_gates
    example = torch.randn(shape)
    macs0, _ = count(plain_network(gated), example)
    best = None
    for ratio in (0.25, 0.3, 0.35, 0.4, 0.45, 0.5):
        raw = plan_keep(bank, random_masks(bank, ratio, torch.Generator().manual_seed(seed)))
        keep8 = plan_keep(bank, raw, round_to=8)
        macs8, _ = count(shrink(gated.analysis, bank, keep8), example)
        if best is None or abs(macs8 / macs0 - target) < abs(best[2] - target):
            best = (ratio, raw, macs8 / macs0)
    ratio, raw, _ = best
    t0 = time.perf_counter()
    keep_auto, choices = round_auto(gated, raw, torch.zeros(raw.shape, dtype=torch.float64), example, table, BATCHES)
    table_s = time.perf_counter() - t0
    variants = {"exact": deploy_keep(gated, raw, shape),
                "round_to_8": deploy_keep(gated, plan_keep(bank, raw, round_to=8), shape),
                "auto": deploy_keep(gated, keep_auto, shape)}
    return plain_network(gated), variants, shape, ratio, choices, table_s


def torch_pruning_at(original, shape, macs_target: float, seed: int):
    """Torch-Pruning MagnitudePruner (round_to=8) bisected on its ratio to ``macs_target``."""
    import torch_pruning as tp

    example = torch.randn(shape)
    macs0, _ = count(original, example)

    def pruned_with(r):
        torch.manual_seed(seed)
        model = copy.deepcopy(original).eval()
        classifier = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1:]
        pruner = tp.pruner.MagnitudePruner(model, example, importance=tp.importance.MagnitudeImportance(p=2),
                                           pruning_ratio=r, ignored_layers=classifier, round_to=8)
        pruner.step()
        return model, count(model, example)[0] / macs0

    lo, hi = 0.0, 0.9
    best = None
    for _ in range(9):
        mid = (lo + hi) / 2
        model, ratio = pruned_with(mid)
        if best is None or abs(ratio - macs_target) < abs(best[1] - macs_target):
            best = (model, ratio, mid)
        if ratio > macs_target:
            lo = mid
        else:
            hi = mid
    return best


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="torchvision:resnet18,torchvision:mobilenet_v2,torchvision:efficientnet_b0")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    table = LatencyTable(args.threads, RESULTS / "latency_table.json")
    rows = []
    for spec in args.models.split(","):
        original, variants, shape, share, choices, table_s = ours(spec, args.seed, table)
        example = torch.randn(shape)
        macs0, params0 = count(original, example)
        counts = {name: count(m, example) for name, m in variants.items()}
        tp_model, tp_ratio, tp_share = torch_pruning_at(original, shape, counts["auto"][0] / macs0, args.seed)
        variants["torch_pruning"] = tp_model
        counts["torch_pruning"] = count(tp_model, example)
        x = torch.randn((2,) + shape[1:])
        names = ["original", *variants]
        with tempfile.TemporaryDirectory() as tmp:
            paths = []
            for name in names:
                model = original if name == "original" else variants[name]
                data, _ = onnx_bytes(model, x)
                ort_parity(model, data, [x])
                paths.append(Path(tmp) / f"{name}.onnx")
                paths[-1].write_bytes(data)
            res = benchmark(paths, BATCHES, threads=args.threads, warmup=5, runs=args.runs, rounds=args.rounds)
        row = {"model": spec, "share_pruned_per_group": share, "torch_pruning_ratio": tp_share,
               "macs_before": macs0, "params_before": params0, "latency_table_seconds": table_s,
               "groups_widened": sum(1 for c in choices.values() if c["chosen"] != c["kept"]),
               "groups": len(choices), "variants": {}}
        orig_ms = {str(b["batch"]): b["median_ms"] for b in res["models"][0]["batches"]}
        for i, name in enumerate(names):
            ms = {str(b["batch"]): b["median_ms"] for b in res["models"][i]["batches"]}
            macs, params = (macs0, params0) if name == "original" else counts[name]
            v = {"macs": macs, "params": params, "macs_ratio": macs / macs0, "latency_ms": ms,
                 "latency_ratio": {k: ms[k] / orig_ms[k] for k in ms}}
            v["latency_over_macs"] = {k: r / v["macs_ratio"] for k, r in v["latency_ratio"].items()}
            row["variants"][name] = v
        row["goal_met"] = all(r <= 1.0 for r in row["variants"]["auto"]["latency_over_macs"].values())
        row["session"] = res["session"]
        rows.append(row)
        print(json.dumps({"model": spec, **{n: v["latency_over_macs"] for n, v in row["variants"].items()}}), flush=True)
        (RESULTS / "latency_table.json").write_bytes(table.to_bytes())
    command = " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])
    meta = {"command": f"flock /tmp/bmrs-heavy.lock python {command}", "date": datetime.date.today().isoformat(),
            "torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
            "machine": table.tag, "batches": list(BATCHES)}
    (RESULTS / "cpu.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = ["# Latency-aware widths (--round-to auto) vs round-to-8 and Torch-Pruning, matched MACs", "",
             f"{meta['cpus']} CPU cores ({table.tag['cpu']}), {meta['date']}, onnxruntime {table.tag['onnxruntime']}, "
             "ORT_ENABLE_ALL, all five networks timed interleaved in worker processes. Ratio = pruned / original; "
             "goal: latency ratio / MACs ratio <= 1.0 for auto at batch 1 and 32.", "",
             f"Command: `{meta['command']}`", "",
             "| model | variant | MACs ratio | latency ratio b1 | latency ratio b32 | latency/MACs b1 | latency/MACs b32 |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        for name, v in r["variants"].items():
            if name == "original":
                continue
            lr, lm = v["latency_ratio"], v["latency_over_macs"]
            lines.append(f"| {r['model']} | {name} | {v['macs_ratio']:.3f} | {lr['1']:.3f} | {lr['32']:.3f} | "
                         f"{lm['1']:.2f} | {lm['32']:.2f} |")
    lines.append("")
    for r in rows:
        lines.append(f"* {r['model']}: goal {'met' if r['goal_met'] else 'missed'}; {r['groups_widened']} of "
                     f"{r['groups']} groups widened by auto; layer timings took {r['latency_table_seconds']:.0f} s; "
                     f"original {r['variants']['original']['latency_ms']['1']:.2f} ms (b1), "
                     f"{r['variants']['original']['latency_ms']['32']:.1f} ms (b32).")
    (RESULTS / "cpu.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
