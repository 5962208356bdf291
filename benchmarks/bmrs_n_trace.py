"""Why exact BMRS_N stops pruning in continuous mode: dF per epoch while the posteriors settle.

Fits the paper's MLP on Fashion-MNIST with BMRS_N masks (continuous mode, no fine-tuning) and
after every epoch prints the quantiles of dF under BMRS_N (paper Eq. 8), the share of gates each
rule would prune (BMRS_N, BMRS_N as the authors' code computes it, BMRS_U-8) and the median
log sigma. Unneeded gates drift towards the prior: their dF under Eq. 8 rises towards 0 from
below (a posterior equal to the prior has dF = 0 exactly), so Eq. 8 never crosses while
BMRS_U-8 and the authors' +0.919 do.

    python benchmarks/bmrs_n_trace.py --epochs 50 --out benchmarks/results/bmrs_n_trace/cpu
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=50)
    ap.add_argument("--gate-lr-factor", type=float, default=10.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/bmrs_n_trace/cpu")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    import bmrs_surgery as bmrs
    from bmrs_surgery import api
    from bmrs_surgery.data import load_data
    from bmrs_surgery.fit import FitConfig, accuracy, fit
    from models import get_model

    data = load_data("fashion-mnist", seed=args.seed)
    torch.manual_seed(args.seed)
    gated = bmrs.attach_gates(get_model("mlp"), data.train.tensors[0][:2])
    rows = []

    def after_epoch(state):
        n = api.decision(gated, "bmrs_n").score
        code = api.decision(gated, "bmrs_n_code").score
        u8 = api.decision(gated, "bmrs_u", precision_bits=8).score
        q = torch.quantile(n, torch.tensor([0.1, 0.5, 0.9], dtype=n.dtype))
        row = {"epoch": state["epochs_done"], "df_n_q10": float(q[0]), "df_n_median": float(q[1]),
               "df_n_q90": float(q[2]), "prune_bmrs_n": float((n >= 0).double().mean()),
               "prune_bmrs_n_code": float((code >= 0).double().mean()),
               "prune_bmrs_u8": float((u8 >= 0).double().mean()),
               "median_log_sigma": float(api.gate_bank(gated).log_sigma.detach().median()),
               "val_accuracy": accuracy(gated, data.val)}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)

    cfg = FitConfig(epochs=args.epochs, mode="continuous", prior="normal", batch_size=128, lr=1.5e-3,
                    gate_lr=args.gate_lr_factor * 1.5e-3, seed=args.seed, finetune_epochs=0,
                    lr_schedule="constant")
    fit(gated, data, cfg, checkpoint=after_epoch)
    command = "python " + " ".join(sys.argv)
    lines = ["# Exact BMRS_N during continuous pruning (MLP, Fashion-MNIST)", "", f"Command: `{command}`", "",
             "Masks by BMRS_N (Eq. 8) every epoch. Columns: quantiles of dF (Eq. 8) over the 300 gates; share of "
             "gates each rule would prune now; median log sigma; validation accuracy.", "",
             "| epoch | dF q10 | dF median | dF q90 | BMRS_N prunes | authors' code prunes | BMRS_U-8 prunes | "
             "median log σ | val. acc. % |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["epoch"] in (1, 2, 5) or r["epoch"] % 10 == 0 or r["epoch"] == rows[-1]["epoch"]:
            lines.append(f"| {r['epoch']} | {r['df_n_q10']:.4g} | {r['df_n_median']:.4g} | {r['df_n_q90']:.4g} | "
                         f"{100 * r['prune_bmrs_n']:.1f}% | {100 * r['prune_bmrs_n_code']:.1f}% | "
                         f"{100 * r['prune_bmrs_u8']:.1f}% | {r['median_log_sigma']:.2f} | "
                         f"{100 * r['val_accuracy']:.2f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"command": command, "epochs": rows}, indent=1))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
