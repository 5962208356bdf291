"""The paper's Fashion-MNIST comparison (docs/results.md, "Fashion-MNIST: the paper's comparison"), several seeds, every method.

Set-up as in the paper: MLP (Tanh, 150-150, batch 128, lr 1.5e-3) and LeNet5 (batch 32, lr 1.4e-3),
32x32 inputs, 80/20 train/val split of the 60k training set, the official 10k test set, Adam,
continuous pruning (masks recomputed every epoch from the current posteriors) for ``--epochs``
epochs, then ``--finetune`` epochs with the masks frozen. Methods:

- ``none``: the network without gates, trained for epochs + finetune epochs;
- ``l2``: smallest incoming-weight L2 norms pruned every epoch (one global ranking, the paper's
  single threshold), at the compression the ``--l2-match`` method reached with the same seed (run
  after it); ``l2_layer``: the same, but the same share of every layer (Torch-Pruning's default);
- ``expected`` (E[theta] < 0.1), ``snr`` (SNR < 1);
- ``bmrs_n`` (the paper's Eq. 8, the project's rule), ``bmrs_n_code`` (Eq. 8 as the authors' code
  computes it, +0.919), ``bmrs_u8``, ``bmrs_u4``.

One process per run (one thread each), ``--jobs`` at a time. Results are merged into
``OUT.json`` (runs keyed by model, set-up, method and seed, so several invocations with different
set-ups or models build one file) and ``OUT.md`` is rewritten from all runs, with each invocation's
command. Runs already recorded for the same set-up are skipped (``--rerun`` runs them again), so an
interrupted invocation resumes where it stopped. Runs on CPU (slowly) or on CUDA (``--device cuda``).

    python benchmarks/paper_fmnist.py --models mlp --seeds 5 --epochs 50 --finetune 10 --jobs 2 \\
        --out benchmarks/results/paper_fmnist/cpu
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
from pathlib import Path

PAPER = {"mlp": {"batch_size": 128, "lr": 1.5e-3}, "lenet5": {"batch_size": 32, "lr": 1.4e-3}}
PAPER_RESULTS = {  # the paper's table (docs/results.md): (compression %, accuracy %) means over 10 runs
    ("mlp", "none"): (0.0, 88.17), ("mlp", "bmrs_n"): (93.20, 84.99), ("mlp", "bmrs_u8"): (93.02, 85.01),
    ("mlp", "bmrs_u4"): (91.57, 85.79), ("lenet5", "none"): (0.0, 89.16), ("lenet5", "bmrs_n"): (88.02, 77.90),
    ("lenet5", "bmrs_u8"): (87.61, 77.23), ("lenet5", "bmrs_u4"): (88.72, 81.10),
}
METHODS = ("none", "expected", "snr", "bmrs_n", "bmrs_n_code", "bmrs_u8", "bmrs_u4", "l2", "l2_layer")
L2_METHODS = ("l2", "l2_layer")  # run after the method whose compression they match
LABELS = {"none": "None", "l2": "L2", "l2_layer": "L2, same share per layer", "expected": "E[θ] < 0.1", "snr": "SNR < 1", "bmrs_n": "BMRS_N (Eq. 8)",
          "bmrs_n_code": "BMRS_N (authors' code)", "bmrs_u8": "BMRS_U-8", "bmrs_u4": "BMRS_U-4"}
SETUP_KEYS = ("epochs", "finetune", "limit", "kl", "kl_scale", "gate_lr_factor", "noise", "kl_warmup", "finetune_gates")
SETUP_DEFAULTS = {"finetune_gates": "sampled", "kl_scale": 1.0}  # for runs recorded before the key existed


def fit_config(job: dict):
    from bmrs_surgery.fit import FitConfig

    method = job["method"]
    prior, bits, criterion, opts = "normal", 8, None, None
    if method in ("bmrs_u8", "bmrs_u4"):
        prior, bits = "uniform", int(method[-1])
    elif method in ("expected", "snr", "bmrs_n_code"):
        criterion = method
    elif method in L2_METHODS:
        criterion, opts = "l2", {"target_compression": job["target_compression"], "per_layer": method == "l2_layer"}
    p = PAPER[job["model"]]
    return FitConfig(
        epochs=job["epochs"], finetune_epochs=job["finetune"], mode="continuous", prior=prior,
        precision_bits=bits, criterion=criterion, criterion_opts=opts, kl_weighting=job["kl"], kl_scale=job.get("kl_scale", 1.0),
        kl_warmup_epochs=job["kl_warmup"], gate_lr=job["gate_lr_factor"] * p["lr"], seed=job["seed"],
        device=job["device"], finetune_gates=job.get("finetune_gates", "sampled"),
        lr_schedule="constant",  # the paper's set-up (and the schedule its committed results were measured with)
        **p,
    )


def training_subset(data, limit: int | None):
    """The first ``limit`` training examples; validation and test sets stay whole."""
    import dataclasses

    from torch.utils.data import TensorDataset

    if limit is None:
        return data
    x, y = data.train.tensors
    return dataclasses.replace(data, train=TensorDataset(x[:limit], y[:limit]))


def run_one(job: dict) -> dict:
    import torch

    torch.set_num_threads(job["threads"])
    import bmrs_surgery as bmrs
    from bmrs_surgery.data import load_data
    from bmrs_surgery.fit import accuracy, fit, train_plain
    from models import get_model

    data = training_subset(load_data("fashion-mnist", seed=job["seed"]), job["limit"])
    torch.manual_seed(job["seed"])
    model = get_model(job["model"])
    t0 = time.perf_counter()
    out = dict(job)
    if job["method"] == "none":
        # the unpruned baseline: the same network without gates, epochs + finetune epochs
        train_plain(model, data.train, epochs=job["epochs"] + job["finetune"], seed=job["seed"],
                    device=job["device"], **PAPER[job["model"]])
        out.update(compression=0.0, accuracy=accuracy(model, data.test, job["device"]))
    else:
        gated = bmrs.attach_gates(model, data.train.tensors[0][:2], noise=job["noise"])
        result = fit(gated, data, fit_config(job))
        out.update(compression=result.prune.compression, accuracy=accuracy(gated, data.test, job["device"]),
                   kept_fraction=result.prune.kept_fraction,
                   widths=[kept for kept, _ in result.prune.per_group.values()])  # kept per gate site
    out["seconds"] = time.perf_counter() - t0
    print(f"{job['model']} {job['method']} seed {job['seed']}: compression {out['compression']:.4f} "
          f"accuracy {out['accuracy']:.4f} ({out['seconds']:.0f} s)", file=sys.stderr, flush=True)
    return out


def setup_of(run: dict) -> tuple:
    return tuple((k, run.get(k, SETUP_DEFAULTS.get(k))) for k in SETUP_KEYS)


def run_key(run: dict) -> str:
    return json.dumps([run["model"], setup_of(run), run["method"], run["seed"]])


def summarise(runs: list[dict]) -> list[dict]:
    rows = []
    key = lambda r: (r["model"], setup_of(r), METHODS.index(r["method"]))  # noqa: E731
    for (model, setup, _), group in itertools.groupby(sorted(runs, key=key), key=key):
        group = list(group)
        row = {"model": model, "setup": dict(setup), "method": group[0]["method"], "runs": len(group),
               "seconds": statistics.mean(g["seconds"] for g in group)}
        for m in ("compression", "accuracy"):
            vals = [g[m] * 100 for g in group]
            row[m] = (statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0)
        rows.append(row)
    return rows


def setup_text(setup: dict) -> str:
    data = "full data" if setup["limit"] is None else f"first {setup['limit']} training examples"
    scale = "" if setup["kl_scale"] == 1.0 else f" x {setup['kl_scale']:g}"
    return (f"{setup['epochs']} + {setup['finetune']} epochs, {data}, KL {setup['kl']}{scale}, gate lr "
            f"{setup['gate_lr_factor']:g}x, noise per {setup['noise']}, KL warm-up {setup['kl_warmup']} epochs, "
            f"fine-tuning with {setup['finetune_gates']} gates")


def markdown(rows: list[dict], commands: list[str]) -> str:
    lines = ["# Fashion-MNIST: the paper's comparison (continuous pruning)", "",
             "Compression: share of trainable parameters removed (the paper's count). Accuracy: official "
             "10k test set. Mean ± standard deviation over seeds; Δ acc. is against our own `none` row of "
             "the same set-up. Paper: its published table (10 runs, 50 + 10 epochs).", "",
             "Commands:", ""] + [f"    {c}" for c in commands] + [""]
    key = lambda r: (r["model"], tuple(r["setup"].items()))  # noqa: E731
    for (model, setup), group in itertools.groupby(rows, key=key):
        group = list(group)
        base = next((r["accuracy"][0] for r in group if r["method"] == "none"), None)
        lines += [f"## {model}: {setup_text(dict(setup))}", "",
                  "| method | runs | compression % | accuracy % | Δ acc. (pts) | paper compr. % | paper acc. % | s/run |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in group:
            paper = PAPER_RESULTS.get((model, r["method"]))
            delta = "" if base is None else f"{r['accuracy'][0] - base:+.2f}"
            lines.append(
                f"| {LABELS[r['method']]} | {r['runs']} | {r['compression'][0]:.2f} ± {r['compression'][1]:.2f} | "
                f"{r['accuracy'][0]:.2f} ± {r['accuracy'][1]:.2f} | {delta} | "
                f"{'' if paper is None else f'{paper[0]:.2f}'} | {'' if paper is None else f'{paper[1]:.2f}'} | "
                f"{r['seconds']:.0f} |")
        lines.append("")
    return "\n".join(lines)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def load_results(out: Path) -> dict:
    """What OUT.json recorded before this invocation (nothing yet: no runs, no commands)."""
    path = out.with_suffix(".json")
    return json.loads(path.read_text()) if path.exists() else {"runs": [], "commands": []}


def record(out: Path, old: dict, runs: list[dict], command: str, *, key=None, summarise_runs=None,
           to_markdown=None) -> str:
    """Merge ``runs`` into the runs recorded before this invocation (a run replaces the recorded
    one with the same ``key``); rewrite OUT.json and OUT.md. The defaults are this benchmark's key,
    summary and table; other benchmarks pass their own."""
    key, summarise_runs, to_markdown = key or run_key, summarise_runs or summarise, to_markdown or markdown
    out.parent.mkdir(parents=True, exist_ok=True)
    merged = {key(r): r for r in old["runs"]}
    merged.update({key(r): r for r in runs})
    commands = [c for c in old["commands"] if c != command] + [command]
    all_runs = list(merged.values())
    rows = summarise_runs(all_runs)
    write_atomic(out.with_suffix(".json"), json.dumps({"commands": commands, "summary": rows, "runs": all_runs}, indent=1))
    md = to_markdown(rows, commands)
    write_atomic(out.with_suffix(".md"), md)
    return md


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["mlp", "lenet5"], choices=sorted(PAPER))
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=50)
    ap.add_argument("--finetune", type=int, default=10)
    ap.add_argument("--limit", type=int, default=None, help="first LIMIT training examples (test set stays whole)")
    ap.add_argument("--kl", default="mean", choices=("mean", "elbo"))
    ap.add_argument("--kl-scale", type=float, default=1.0, help="multiplies the KL term")
    ap.add_argument("--gate-lr-factor", type=float, default=1.0)
    ap.add_argument("--noise", default="sample", choices=("sample", "structure", "element"))
    ap.add_argument("--kl-warmup", type=int, default=0, help="epochs of linear KL warm-up")
    ap.add_argument("--finetune-gates", default="sampled", choices=("sampled", "expected"),
                    help="fine-tune with noisy gates, or with the deployed E[theta] * mask (posteriors frozen)")
    ap.add_argument("--l2-match", default="bmrs_n", choices=[m for m in METHODS if m.startswith("bmrs")],
                    help="L2 prunes to the compression this method reached (same seed)")
    ap.add_argument("--rerun", action="store_true", help="run again what OUT.json already records")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="benchmarks/results/paper_fmnist/cpu")
    args = ap.parse_args()
    base = dict(epochs=args.epochs, finetune=args.finetune, limit=args.limit, kl=args.kl, kl_scale=args.kl_scale,
                gate_lr_factor=args.gate_lr_factor, noise=args.noise, kl_warmup=args.kl_warmup,
                finetune_gates=args.finetune_gates,
                threads=args.threads, device=args.device)
    # seed-major, so an interrupted invocation has recorded every method for its first seeds
    jobs = [dict(base, model=m, method=meth, seed=s) for m in args.models for s in range(args.seeds)
            for meth in args.methods if meth not in L2_METHODS]
    out = Path(args.out)
    old = load_results(out)
    recorded = {run_key(r) for r in old["runs"]}
    l2_methods = [m for m in args.methods if m in L2_METHODS]
    if l2_methods and args.l2_match not in args.methods:  # its runs must be recorded already
        need = [dict(base, model=m, method=args.l2_match, seed=s) for m in args.models for s in range(args.seeds)]
        if not all(run_key(r) in recorded for r in need):
            ap.error(f"--methods {' '.join(l2_methods)} needs {args.l2_match} (--l2-match) in the same run or "
                     f"recorded in {out.with_suffix('.json')}")
    done = set() if args.rerun else recorded
    jobs = [j for j in jobs if run_key(j) not in done]
    t0 = time.perf_counter()
    command = "python " + " ".join(sys.argv)
    runs: list[dict] = []
    md = markdown(summarise(old["runs"]), old["commands"]) if old["runs"] else ""  # when nothing is left to run
    with ProcessPoolExecutor(args.jobs) as pool:
        for run in pool.map(run_one, jobs):
            runs.append(run)
            md = record(out, old, runs, command)  # after every run: an interrupted invocation keeps its runs
        if l2_methods:
            ref = {run_key(r): r for r in old["runs"]} | {run_key(r): r for r in runs}
            match = {(m, s): ref[run_key(dict(base, model=m, method=args.l2_match, seed=s))]["compression"]
                     for m in args.models for s in range(args.seeds)}
            l2 = [dict(base, model=m, method=meth, seed=s, target_compression=match[(m, s)], l2_match=args.l2_match)
                  for m in args.models for s in range(args.seeds) for meth in l2_methods]
            l2 = [j for j in l2 if run_key(j) not in done]
            for run in pool.map(run_one, l2):
                runs.append(run)
                md = record(out, old, runs, command)
    print(md)
    print(f"{len(runs)} runs in {time.perf_counter() - t0:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
