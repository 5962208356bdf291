"""Large models end to end on CPU: time of each stage and peak memory.

    python benchmarks/large_models.py [--models resnet50,vit_b_16] [--fit-steps 3] [--batch 8]

torchvision architectures with weights=None at 224x224: trace + groups, gates, a few fitting
steps (images/s, gated and plain), dF scoring of every gate, surgery (30% of every group removed
at random), equivalence proof, ONNX export and ONNX Runtime parity. Target (issue 7): analysis +
surgery + export under 60 s each on CPU; scoring under 1 s. Writes
benchmarks/results/large_models/cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision

import bmrs_surgery as bmrs
from bmrs_surgery.check import random_masks
from bmrs_surgery.export import onnx_file, ort_parity
from bmrs_surgery.fit import FitConfig, make_optimizer
from bmrs_surgery.surgery import shrink
from bmrs_surgery.verify import prove

RESULTS = Path(__file__).resolve().parent / "results" / "large_models"


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def steps_per_s(model, x, y, opt, steps: int, kl=None) -> float:
    model.train()
    for i in range(steps + 1):
        if i == 1:
            t = time.perf_counter()
        loss = F.cross_entropy(model(x), y) + (kl() if kl else 0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return steps * len(x) / (time.perf_counter() - t)


def run(name: str, fit_steps: int, batch: int) -> dict:
    row = {"model": name}
    net = torchvision.models.get_model(name, weights=None)
    example = torch.randn(1, 3, 224, 224)
    from bmrs_surgery.graph.groups import analyse

    analyse(net, example)  # warm-up: first-call imports and allocator growth are not the analysis
    t = time.perf_counter()
    gated = bmrs.attach_gates(net, example)
    row["analysis_s"] = time.perf_counter() - t
    bank = gated.bmrs_gates
    row["groups"], row["structures"] = len(bank.sites), bank.num_gates
    x, y = torch.randn(batch, 3, 224, 224), torch.randint(0, 1000, (batch,))
    if fit_steps:
        plain = torchvision.models.get_model(name, weights=None)
        row["plain_images_per_s"] = steps_per_s(plain, x, y, torch.optim.Adam(plain.parameters(), 1e-4), fit_steps)
        opt = make_optimizer(gated, FitConfig(lr=1e-4, gate_lr=1e-3))
        row["gated_images_per_s"] = steps_per_s(gated, x, y, opt, fit_steps, lambda: bmrs.kl_term(gated))
        row["gate_overhead"] = row["plain_images_per_s"] / row["gated_images_per_s"]
        del plain
    t = time.perf_counter()
    dec = bmrs.decision(gated, "bmrs_u", precision_bits=8)
    row["scoring_s"] = time.perf_counter() - t
    row["scores_finite"] = bool(torch.isfinite(dec.score).all())
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        bank.mask.copy_(random_masks(bank, 0.3, gen).float())
    gated.eval()
    t = time.perf_counter()
    pruned = shrink(gated.analysis, bank)
    row["surgery_s"] = time.perf_counter() - t
    inputs = [torch.randn(2, 3, 224, 224, generator=gen)]
    t = time.perf_counter()
    proof = prove(gated, pruned, inputs)
    row["proof_s"], row["proof_ok"], row["max_abs_diff"] = time.perf_counter() - t, proof.ok, proof.max_abs_diff
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        row["exporter"] = onnx_file(pruned, inputs[0], Path(tmp) / "m.onnx")
        row["export_s"] = time.perf_counter() - t
        t = time.perf_counter()
        row["onnx_max_abs_diff"] = ort_parity(pruned, str(Path(tmp) / "m.onnx"), inputs)
        row["onnx_parity_s"] = time.perf_counter() - t
    row["params_before"] = sum(p.numel() for p in net.parameters())
    row["params_after"] = sum(p.numel() for p in pruned.parameters())
    row["analysis_surgery_export_s"] = row["analysis_s"] + row["surgery_s"] + row["export_s"]
    row["peak_rss_mb"] = peak_mb()
    return row


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="resnet50,vit_b_16")
    p.add_argument("--fit-steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    args = p.parse_args()
    rows = []
    for name in args.models.split(","):
        row = run(name, args.fit_steps, args.batch)
        print(json.dumps(row), flush=True)
        rows.append(row)
    meta = {"command": " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]), "date": datetime.date.today().isoformat(),
            "torch": torch.__version__, "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "python": platform.python_version(), "note": "peak RSS is the process maximum so far (models run in sequence)"}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "cpu.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = ["# Large models on CPU, stage by stage", "", f"`{meta['command']}` on {meta['cpus']} cores, {meta['date']}", "",
             f"| model | groups | analysis s | scoring s | surgery s | proof s | ONNX export s | analysis+surgery+export s (target < 60) | train images/s plain / gated (batch {args.batch}) | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        thr = f"{r['plain_images_per_s']:.1f} / {r['gated_images_per_s']:.1f}" if "plain_images_per_s" in r else "n/a"
        lines.append(f"| {r['model']} | {r['groups']} | {r['analysis_s']:.2f} | {r['scoring_s']:.3f} | {r['surgery_s']:.2f} | "
                     f"{r['proof_s']:.2f} | {r['export_s']:.1f} | {r['analysis_surgery_export_s']:.1f} | {thr} | {r['peak_rss_mb']:.0f} |")
    (RESULTS / "cpu.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
