"""Time to score 10 million gates on the CPU: dF for BMRS_N and BMRS_U, E[theta] and SNR.

    python benchmarks/score_speed.py --n 10000000 --json benchmarks/results/score_speed/cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

from bmrs_surgery import bmrs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000_000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json")
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    # posteriors as training leaves them: mu in [-25, 5], log sigma in [-20, 5]
    mu = (torch.rand(args.n, generator=g, dtype=torch.float64) * 30 - 25).to(args.device)
    ls = (torch.rand(args.n, generator=g, dtype=torch.float64) * 25 - 20).to(args.device)
    tasks = {
        "delta_f_normal": lambda: bmrs.delta_f(mu, ls, "normal"),
        "delta_f_uniform_p8": lambda: bmrs.delta_f(mu, ls, "uniform", 8),
        "expected_theta": lambda: bmrs.expected_theta(mu, ls),
        "snr": lambda: bmrs.snr(mu, ls),
    }
    result = {"n": args.n, "device": args.device, "threads": torch.get_num_threads(),
              "torch": torch.__version__, "machine": platform.machine(), "seconds": {}, "finite": {}}
    for name, fn in tasks.items():
        out = fn()  # warm-up
        result["finite"][name] = bool(torch.isfinite(out).all())
        times = []
        for _ in range(args.repeats):
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        result["seconds"][name] = statistics.median(times)
        print(f"{name:20s} {statistics.median(times):7.3f} s for {args.n:,} gates (median of {args.repeats}), "
              f"all finite: {result['finite'][name]}")
    result["target_seconds"] = 1.0
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
