"""Which KL weighting (and gate learning rate) to default to: measured on Fashion-MNIST.

Runs the paper's MLP and LeNet5 in continuous mode for each combination of KL weighting
("mean": mean KL over structures, the authors' code; "elbo": summed KL / training-set size) and
gate learning rate, several seeds, one process per run (one thread each), and reports test accuracy
and parameter compression for BMRS_N, BMRS_U-8 and BMRS_U-4 decisions on the final posteriors.

    python benchmarks/kl_weighting.py --epochs 20 --finetune 5 --seeds 2 --jobs 16 \
        --out benchmarks/results/kl_weighting/cpu
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor

PAPER = {"mlp": {"batch_size": 128, "lr": 1.5e-3}, "lenet5": {"batch_size": 32, "lr": 1.4e-3}}


def run_one(job: dict) -> dict:
    import torch

    torch.set_num_threads(1)
    import bmrs_surgery as bmrs
    from bmrs_surgery.data import load_data
    from bmrs_surgery.fit import FitConfig, accuracy, fit
    from models import get_model

    data = load_data("fashion-mnist", seed=job["seed"], limit=job.get("limit"))
    torch.manual_seed(job["seed"])
    gated = bmrs.attach_gates(get_model(job["model"]), data.train.tensors[0][:2])
    cfg = FitConfig(
        epochs=job["epochs"], finetune_epochs=job["finetune"], mode="continuous", prior="uniform",
        precision_bits=8, kl_weighting=job["kl"], seed=job["seed"],
        gate_lr=job["gate_lr_factor"] * PAPER[job["model"]]["lr"], lr_schedule="constant", **PAPER[job["model"]],
    )
    t0 = time.perf_counter()
    fit(gated, data, cfg)
    out = dict(job, seconds=time.perf_counter() - t0)
    bmrs.unmask(gated)
    out["accuracy_unpruned"] = accuracy(gated, data.test)
    for name, prior, bits in (("bmrs_n", "normal", 8), ("bmrs_u8", "uniform", 8), ("bmrs_u4", "uniform", 4)):
        res = bmrs.prune(gated, prior, bits)
        out[name] = {"compression": res.compression, "accuracy": accuracy(gated, data.test)}
    return out


def summarise(results: list[dict]) -> list[dict]:
    rows = []
    key = lambda r: (r["model"], r["kl"], r["gate_lr_factor"])  # noqa: E731
    for k, group in itertools.groupby(sorted(results, key=key), key=key):
        group = list(group)
        row = {"model": k[0], "kl": k[1], "gate_lr_factor": k[2], "runs": len(group)}
        for crit in ("bmrs_n", "bmrs_u8", "bmrs_u4"):
            for m in ("compression", "accuracy"):
                vals = [g[crit][m] * 100 for g in group]
                row[f"{crit}_{m}"] = (statistics.mean(vals), statistics.pstdev(vals))
        rows.append(row)
    return rows


def markdown(rows: list[dict], command: str) -> str:
    lines = [
        "# KL weighting and gate learning rate (Fashion-MNIST, continuous pruning, BMRS_U-8 masks)",
        "",
        f"Command: `{command}`",
        "",
        "| model | KL | gate lr | runs | BMRS_N compr. % | BMRS_N acc. % | BMRS_U-8 compr. % | "
        "BMRS_U-8 acc. % | BMRS_U-4 compr. % | BMRS_U-4 acc. % |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [r["model"], r["kl"], f"{r['gate_lr_factor']:g}x lr", str(r["runs"])]
        for crit in ("bmrs_n", "bmrs_u8", "bmrs_u4"):
            for m in ("compression", "accuracy"):
                mean, sd = r[f"{crit}_{m}"]
                cells.append(f"{mean:.2f} ± {sd:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mlp,lenet5")
    ap.add_argument("--kl", default="mean,elbo")
    ap.add_argument("--gate-lr-factors", default="1,10")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--finetune", type=int, default=5)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--limit", type=int, default=None, help="training examples (for a quick look)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    args = ap.parse_args()
    jobs = [
        {"model": m, "kl": k, "gate_lr_factor": float(f), "seed": s, "epochs": args.epochs,
         "finetune": args.finetune, "limit": args.limit}
        for m in args.models.split(",") for k in args.kl.split(",")
        for f in args.gate_lr_factors.split(",") for s in range(args.seeds)
    ]
    with ProcessPoolExecutor(args.jobs) as pool:
        results = list(pool.map(run_one, jobs))
    rows = summarise(results)
    command = "python " + " ".join(sys.argv)
    md = markdown(rows, command)
    print(md)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out + ".json", "w") as f:
            json.dump({"command": command, "runs": results, "summary": rows}, f, indent=2)
        with open(args.out + ".md", "w") as f:
            f.write(md)


if __name__ == "__main__":
    main()
