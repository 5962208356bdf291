"""Which fine-tuning options should be on by default (issue 18, item 5): ``--distill`` (the original
network's logits as soft targets while fitting and fine-tuning) and ``--lr-schedule cosine``, each
on and off, measured on trained networks with the job's defaults otherwise (``--epochs auto``).

Networks (all trained before compression, as a user's pretrained network is):

- ``lenet5-fmnist``: the bundled LeNet5 trained on Fashion-MNIST, on the bundled 8,000-image sample;
- ``mlp-fmnist``: an MLP 1024-300-100-10 trained here for 10 epochs on the same sample;
- ``mlp-digits``: an MLP 64-512-256-10 trained here for 30 epochs on scikit-learn's digits.

Per network, seed and setting: the test accuracy of the trained network, of the pruned network,
the parameter compression, the optimiser steps, and whether the gates settled. Everything runs
through :func:`bmrs_surgery.compress` (no ONNX benchmark).

    flock /tmp/bmrs-heavy.lock python benchmarks/finetune_options.py --seeds 0,1 \\
        --out benchmarks/results/finetune_options/cpu

Results: ``OUT.json`` (every run) and ``OUT.md`` (the table, means over seeds, with the command).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bmrs_surgery import Job, compress, defaults
from bmrs_surgery.data import load_data
from bmrs_surgery.fit import train_plain

SETTINGS = {
    "constant": {},
    "cosine": {"lr_schedule": "cosine"},
    "distill": {"distill": True},
    "distill+cosine": {"distill": True, "lr_schedule": "cosine"},
}


def mlp(sizes):
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(nn.Flatten(), *layers[:-1])


def networks(folder: Path) -> dict:
    """name -> (model spec for the Job, data spec): trained networks saved as whole-module files."""
    from sklearn.datasets import load_digits

    dg = load_digits()
    digits = folder / "digits_flat.npz"
    np.savez(digits, x=(dg.data / 16.0).astype(np.float32), y=dg.target.astype(np.int64))
    nets = {"lenet5-fmnist": ("lenet5-fmnist", "fashion-mnist-sample")}
    for name, sizes, spec, epochs in (("mlp-fmnist", [1024, 300, 100, 10], "fashion-mnist-sample", 10),
                                      ("mlp-digits", [64, 512, 256, 10], str(digits), 30)):
        data = load_data(spec, seed=0)
        torch.manual_seed(0)
        net = mlp(sizes)
        train_plain(net, data.train, epochs=epochs, batch_size=defaults.BATCH_SIZE, lr=defaults.LR, seed=0)
        path = folder / f"{name}.pt"
        torch.save(net, path)
        nets[name] = (str(path), spec)
    return nets


def run_one(model: str, data: str, setting: dict, seed: int, max_steps: int) -> dict:
    t0 = time.perf_counter()
    res = compress(Job(model=model, data=data, trust_model=model.endswith(".pt"), seed=seed,
                       max_steps=max_steps, bench_batch_sizes=(), **setting))
    totals, fit = res.report["totals"], res.fit
    info = fit.settling or {}
    return {"accuracy_before": totals["accuracy_before"], "accuracy_pruned": totals["accuracy_pruned"],
            "compression": totals["parameter_compression"], "settled": info.get("settled"),
            "steps": info.get("steps"), "seconds": time.perf_counter() - t0}


def table(doc: dict) -> str:
    lines = ["# Fine-tuning options: --distill and --lr-schedule cosine", "", "Commands:", ""]
    lines += [f"    {c}" for c in doc["commands"]] + ["", doc["machine"], "",
              "Means over the seeds run (their number in the seeds column); accuracy change = pruned - trained, test split.", "",
              "| network | setting | seeds | trained accuracy | pruned accuracy | accuracy change | compression "
              "| steps fitted | settled |", "|---|---|---|---|---|---|---|---|---|"]
    by: dict[tuple, list] = {}
    for key, r in doc["runs"].items():
        name, setting, _ = key.split("/")
        by.setdefault((name, setting), []).append(r)
    for (name, setting), rs in by.items():
        m = {k: float(np.mean([r[k] for r in rs])) for k in ("accuracy_before", "accuracy_pruned", "compression", "steps")}
        lines.append(f"| {name} | {setting} | {len(rs)} | {100 * m['accuracy_before']:.2f}% | "
                     f"{100 * m['accuracy_pruned']:.2f}% | {100 * (m['accuracy_pruned'] - m['accuracy_before']):+.2f} | "
                     f"{100 * m['compression']:.1f}% | {m['steps']:.0f} | "
                     f"{sum(bool(r['settled']) for r in rs)}/{len(rs)} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nets", default="lenet5-fmnist,mlp-fmnist,mlp-digits")
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--max-steps", type=int, default=defaults.MAX_STEPS)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    path = out.with_suffix(".json")
    doc = json.loads(path.read_text()) if path.exists() else {"runs": {}, "commands": []}
    doc["commands"].append("python benchmarks/finetune_options.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    doc["machine"] = (f"{platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread, "
                      f"{time.strftime('%Y-%m-%d')}")
    with tempfile.TemporaryDirectory() as tmp:
        nets = networks(Path(tmp))
        for name in args.nets.split(","):
            model, data = nets[name]
            for seed in (int(s) for s in args.seeds.split(",")):
                for setting in args.settings.split(","):
                    key = f"{name}/{setting}/{seed}"
                    doc["runs"][key] = run_one(model, data, SETTINGS[setting], seed, args.max_steps)
                    print(key, doc["runs"][key], flush=True)
                    path.write_text(json.dumps(doc, indent=1) + "\n")
    out.with_suffix(".md").write_text(table(doc))
    print(table(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
