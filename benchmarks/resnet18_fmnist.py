"""ResNet-18 on Fashion-MNIST: trained from scratch, then compressed by the generic graph path.

1. Writes the data as an .npz (the first ``--train-examples`` of the official training images,
   resized to 32x32 and scaled as the paper does, plus the whole official test set), so every stage
   below reads the same split.
2. Trains ``resnet18-1ch`` (torchvision ResNet-18, 3x3 single-channel stem) from scratch with Adam
   for ``--epochs`` epochs on that split's training part and saves its state dict.
3. Runs ``bmrs-compress`` on the checkpoint once per method (BMRS_N: ``--prior normal``;
   BMRS_U-4: ``--prior uniform --precision-bits 4``), post-training mode: gates fitted for
   ``--gate-epochs`` epochs, one dF decision, ``--finetune-epochs`` of fine-tuning, surgery, proof,
   ONNX export and an interleaved ONNX Runtime benchmark of original vs pruned.
4. Collects compression, accuracies and ORT latencies from each report.json into OUT.json/OUT.md.

    python benchmarks/resnet18_fmnist.py --train-examples 30000 --epochs 6 --gate-epochs 4 \\
        --finetune-epochs 1 --methods bmrs_n bmrs_u4 bmrs_u8 --work runs/resnet18_fmnist_30k \\
        --out benchmarks/results/resnet18_fmnist/cpu-30k
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

METHODS = {"bmrs_n": ["--prior", "normal"], "bmrs_u4": ["--prior", "uniform", "--precision-bits", "4"],
           "bmrs_u8": ["--prior", "uniform", "--precision-bits", "8"]}
LABELS = {"bmrs_n": "BMRS_N (Eq. 8)", "bmrs_u4": "BMRS_U-4", "bmrs_u8": "BMRS_U-8"}


def write_data(path: Path, train_examples: int | None) -> None:
    import numpy as np

    from bmrs_surgery.data import load_data

    data = load_data("fashion-mnist", val_fraction=0.0)
    x, y = data.train.tensors
    if train_examples is not None:
        x, y = x[:train_examples], y[:train_examples]
    xt, yt = data.test.tensors
    np.savez(path, x=x.numpy(), y=y.numpy(), x_test=xt.numpy(), y_test=yt.numpy())


def train_from_scratch(data_path: Path, ckpt: Path, epochs: int, batch_size: int, lr: float, threads: int) -> dict:
    import torch

    from bmrs_surgery.data import load_data
    from bmrs_surgery.fit import accuracy, train_plain
    from models import get_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    data = load_data(str(data_path))  # the split bmrs-compress will use (80/20, seed 0)
    model = get_model("resnet18-1ch")

    def report(epoch: int) -> None:
        print(f"epoch {epoch + 1}/{epochs}: val accuracy {accuracy(model, data.val, batch_size=500):.4f}",
              file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    train_plain(model, data.train, epochs=epochs, batch_size=batch_size, lr=lr, seed=0, after_epoch=report)
    torch.save(model.state_dict(), ckpt)
    return {"train_examples": len(data.train), "epochs": epochs, "seconds": time.perf_counter() - t0,
            "val_accuracy": accuracy(model, data.val, batch_size=500),
            "test_accuracy": accuracy(model, data.test, batch_size=500)}


def compress(method: str, ckpt: Path, data_path: Path, out: Path, args) -> dict:
    cmd = ["bmrs-compress", "compress", str(ckpt), "--arch", "resnet18-1ch", "--data", str(data_path),
           *METHODS[method], "--mode", "post-training", "--epochs", str(args.gate_epochs),
           "--finetune-epochs", str(args.finetune_epochs), "--batch-size", str(args.batch_size),
           "--lr", str(args.finetune_lr), "--gate-lr", str(args.gate_lr), "--lr-schedule", "constant", "--bench-batch-sizes", args.bench_batch_sizes, "--threads",
           str(args.threads), "-q", "--json", "--out", str(out)]
    if args.round_to:
        cmd += ["--round-to", str(args.round_to)]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"bmrs-compress failed for {method}: {r.stderr.strip().splitlines()[-1:]}")
    rep = json.loads((out / "report.json").read_text())
    tot, surg = rep["totals"], rep["surgery"]
    return {"method": method, "command": " ".join(cmd), "seconds": time.perf_counter() - t0,
            "compression": tot["parameter_compression"], "structures_before": tot["structures_before"],
            "structures_after": tot["structures_after"], "accuracy_before": tot["accuracy_before"],
            "accuracy_gated": tot["accuracy_gated"], "accuracy_pruned": tot["accuracy_pruned"],
            "proof": surg["proof"], "counts": surg["counts"], "benchmark": surg["benchmark"]}


def speedups(bench) -> dict:
    """Latency ratio original / pruned per batch size, from the report's benchmark section."""
    ratios = (bench or {}).get("ratios_vs_first") or [{"batches": []}]
    return {str(b["batch"]): 1.0 / b["median_ratio"] for b in ratios[0]["batches"]}


