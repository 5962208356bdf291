"""Post-training BMRS on Fashion-MNIST: where does each rule stop relative to the knee?

For each seed: a trained network (the bundled LeNet5, ``lenet5-fmnist``; the paper's MLP trained
here for ``--mlp-epochs`` epochs with that seed), gates fitted post-training for ``--gate-epochs``
epochs (weights keep training at the same time, as in ``bmrs-compress --mode post-training``),
then the sweep: structures removed in dF order (BMRS_N ranking and BMRS_U-8 ranking) at
``--levels`` levels, no fine-tuning, test accuracy at each; the knee of each curve (the point
farthest above its end-to-end chord). Then each rule's own stop (prune where dF >= 0): BMRS_N
(Eq. 8), BMRS_N as the authors' code computes it, BMRS_U-8, BMRS_U-4, and its distance to the
knee of its ranking's curve, in compression and accuracy points.

    python benchmarks/posttraining_fmnist.py --seeds 5 --jobs 2 --out benchmarks/results/posttraining_fmnist/cpu
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

STOPS = {"bmrs_n": ("bmrs_n", {}), "bmrs_n_code": ("bmrs_n_code", {}),
         "bmrs_u8": ("bmrs_u", {"precision_bits": 8}), "bmrs_u4": ("bmrs_u", {"precision_bits": 4})}
CURVE_OF = {"bmrs_n": "bmrs_n", "bmrs_n_code": "bmrs_n", "bmrs_u8": "bmrs_u", "bmrs_u4": "bmrs_u"}
LABELS = {"bmrs_n": "BMRS_N (Eq. 8)", "bmrs_n_code": "BMRS_N (authors' code)", "bmrs_u8": "BMRS_U-8",
          "bmrs_u4": "BMRS_U-4"}


def trained(model_name: str, data, seed: int, epochs: int):
    import torch

    from bmrs_surgery.fit import train_plain
    from models import get_model

    if model_name == "lenet5":
        return get_model("lenet5-fmnist")
    torch.manual_seed(seed)
    model = train_plain(get_model("mlp"), data.train, epochs=epochs, batch_size=128, lr=1.5e-3, seed=seed)
    return model.eval()


def run_one(job: dict) -> dict:
    import torch

    torch.set_num_threads(1)
    import bmrs_surgery as bmrs
    from bmrs_surgery import api
    from bmrs_surgery.accounting import compression
    from bmrs_surgery.data import load_data
    from bmrs_surgery.fit import FitConfig, accuracy, fit
    from bmrs_surgery.plan import plan_keep
    from bmrs_surgery.sweep import sweep

    t0 = time.perf_counter()
    data = load_data("fashion-mnist")  # seed 0: the split the bundled LeNet5 was trained on
    model = trained(job["model"], data, job["seed"], job["mlp_epochs"])
    acc_trained = accuracy(model, data.test)
    torch.manual_seed(job["seed"])
    gated = bmrs.attach_gates(model, data.train.tensors[0][:2])
    cfg = FitConfig(epochs=job["gate_epochs"], mode="post-training", prior="uniform", seed=job["seed"],
                    gate_lr=1.5e-2, finetune_epochs=0, lr_schedule="constant")
    fit(gated, data, cfg)
    bmrs.unmask(gated)
    out = dict(job, accuracy_trained=acc_trained, accuracy_gated=accuracy(gated, data.test))
    res = sweep(gated, data, criteria=("bmrs_n", "bmrs_u"), levels=job["levels"], precision_bits=8)
    out["curves"], out["knees"] = res["curves"], res["knees"]
    bank, net = api.gate_bank(gated), api.network(gated)
    out["stops"] = {}
    for name, (crit, opts) in STOPS.items():
        dec = api.decision(gated, crit, **opts)
        keep = plan_keep(bank, dec.keep, dec.score)
        with torch.no_grad():
            bank.mask.copy_(keep.float())
        stop = {"compression": compression(net, bank, keep).ratio, "accuracy": accuracy(gated, data.test)}
        knee = res["knees"][CURVE_OF[name]]
        stop["minus_knee"] = {"compression_points": 100 * (stop["compression"] - knee["compression"]),
                              "accuracy_points": 100 * (stop["accuracy"] - knee["accuracy"])}
        out["stops"][name] = stop
    bmrs.unmask(gated)
    out["seconds"] = time.perf_counter() - t0
    print(f"{job['model']} seed {job['seed']}: " + ", ".join(
        f"{k} {100 * v['compression']:.1f}%/{100 * v['accuracy']:.1f}%" for k, v in out["stops"].items()),
        file=sys.stderr, flush=True)
    return out


def ms(vals) -> str:
    vals = list(vals)
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{statistics.mean(vals):.2f} ± {sd:.2f}"


def markdown(runs: list[dict], command: str) -> str:
    lines = ["# Post-training BMRS on Fashion-MNIST: stops against the knee", "", f"Command: `{command}`", "",
             "Per seed: gates fitted post-training on a trained network, structures removed in dF order "
             "(no fine-tuning), the knee of the accuracy-compression curve, and each rule's own stop "
             "(dF >= 0). Compression as the paper counts it; official 10k test set; mean ± std over seeds. "
             "Distance = stop minus knee (positive compression: the rule prunes past the knee).", ""]
    for model in sorted({r["model"] for r in runs}):
        group = [r for r in runs if r["model"] == model]
        g0 = group[0]
        lines += [f"## {model} ({len(group)} seeds, gates fitted {g0['gate_epochs']} epochs)", "",
                  f"Trained: {ms(100 * r['accuracy_trained'] for r in group)}% test accuracy; with fitted "
                  f"gates (none pruned): {ms(100 * r['accuracy_gated'] for r in group)}%. Knee of the BMRS_N "
                  f"ranking: {ms(100 * r['knees']['bmrs_n']['compression'] for r in group)}% / "
                  f"{ms(100 * r['knees']['bmrs_n']['accuracy'] for r in group)}%; of the BMRS_U ranking: "
                  f"{ms(100 * r['knees']['bmrs_u']['compression'] for r in group)}% / "
                  f"{ms(100 * r['knees']['bmrs_u']['accuracy'] for r in group)}%.", "",
                  "| rule | stop compression % | stop accuracy % | − knee compression (pts) | − knee accuracy (pts) |",
                  "|---|---|---|---|---|"]
        for name in STOPS:
            s = [r["stops"][name] for r in group]
            lines.append(f"| {LABELS[name]} | {ms(100 * x['compression'] for x in s)} | "
                         f"{ms(100 * x['accuracy'] for x in s)} | {ms(x['minus_knee']['compression_points'] for x in s)} | "
                         f"{ms(x['minus_knee']['accuracy_points'] for x in s)} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["lenet5", "mlp"], choices=["lenet5", "mlp"])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--gate-epochs", type=int, default=10)
    ap.add_argument("--mlp-epochs", type=int, default=20)
    ap.add_argument("--levels", type=int, default=20)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/posttraining_fmnist/cpu")
    args = ap.parse_args()
    jobs = [{"model": m, "seed": s, "gate_epochs": args.gate_epochs, "mlp_epochs": args.mlp_epochs,
             "levels": args.levels} for m in args.models for s in range(args.seeds)]
    with ProcessPoolExecutor(args.jobs) as pool:
        runs = list(pool.map(run_one, jobs))
    command = "python " + " ".join(sys.argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    md = markdown(runs, command)
    for path, text in ((out.with_suffix(".json"), json.dumps({"command": command, "runs": runs}, indent=1)),
                       (out.with_suffix(".md"), md)):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    print(md)


if __name__ == "__main__":
    main()
