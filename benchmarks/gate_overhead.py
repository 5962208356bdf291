"""Gate overhead: a LeNet5 training step with BMRS gates vs without, same batch and device.

Both steps (forward, cross-entropy, KL for the gated one, backward, Adam step) are timed in one
run, interleaved in rounds so that machine noise hits both alike; prints medians and the ratio
for each noise mode.

    python benchmarks/gate_overhead.py --device cpu --json benchmarks/results/gate_overhead/cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

import bmrs_surgery as bmrs
from models import get_model


def make_step(model, gated: bool, x, y, device):
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step():
        out = model(x)
        loss = F.cross_entropy(out, y)
        if gated:
            loss = loss + bmrs.kl_term(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def time_steps(step, n: int, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="lenet5")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=50, help="steps per timed block")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--noise", default="sample,structure,element")
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args()
    torch.manual_seed(0)
    device = args.device
    x = torch.randn(args.batch_size, 1, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch_size,), device=device)
    plain = get_model(args.model).to(device)
    steps = {"plain": make_step(plain, False, x, y, device)}
    variants = [(n, True) for n in args.noise.split(",")]
    if device.startswith("cuda"):
        variants.append(("sample", False))  # the same gate math launched kernel by kernel
    for noise, graphs in variants:
        g = bmrs.attach_gates(get_model(args.model).to(device), x, noise=noise)
        g.bmrs_gates.cuda_graphs = graphs
        g.train()
        steps[noise if graphs else f"{noise}-eager"] = make_step(g, True, x, y, device)
    for step in steps.values():  # warm-up
        time_steps(step, 20, device)
    times = {k: [] for k in steps}
    for _ in range(args.rounds):
        for k, step in steps.items():
            times[k].append(time_steps(step, args.steps, device))
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "model": args.model,
        "device": device if not device.startswith("cuda") else torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "machine": platform.machine(),
        "median_step_ms": {k: v * 1e3 for k, v in med.items()},
        "ratio_gated_over_plain": {k: med[k] / med["plain"] for k in med if k != "plain"},
        "target_ratio": 1.5,
    }
    print(f"{args.model} training step, batch {args.batch_size}, {result['device']}")
    for k, v in med.items():
        ratio = "" if k == "plain" else f"  ratio {v / med['plain']:.2f}x"
        print(f"  {k:10s} {v * 1e3:8.3f} ms{ratio}")
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
