"""How accurate can a network of a pruned size be? The paper's MLP and LeNet5 cut to given widths
and trained from scratch with the paper's full budget (the "scratch" reference of Liu et al.,
"Rethinking the Value of Network Pruning", ICLR 2019).

Issue 5 asks for BMRS at >= 93% (MLP) / >= 88% (LeNet5) parameter compression with accuracy within
1.5 / 2 points of the unpruned network. This script measures what networks of that size reach when
trained directly: for each width tuple (kept structures per gate site, in the order ``inspect``
lists them) it keeps the first structures of every site, shrinks the network with the project's own
surgery, re-initialises every layer and trains it without gates (Adam, the paper's batch size and
learning rate, epochs + finetune epochs, the 80% training split), then reports the paper's
parameter compression and the official test accuracy over seeds.

    python benchmarks/scratch_capacity.py --model mlp --widths 8,150 10,96 11,49 12,6 --seeds 3 \\
        --out benchmarks/results/scratch_capacity/cpu
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paper_fmnist import PAPER, load_results, record  # noqa: E402


def small_network(model_name: str, widths: tuple[int, ...]):
    """The model cut to ``widths`` by surgery (first structures of each site), and its compression."""
    import torch

    import bmrs_surgery as bmrs
    from bmrs_surgery.accounting import compression
    from bmrs_surgery.gated import analysis_of, network
    from bmrs_surgery.surgery import shrink
    from models import get_model

    gated = bmrs.attach_gates(get_model(model_name), torch.zeros(2, 1, 32, 32))
    bank = bmrs.gate_bank(gated)
    if len(widths) != len(bank.groups):
        raise SystemExit(f"{model_name} has {len(bank.groups)} groups, got {len(widths)} widths")
    keep = torch.zeros(bank.mask.numel(), dtype=torch.bool)
    for i, k in enumerate(widths):
        if not 1 <= k <= bank.groups[i].size:
            raise SystemExit(f"width {k} for group {bank.groups[i].name} is outside 1..{bank.groups[i].size}")
        start = bank.slice_of(i).start
        keep[start:start + k] = True
    ratio = compression(network(gated), bank, keep).ratio
    return shrink(analysis_of(gated), bank, keep), ratio


def run_one(job: dict) -> dict:
    import torch

    torch.set_num_threads(job["threads"])
    from bmrs_surgery.data import load_data
    from bmrs_surgery.fit import accuracy, train_plain

    net, ratio = small_network(job["model"], tuple(job["widths"]))
    torch.manual_seed(job["seed"])
    for m in net.modules():  # a fresh initialisation: nothing inherited from the big network
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    data = load_data("fashion-mnist", seed=job["seed"])
    t0 = time.perf_counter()
    train_plain(net, data.train, epochs=job["epochs"], seed=job["seed"], **PAPER[job["model"]])
    out = dict(job, compression=ratio, params=sum(p.numel() for p in net.parameters()),
               accuracy=accuracy(net, data.test), seconds=time.perf_counter() - t0)
    print(f"{job['model']} {job['widths']} seed {job['seed']}: compression {ratio:.4f} "
          f"accuracy {out['accuracy']:.4f} ({out['seconds']:.0f} s)", file=sys.stderr, flush=True)
    return out


def run_key(run: dict) -> str:
    return json.dumps([run["model"], run["widths"], run["epochs"], run["seed"]])


def summarise(runs: list[dict]) -> list[dict]:
    rows = {}
    for r in runs:
        rows.setdefault((r["model"], tuple(r["widths"]), r["epochs"]), []).append(r)
    out = []
    for (model, widths, epochs), group in sorted(rows.items()):
        acc = [g["accuracy"] * 100 for g in group]
        out.append({"model": model, "widths": list(widths), "epochs": epochs, "runs": len(group),
                    "compression": group[0]["compression"] * 100, "params": group[0]["params"],
                    "accuracy": (statistics.mean(acc), statistics.stdev(acc) if len(acc) > 1 else 0.0)})
    return out


def markdown(rows: list[dict], commands: list[str]) -> str:
    lines = ["# Networks of the pruned size, trained from scratch (Fashion-MNIST)", "",
             "Each row: the paper's network cut to the given widths (kept structures per gate site) by the "
             "project's surgery, re-initialised and trained without gates with the paper's optimiser and "
             "budget; compression as the paper counts it; official 10k test set, mean ± std over seeds.", "",
             "Commands:", ""] + [f"    {c}" for c in commands] + ["",
             "| model | widths | epochs | runs | compression % | parameters | accuracy % |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {'-'.join(map(str, r['widths']))} | {r['epochs']} | {r['runs']} | "
                     f"{r['compression']:.2f} | {r['params']} | {r['accuracy'][0]:.2f} ± {r['accuracy'][1]:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, choices=sorted(PAPER))
    ap.add_argument("--widths", nargs="+", required=True, help="comma-separated kept structures per gate site")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=60, help="the paper's 50 + 10")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/scratch_capacity/cpu")
    args = ap.parse_args()
    try:
        widths = [tuple(int(k) for k in w.split(",")) for w in args.widths]
    except ValueError:
        ap.error("--widths: comma-separated integers, e.g. 10,96")
    for w in widths:  # refuse bad widths here, before any training
        small_network(args.model, w)
    jobs = [dict(model=args.model, widths=list(w), seed=s, epochs=args.epochs, threads=args.threads)
            for s in range(args.seeds) for w in widths]
    out = Path(args.out)
    old = load_results(out)
    command = "python " + " ".join(sys.argv)
    runs: list[dict] = []
    with ProcessPoolExecutor(args.jobs) as pool:
        for run in pool.map(run_one, jobs):  # results written after every run
            runs.append(run)
            md = record(out, old, runs, command, key=run_key, summarise_runs=summarise, to_markdown=markdown)
    print(md)


if __name__ == "__main__":
    main()
