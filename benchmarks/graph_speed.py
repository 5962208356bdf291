"""Dependency analysis speed on the CPU: our analyse() against Torch-Pruning's DependencyGraph.

    python benchmarks/graph_speed.py --repeats 7 --json benchmarks/results/graph_speed/cpu.json \
        --md benchmarks/results/graph_speed/cpu.md

Ours: fx trace + shape propagation + channel propagation + grouping (``analyse``). Torch-Pruning:
``build_dependency`` alone, and build plus listing all groups (``get_all_groups``). Both run on the
same eval-mode model (weights=None, input 1x3x224x224), interleaved A, B, A, B after a warm-up.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
import warnings

import torch
import torch_pruning as tp
import torchvision
from torch import nn

import bmrs_surgery
from bmrs_surgery.graph.groups import analyse


def ours(model, x):
    t0 = time.perf_counter()
    a = analyse(model, x)
    return time.perf_counter() - t0, a


def torch_pruning(model, x, head):
    t0 = time.perf_counter()
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    t1 = time.perf_counter()
    groups = list(dg.get_all_groups(ignored_layers=[head], root_module_types=[nn.Conv2d, nn.Linear]))
    return t1 - t0, time.perf_counter() - t0, groups


def stats(xs):
    return {"median_s": statistics.median(xs), "min_s": min(xs), "all_s": xs}


def bench(name, repeats, warmup):
    model = getattr(torchvision.models, name)(weights=None).eval()
    head = model.fc if hasattr(model, "fc") else model.heads
    x = torch.randn(1, 3, 224, 224)
    for _ in range(warmup):
        _, a = ours(model, x)
        _, _, tg = torch_pruning(model, x, head)
    t_ours, split, t_build, t_all = [], {"trace_s": [], "shapes_s": [], "groups_s": []}, [], []
    for _ in range(repeats):
        t, a = ours(model, x)
        t_ours.append(t)
        for k in split:
            split[k].append(a.timings[k])
        b, ba, tg = torch_pruning(model, x, head)
        t_build.append(b)
        t_all.append(ba)
    r = {"ours": stats(t_ours) | {"split_median_s": {k: statistics.median(v) for k, v in split.items()}},
         "tp_build": stats(t_build), "tp_build_groups": stats(t_all),
         "ours_groups": len(a.groups), "ours_structures": sum(g.size for g in a.groups),
         "tp_groups": len(tg), "tp_channels": sum(len(g[0].idxs) for g in tg)}
    for k in ("tp_build", "tp_build_groups"):
        r[f"ratio_vs_{k}"] = {m: r["ours"][f"{m}_s"] / r[k][f"{m}_s"] for m in ("median", "min")}
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet50", "vit_b_16"])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--json")
    ap.add_argument("--md")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    print(f"torch threads: {torch.get_num_threads()}, cpu count: {os.cpu_count()}")
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": "python " + " ".join(sys.argv), "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "machine": platform.machine(), "processor": platform.processor(),
            "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "torch_pruning": tp.__version__,
            "bmrs_surgery": getattr(bmrs_surgery, "__version__", None),
            "repeats": args.repeats, "warmup": args.warmup, "target_ratio": 1.5,
            "loadavg_before": os.getloadavg()}
    results = {m: bench(m, args.repeats, args.warmup) for m in args.models}
    head = ("| model | ours median (min) s | trace / shapes / groups s | TP build median (min) s "
            "| TP build+groups median (min) s | ratio vs build median (min) | ratio vs build+groups median (min) "
            "| groups ours / TP |")
    rows = [head, "|" + "---|" * 8]
    for m, r in results.items():
        o, s = r["ours"], r["ours"]["split_median_s"]
        rows.append(f"| {m} | {o['median_s']:.3f} ({o['min_s']:.3f}) "
                    f"| {s['trace_s']:.3f} / {s['shapes_s']:.3f} / {s['groups_s']:.3f} "
                    f"| {r['tp_build']['median_s']:.3f} ({r['tp_build']['min_s']:.3f}) "
                    f"| {r['tp_build_groups']['median_s']:.3f} ({r['tp_build_groups']['min_s']:.3f}) "
                    + "".join(f"| {r[k]['median']:.2f} ({r[k]['min']:.2f}) "
                              for k in ("ratio_vs_tp_build", "ratio_vs_tp_build_groups"))
                    + f"| {r['ours_groups']} ({r['ours_structures']} structures) / "
                    f"{r['tp_groups']} ({r['tp_channels']} channels) |")
    table = "\n".join(rows)
    print(table)
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "models": results}, f, indent=2)
    if args.md:
        os.makedirs(os.path.dirname(args.md) or ".", exist_ok=True)
        with open(args.md, "w") as f:
            f.write(f"# Dependency analysis speed (CPU, {meta['threads']} threads, median of {args.repeats})\n\n"
                    f"{table}\n\nRatios are ours / Torch-Pruning {meta['torch_pruning']} (medians, mins in brackets); "
                    f"target <= 1.5. {meta['date']}.\n\n```\n{meta['command']}\n```\n")


if __name__ == "__main__":
    main()
