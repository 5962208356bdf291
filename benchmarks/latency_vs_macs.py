"""ONNX Runtime CPU latency of pruned vs original networks, against their MACs ratio.

    python benchmarks/latency_vs_macs.py [--models lenet5,torchvision:resnet18,torchvision:mobilenet_v2]

Each model is pruned to about half its MACs through the library's own path (dependency analysis,
gates, keep-masks, surgery with round_to=8, proof), exported to ONNX, and the original and pruned
files are timed interleaved in ONNX Runtime worker processes (no torch loaded there) at batch 32.
Target: latency ratio <= 1.25 x MACs ratio. Keep-masks are random (seeded) within each group:
what is measured is how well the pruned graph turns fewer MACs into less time, not accuracy.
Writes benchmarks/results/latency_vs_macs/cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch

import bmrs_surgery as bmrs
from bmrs_surgery.bench import benchmark
from bmrs_surgery.check import random_masks
from bmrs_surgery.deploy import count, plain_network
from bmrs_surgery.export import onnx_bytes, ort_parity
from bmrs_surgery.loading import build_arch
from bmrs_surgery.plan import plan_keep
from bmrs_surgery.surgery import shrink
from bmrs_surgery.verify import prove, random_inputs

RESULTS = Path(__file__).resolve().parent / "results" / "latency_vs_macs"


def prune_to_half(spec: str, seed: int, target: float = 0.5):
    net, shape = build_arch(spec)
    shape = (1,) + tuple(shape)
    gated = bmrs.attach_gates(net.eval(), torch.randn(shape))
    bank = gated.bmrs_gates
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bank.posterior[0].uniform_(-0.7, 0.0, generator=gen)
        bank.posterior[1].uniform_(-3, -1, generator=gen)
    example = torch.randn(shape)
    macs0, _ = count(plain_network(gated), example)
    best = None
    for ratio in (0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5):
        keep = plan_keep(bank, random_masks(bank, ratio, torch.Generator().manual_seed(seed)), round_to=8)
        with torch.no_grad():
            bank.mask.copy_(keep.float())
        gated.eval()
        pruned = shrink(gated.analysis, bank, keep)
        macs1, _ = count(pruned, example)
        if best is None or abs(macs1 / macs0 - target) < abs(best[2] / macs0 - target):
            best = (ratio, keep, macs1, pruned)
    ratio, keep, macs1, pruned = best
    with torch.no_grad():
        bank.mask.copy_(keep.float())
    proof = prove(gated, pruned, random_inputs(shape))
    assert proof.ok, proof
    return plain_network(gated), pruned, shape, ratio, macs0, macs1


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="lenet5,torchvision:resnet18,torchvision:mobilenet_v2")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--runs", type=int, default=60)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rows = []
    for spec in args.models.split(","):
        original, pruned, shape, ratio, macs0, macs1 = prune_to_half(spec, args.seed)
        x = torch.randn((2,) + shape[1:])
        with tempfile.TemporaryDirectory() as tmp:
            a, b = Path(tmp) / "original.onnx", Path(tmp) / "pruned.onnx"
            a.write_bytes(onnx_bytes(original, x)[0])
            data, exporter = onnx_bytes(pruned, x)
            b.write_bytes(data)
            ort_parity(pruned, data, [x])
            res = benchmark([a, b], (args.batch,), threads=args.threads, warmup=5, runs=args.runs, rounds=6)
        lat = res["ratios_vs_first"][0]["batches"][0]["median_ratio"]
        macs_ratio = macs1 / macs0
        row = {"model": spec, "random_prune_ratio_per_group": ratio, "round_to": 8, "macs_before": macs0,
               "macs_after": macs1, "macs_ratio": macs_ratio, "latency_ms_original": res["models"][0]["batches"][0]["median_ms"],
               "latency_ms_pruned": res["models"][1]["batches"][0]["median_ms"], "latency_ratio": lat,
               "latency_over_macs": lat / macs_ratio, "target_met": lat <= 1.25 * macs_ratio,
               "params_before": sum(q.numel() for q in original.parameters()),
               "params_after": sum(q.numel() for q in pruned.parameters()), "session": res["session"]}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "session"}), flush=True)
    meta = {"command": " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]), "date": datetime.date.today().isoformat(),
            "torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
            "machine": platform.machine(), "batch": args.batch}
    RESULTS.mkdir(parents=True, exist_ok=True)
    old = RESULTS / "cpu.json"
    if old.exists():  # keep rows of models not re-measured in this run (each row has its command)
        measured = {r["model"] for r in rows}
        for r in rows:
            r["command"] = meta["command"]
        earlier = [r for r in json.loads(old.read_text())["rows"] if r["model"] not in measured]
        rows = earlier + rows
    else:
        for r in rows:
            r["command"] = meta["command"]
    (RESULTS / "cpu.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = ["# ONNX Runtime latency vs MACs (pruned / original)", "",
             f"{meta['cpus']} CPU cores, {meta['date']}, batch {args.batch}, "
             f"onnxruntime {rows[0]['session']['onnxruntime']}, graph optimisation ORT_ENABLE_ALL, interleaved.", "",
             "| model | params before -> after | MACs ratio | latency original ms | latency pruned ms | latency ratio | latency / MACs ratio | target (<= 1.25) | command |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['params_before']:,} -> {r['params_after']:,} | {r['macs_ratio']:.3f} | "
                     f"{r['latency_ms_original']:.3f} | {r['latency_ms_pruned']:.3f} | {r['latency_ratio']:.3f} | "
                     f"{r['latency_over_macs']:.2f} | {'met' if r['target_met'] else 'missed'} | `{r['command']}` |")
    (RESULTS / "cpu.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