def markdown(res: dict, command: str) -> str:
    pre = res["pretrain"]
    lines = ["# ResNet-18 on Fashion-MNIST: trained from scratch, compressed through the graph path", "",
             f"Command: `{command}`", "",
             f"Model: `resnet18-1ch` (torchvision ResNet-18, 3x3 single-channel stem), "
             f"{pre['train_examples']} training examples, {pre['epochs']} epochs from scratch "
             f"({pre['seconds']:.0f} s): test accuracy {100 * pre['test_accuracy']:.2f}%. Then `bmrs-compress` "
             "per method (post-training: gates fitted, one dF decision, fine-tuned, shrunk, proven, "
             "exported, benchmarked in ONNX Runtime; commands in the JSON)"
             + (f"; widths rounded to multiples of {res['round_to']} channels" if res.get("round_to") else "")
             + ".", "",
             "| method | structures kept | parameter compression % | test acc. before % | gated % | pruned % | "
             "proof max abs diff | ORT speedup (batch: x) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in res["methods"]:
        sp = ", ".join(f"{b}: {v:.2f}x" for b, v in speedups(r["benchmark"]).items())
        lines.append(
            f"| {LABELS[r['method']]} | {r['structures_after']}/{r['structures_before']} | "
            f"{100 * r['compression']:.2f} | {100 * (r['accuracy_before'] or 0):.2f} | "
            f"{100 * (r['accuracy_gated'] or 0):.2f} | {100 * (r['accuracy_pruned'] or 0):.2f} | "
            f"{r['proof'].get('max_abs_diff', float('nan')):.2e} | {sp} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-examples", type=int, default=None, help="first N official training images (default all)")
    ap.add_argument("--epochs", type=int, default=10, help="training from scratch")
    ap.add_argument("--gate-epochs", type=int, default=2)
    ap.add_argument("--finetune-epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3, help="training from scratch")
    ap.add_argument("--finetune-lr", type=float, default=1e-4, help="weights while gates are fitted and after")
    ap.add_argument("--gate-lr", type=float, default=5e-2, help="gate posteriors (few steps on a subset)")
    ap.add_argument("--methods", nargs="+", default=["bmrs_n", "bmrs_u4"], choices=sorted(METHODS))
    ap.add_argument("--bench-batch-sizes", default="1,32")
    ap.add_argument("--round-to", type=int, default=None, help="keep multiples of N channels (passed on)")
    ap.add_argument("--reuse", action="store_true", help="reuse the data and checkpoint already in --work")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--work", default="runs/resnet18_fmnist", help="checkpoint, data and per-method outputs")
    ap.add_argument("--out", default="benchmarks/results/resnet18_fmnist/cpu")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data_path, ckpt = work / "fmnist.npz", work / "resnet18_1ch.pt"
    info = work / "pretrain.json"
    if args.reuse and ckpt.exists() and info.exists():
        pretrain = json.loads(info.read_text())
    else:
        write_data(data_path, args.train_examples)
        pretrain = train_from_scratch(data_path, ckpt, args.epochs, args.batch_size, args.lr,
                                      args.threads or os.cpu_count())
        info.write_text(json.dumps(pretrain))
    suffix = f"_round{args.round_to}" if args.round_to else ""
    methods = [compress(m, ckpt, data_path, work / (m + suffix), args) for m in args.methods]
    command = "python " + " ".join(sys.argv)
    res = {"command": command, "pretrain": pretrain, "round_to": args.round_to, "methods": methods}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    md = markdown(res, command)
    out.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
