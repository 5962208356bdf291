"""Settling study (docs/settling.md): how fast the gates settle, per setting, on a suite of
over-parameterised networks a user might bring, and whether stopping when they settle loses anything
against a fit ten times as long.

The suite (every network first trained plainly, as a user's own trained network would be):

- ``mlp-tabular``: MLP 30-256-256-2 on scikit-learn's breast-cancer table (an ``.npz`` file);
- ``mlp-digits``: MLP 64-512-256-10 on scikit-learn's 8x8 digits, flattened (``.npz``);
- ``chain-cnn``: a plain chain of 3x3 convolutions (32-64-96) on the 8x8 digits;
- ``residual-cnn``: a residual CNN (two residual stages, 32 and 64 channels);
- ``concat-cnn``: an Inception-style CNN whose branches are concatenated;
- ``lenet5-fmnist``: the bundled LeNet5 trained on Fashion-MNIST, on the bundled sample (32x32).

Per network and setting: ``--epochs auto`` with every other option at its default (the setting
changes one of them), recording the optimiser steps until the gates settled (or the stop at
``max_steps``), the compression and the test accuracy after the default fine-tuning. With
``--long``, the same setting is also fitted for ten times the steps the auto fit took, to compare.

    python benchmarks/settling.py --settings default,gate_lr_5e-2,init_sigma_-2 --long default \\
        --out benchmarks/results/settling/cpu

``--steps N`` fits each setting for N steps instead (a reference for what a much longer fit
removes); ``--trace N`` fits N steps and records, at every settling check, what candidate settling
tests would have seen (projections over several horizons from two kinds of slope, the objective,
the KL), which is how the test in ``bmrs_surgery/settling.py`` was chosen (docs/settling.md):

    python benchmarks/settling.py --trace 4000 --out benchmarks/results/settling/trace
    python benchmarks/settling.py --nets residual-cnn,concat-cnn,lenet5-fmnist --steps 20000 \
        --out benchmarks/results/settling/reference-20k

Results: ``OUT.json`` (every run) and ``OUT.md`` (tables, with the command).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bmrs_surgery import defaults
from bmrs_surgery.data import load_data
from bmrs_surgery.fit import FitConfig, accuracy, fit, train_plain
from bmrs_surgery.gated import attach_gates

SETTINGS = {  # one change each against the defaults (gate_lr_5e-2 is the default the study chose)
    "default": {},
    "cosine": {"lr_schedule": "cosine"},  # the default since the fine-tuning study (as "default" today)
    "constant": {"lr_schedule": "constant"},  # the default schedule before the fine-tuning study chose cosine
    "constant+gate_lr_1e-1": {"lr_schedule": "constant", "gate_lr": 1e-1},
    "gate_lr_5e-2": {"gate_lr": 5e-2},
    "gate_lr_1.5e-2": {"gate_lr": 1.5e-2},  # the default before the study
    "gate_lr_5e-3": {"gate_lr": 5e-3},
    "gate_lr_1e-1": {"gate_lr": 1e-1},
    "init_sigma_-2": {"init_log_sigma": -2.0},
    "kl_elbo": {"kl_weighting": "elbo"},
    "finetune_epochs_27": {"finetune_epochs": 27},
    # the weights frozen while the gates are fitted, then fine-tuned as by default (benchmark-only)
    "frozen_weights": {"frozen_weights": True},  # about 1,000 fine-tuning steps on the LeNet5 sample (38 a epoch)
    # another optimiser for the gate posteriors only (benchmark-only; the weights keep Adam's defaults):
    # no momentum (RMSprop-like steps, each from its own batch), or a second moment that forgets 10x faster
    "gate_adam_beta1_0": {"gate_betas": (0.0, 0.999)},
    "gate_adam_beta2_0.99": {"gate_betas": (0.9, 0.99)},
}


class ResidualBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.c2, self.b2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(x + self.b2(self.c2(F.relu(self.b1(self.c1(x))))))


class ResidualCNN(nn.Module):
    def __init__(self, classes):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.stage1 = ResidualBlock(32)
        self.down = nn.Sequential(nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU())
        self.stage2 = ResidualBlock(64)
        self.fc = nn.Linear(64, classes)

    def forward(self, x):
        return self.fc(self.stage2(self.down(self.stage1(self.stem(x)))).mean((2, 3)))


class ConcatCNN(nn.Module):
    def __init__(self, classes):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU())
        self.a = nn.Sequential(nn.Conv2d(32, 32, 1), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(32, 16, 1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU())
        self.c = nn.Sequential(nn.Conv2d(32, 16, 3, padding=1), nn.ReLU())
        self.mix = nn.Sequential(nn.Conv2d(80, 96, 3, stride=2, padding=1), nn.ReLU())
        self.fc = nn.Linear(96, classes)

    def forward(self, x):
        x = self.stem(x)
        x = torch.cat([self.a(x), self.b(x), self.c(x)], 1)
        return self.fc(self.mix(x).mean((2, 3)))


def chain_cnn(classes):
    return nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Conv2d(64, 96, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(96, classes))


def mlp(sizes):
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(nn.Flatten(), *layers[:-1])


def _npz(folder: Path, name: str, x: np.ndarray, y: np.ndarray) -> str:
    path = folder / f"{name}.npz"
    np.savez(path, x=x.astype(np.float32), y=y.astype(np.int64))
    return str(path)


def suite(folder: Path) -> dict:
    """name -> (network factory, data spec, plain-training epochs)."""
    from sklearn.datasets import load_breast_cancer, load_digits

    bc = load_breast_cancer()
    x = (bc.data - bc.data.mean(0)) / bc.data.std(0)
    tab = _npz(folder, "breast_cancer", x, bc.target)
    dg = load_digits()
    flat = _npz(folder, "digits_flat", dg.data / 16.0, dg.target)
    img = _npz(folder, "digits_8x8", (dg.images / 16.0)[:, None], dg.target)
    return {
        "mlp-tabular": (lambda k: mlp([30, 256, 256, k]), tab, 10),
        "mlp-digits": (lambda k: mlp([64, 512, 256, k]), flat, 10),
        "chain-cnn": (chain_cnn, img, 80),  # 80 epochs: 98.9% (5 epochs left it at 57%)
        "residual-cnn": (ResidualCNN, img, 5),  # 99.7% after 5 epochs
        "concat-cnn": (ConcatCNN, img, 80),  # 97.2% (42% after 5 epochs)
        "lenet5-fmnist": (None, "fashion-mnist-sample", 0),
    }


def trained(name: str, factory, spec: str, epochs: int):
    data = load_data(spec, seed=0)
    if factory is None:  # the bundled LeNet5, trained on all of Fashion-MNIST: no plain training here
        from models import get_model

        return get_model("lenet5-fmnist"), data
    torch.manual_seed(0)
    net = factory(data.num_classes)
    train_plain(net, data.train, epochs=epochs, batch_size=defaults.BATCH_SIZE, lr=defaults.LR, seed=0)
    return net, data


class Trajectory:
    """Keeps every settling check of a fit (the fit calls ``check``; the other calls are ignored)."""

    def __init__(self):
        self.checks = []

    def check(self, found) -> None:
        from dataclasses import asdict

        self.checks.append({k: v for k, v in asdict(found).items() if k != "stable"} | {"stable": found.stable})

    def __getattr__(self, name):
        return lambda *a, **k: None


def run_one(net, data, setting: dict, epochs) -> dict:
    net = copy.deepcopy(net)
    opts = dict(setting)
    init = opts.pop("init_log_sigma", defaults.INIT_LOG_SIGMA)
    frozen = opts.pop("frozen_weights", False)
    gate_betas = opts.pop("gate_betas", None)
    if gate_betas is not None:
        return with_gate_betas(gate_betas, run_one, net, data, opts, epochs)
    gated = attach_gates(net, data.train.tensors[0][:2], init_log_sigma=init)
    cfg = FitConfig(epochs=epochs, **opts)
    t0 = time.perf_counter()
    trajectory = Trajectory()
    steps_per_epoch = math.ceil(len(data.train) / cfg.batch_size)
    if frozen:  # fit the gates alone, then fine-tune the weights for what the default fine-tuning does
        from dataclasses import replace

        from bmrs_surgery.gated import gate_bank

        gates = {id(q) for q in gate_bank(gated).parameters()}
        weights = [q for q in gated.parameters() if id(q) not in gates and q.requires_grad]
        for q in weights:
            q.requires_grad_(False)
        res = fit(gated, data, replace(cfg, finetune_epochs=0), trajectory)
        for q in weights:
            q.requires_grad_(True)
        tune = max(cfg.finetune_epochs, math.ceil(defaults.AUTO_FINETUNE_STEPS / steps_per_epoch))
        fit(gated, data, replace(cfg, epochs=0, finetune_epochs=tune))
    else:
        res = fit(gated, data, cfg, trajectory)
    info = res.settling or {}
    return {
        "epochs": epochs, "steps_per_epoch": steps_per_epoch,
        "settled": info.get("settled"), "settled_at_step": info.get("settled_at_step"), "steps": info.get("steps"),
        "stopped": info.get("stopped"),
        "compression": res.prune.compression, "kept_fraction": res.prune.kept_fraction,
        "accuracy": accuracy(gated, data.test), "seconds": time.perf_counter() - t0,
        "checks": trajectory.checks,
    }


def with_gate_betas(betas, run, *args):
    """``run(*args)`` with the fit's Adam using ``betas`` on the gate posteriors' group only."""
    import bmrs_surgery.fit as fit_module

    real = fit_module.make_optimizer

    def make_optimizer(gated, cfg):
        opt = real(gated, cfg)
        opt.param_groups[fit_module.GATE_GROUP]["betas"] = tuple(betas)
        return opt

    fit_module.make_optimizer = make_optimizer
    try:
        return run(*args)
    finally:
        fit_module.make_optimizer = real


def suffixed(out: Path, suffix: str) -> Path:
    """``--out`` with ``suffix`` added (a dot in the name, as in ``beta2_0.99``, is kept)."""
    return out.with_name(out.name + suffix)


HORIZONS = (1.0, 2.0, 4.0, 9.0)  # --trace: projections over these multiples of the steps done


def trace(net, data, setting: dict, steps: int) -> dict:
    """A fixed-length fit recording, at every settling check, what candidate settling tests would
    have seen: the projected change in compression for slopes over the last 3 checks ("fixed") or
    over the second half of the fit so far ("half", least squares), at every horizon of HORIZONS, plus
    the objective, the KL and the KL of the kept structures. The fit itself is the default one."""
    import bmrs_surgery.fit as fit_module
    from bmrs_surgery.gated import gate_bank
    from bmrs_surgery.settling import projected_keep, score_slope

    history, rows = [], []
    real = fit_module.observe
    state = {}

    def observe(settle, **kw):
        found = real(settle, **kw)
        score, keep, measure = kw["score"].detach().double().cpu(), kw["keep"].bool().cpu(), kw["measure"]
        now = measure(keep)
        history.append((kw["step"], score))
        bank = state["bank"]
        with torch.no_grad():
            per = bank._kl_fn(bank.posterior).double().cpu()
        row = {"step": kw["step"], "compression": now, "objective": kw["objective"], "kl": kw["kl"],
               "kl_kept": float(per[keep].mean()) if keep.any() else 0.0, "kept": int(keep.sum()),
               "flipped": found.flipped, "projected": {}}
        for name, since in (("fixed", history[max(0, len(history) - 4)][0]), ("half", kw["step"] // 2)):
            slope = score_slope([(s, h) for s, h in history if s >= since])
            for h in HORIZONS:
                if slope is None:
                    row["projected"][f"{name}/{h:g}"] = 1.0
                    continue
                ahead = projected_keep(score, slope, keep, h * kw["step"])
                row["projected"][f"{name}/{h:g}"] = abs(measure(ahead) - now)
        rows.append(row)
        return found

    net = copy.deepcopy(net)
    opts = dict(setting)
    init = opts.pop("init_log_sigma", defaults.INIT_LOG_SIGMA)
    gated = attach_gates(net, data.train.tensors[0][:2], init_log_sigma=init)
    state["bank"] = gate_bank(gated)
    spe = math.ceil(len(data.train) / defaults.BATCH_SIZE)
    fit_module.observe = observe
    try:
        res = fit(gated, data, FitConfig(epochs=math.ceil(steps / spe), **opts))
    finally:
        fit_module.observe = real
    return {"steps_per_epoch": spe, "checks": rows, "compression": res.prune.compression}


# --replay: candidate settling tests (slope window/horizon, projected tolerance, objective rule); the
# first is the test before the trace study, the third the one chosen
CANDIDATES = [("fixed/2", 0.02, "own size"), ("half/2", 0.02, "fall"), ("half/9", 0.04, "fall"),
              ("half/9", 0.03, "fall"), ("half/9", 0.05, "fall"), ("half/4", 0.03, "fall"), ("fixed/9", 0.04, "fall")]


def replay(doc: dict) -> str:
    """Where each candidate test would have stopped the traced fits (flip tolerance 2 points,
    objective tolerance 5%, three stable checks in a row, at least 500 steps, as the defaults), and
    the compression there: a table."""
    from bmrs_surgery.settling import relative_change

    lines = ["| network | " + " | ".join(f"{k} slope/horizon, {t:.0%}, objective vs {o}" for k, t, o in CANDIDATES)
             + " | at 4,000 steps |", "|---" * (len(CANDIDATES) + 2) + "|"]
    for key, r in doc["runs"].items():
        if "/trace" not in key:
            continue
        checks, cells = r["checks"], []
        for proj, tol, rule in CANDIDATES:
            streak, found = 0, None
            for i, c in enumerate(checks):
                window = checks[max(0, i - defaults.SETTLE_PATIENCE):i]
                before = sum(w["objective"] for w in window) / len(window) if window else None
                fallen = checks[0]["objective"] - c["objective"] if rule == "fall" else 0.0
                change = relative_change(c["objective"], before, fallen)
                stable = (c["flipped"] <= defaults.SETTLE_FLIP_TOLERANCE and c["projected"][proj] <= tol
                          and change <= defaults.SETTLE_OBJECTIVE_TOLERANCE)
                streak = streak + 1 if stable else 0
                if streak >= defaults.SETTLE_PATIENCE and c["step"] >= defaults.SETTLE_MIN_STEPS:
                    found = c
                    break
            cells.append(f"{found['step']}: {100 * found['compression']:.1f}%" if found else "not settled")
        lines.append(f"| {key.split('/')[0]} | " + " | ".join(cells) + f" | {100 * checks[-1]['compression']:.1f}% |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--settings", default="default")
    ap.add_argument("--nets", default=",".join(["mlp-tabular", "mlp-digits", "chain-cnn", "residual-cnn",
                                                "concat-cnn", "lenet5-fmnist"]))
    ap.add_argument("--long", default="", help="settings also fitted for 10x the steps the auto fit took")
    ap.add_argument("--steps", type=int, default=None,
                    help="instead of --epochs auto, fit every setting for this many steps (rounded up to whole "
                         "epochs; a reference fit, stored as NETWORK/SETTING/STEPSsteps)")
    ap.add_argument("--trace", type=int, default=None, metavar="STEPS",
                    help="record what candidate settling tests see over a fit of STEPS steps (OUT.json only)")
    ap.add_argument("--replay", default=None, metavar="TRACE_JSON",
                    help="print where candidate settling tests stop the fits of a --trace file (and write OUT.md)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if args.replay:
        text = replay(json.loads(Path(args.replay).read_text()))
        print(text)
        suffixed(Path(args.out), ".md").write_text(
            "# Candidate settling tests replayed on traced fits\n\nCommand:\n\n    python benchmarks/settling.py "
            + " ".join(argv if argv is not None else sys.argv[1:]) + "\n\nStep where each test would have called the "
            "fit settled, and the compression there (slope: over the last 3 checks, fixed, or the fit's second "
            "half, half; horizon: times the steps done).\n\n" + text)
        return 0
    torch.set_num_threads(1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    path = suffixed(out, ".json")
    doc = json.loads(path.read_text()) if path.exists() else {"runs": {}, "commands": []}
    doc["commands"].append("python benchmarks/settling.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    with tempfile.TemporaryDirectory() as tmp:
        nets = suite(Path(tmp))
        for name in args.nets.split(","):
            factory, spec, epochs = nets[name]
            net, data = trained(name, factory, spec, epochs)
            base = accuracy(net, data.test)
            for setting in args.settings.split(","):
                key = f"{name}/{setting}"
                if args.trace:
                    doc["runs"][f"{key}/trace{args.trace}"] = trace(net, data, SETTINGS[setting], args.trace)
                    print(f"{key}/trace{args.trace} done", flush=True)
                    path.write_text(json.dumps(doc, indent=1) + "\n")
                    continue
                if args.steps:  # a fixed-length reference fit
                    spe = math.ceil(len(data.train) / defaults.BATCH_SIZE)
                    run = run_one(net, data, SETTINGS[setting], math.ceil(args.steps / spe))
                    run["trained_accuracy"] = base
                    doc["runs"][f"{key}/{args.steps}steps"] = run
                    print(f"{key}/{args.steps}steps", {k: run[k] for k in ("steps", "compression", "accuracy",
                                                                          "seconds")}, flush=True)
                    path.write_text(json.dumps(doc, indent=1) + "\n")
                    continue
                run = run_one(net, data, SETTINGS[setting], "auto")
                run["trained_accuracy"] = base
                doc["runs"][key] = run
                print(key, {k: run[k] for k in ("settled", "settled_at_step", "steps", "compression", "accuracy",
                                                "seconds")}, f"trained {base:.4f}", flush=True)
                if setting in args.long.split(","):
                    epochs_long = math.ceil(10 * run["steps"] / run["steps_per_epoch"])
                    long = run_one(net, data, SETTINGS[setting], epochs_long)
                    doc["runs"][key + "/10x"] = long
                    print(key + "/10x", {k: long[k] for k in ("steps", "compression", "accuracy", "seconds")}, flush=True)
                path.write_text(json.dumps(doc, indent=1) + "\n")
    suffixed(out, ".md").write_text(table(doc))
    return 0


def table(doc: dict) -> str:
    lines = ["# Settling study", "", "Commands:", ""] + [f"    {c}" for c in doc["commands"]] + [
        "", "Goal (issue 14): settled in at most 2,000 steps, compression within 5 points of a fit 10x as long, "
        "accuracy within 1 point of the trained network. Accuracies on the test split, after the default "
        "fine-tuning.", "",
        "| network | setting | settled | steps to settle | steps fitted | compression | 10x fit: steps, compression "
        "(difference) | accuracy (vs trained) | 10x fit accuracy | trained accuracy |",
        "|---|---|---|---|---|---|---|---|---|---|"]
    for key, r in doc["runs"].items():
        if key.count("/") != 1:  # 10x fits (shown with their auto fit), reference fits and traces
            continue
        name, setting = key.split("/")
        long = doc["runs"].get(key + "/10x")
        long_text = (f"{long['steps']}, {100 * long['compression']:.1f}% "
                     f"({100 * (r['compression'] - long['compression']):+.1f})") if long else "-"
        long_acc = f"{100 * long['accuracy']:.2f}%" if long else "-"
        lines.append(f"| {name} | {setting} | {'yes' if r['settled'] else 'no'} | {r['settled_at_step'] or '-'} | "
                     f"{r['steps']} | {100 * r['compression']:.1f}% | {long_text} | {100 * r['accuracy']:.2f}% "
                     f"({100 * (r['accuracy'] - r['trained_accuracy']):+.2f}) | {long_acc} | "
                     f"{100 * r['trained_accuracy']:.2f}% |")
    refs = [(k, r) for k, r in doc["runs"].items() if k.endswith("steps") and k.count("/") == 2]
    if refs:
        lines += ["", "Reference fits (--steps: a fixed number of steps, the setting's schedule spanning them):", "",
                  "| network | setting | steps | compression | accuracy (vs trained) |", "|---|---|---|---|---|"]
        for key, r in refs:
            name, setting, _ = key.split("/")
            lines.append(f"| {name} | {setting} | {r['steps']} | {100 * r['compression']:.1f}% | "
                         f"{100 * r['accuracy']:.2f}% ({100 * (r['accuracy'] - r['trained_accuracy']):+.2f}) |")
    notes = doc.get("notes")
    return "\n".join(lines + (["", notes] if notes else [])) + "\n"


if __name__ == "__main__":
    sys.exit(main())
