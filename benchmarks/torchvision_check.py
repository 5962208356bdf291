"""Every torchvision classification model through the dry-run check (``bmrs-compress check``).

Each model (weights=None) runs in its own subprocess under a wall-clock timeout and an address-space
limit, so one huge model cannot take the run down; a timeout, a memory error or a crash is recorded as
that model's failure. Writes ``<out>.json`` (per-model results plus metadata) and ``<out>.md`` (a table).

    python benchmarks/torchvision_check.py [--models a,b,c] [--skip-onnx] [--timeout S] \
        [--mem-gb G] [--threads N] [--out benchmarks/results/torchvision_check/cpu]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time

SIZES = {"inception_v3": 299}  # every other model takes 224 (verified with weights=None)
MARK = "@@RESULT@@ "


def build(name: str):
    import torchvision

    extra = {"init_weights": False} if name in ("inception_v3", "googlenet") else {}  # skip slow scipy init
    return torchvision.models.get_model(name, weights=None, **extra)


def rejects(model, size: int) -> bool:
    import torch

    try:
        with torch.no_grad():
            model.eval()(torch.randn(1, 3, size, size))
        return False
    except Exception:  # noqa: BLE001
        return True


def run_one(name: str, onnx: bool, threads: int) -> dict:
    """Child process: check one model and return ``CheckResult.to_dict()``."""
    import torch
    import torchvision

    from bmrs_surgery.check import check_model

    torch.set_num_threads(threads)
    model = build(name)
    size = SIZES.get(name, 224)
    res = check_model(model, (1, 3, size, size), name=name, ratio=0.3, seed=0, onnx=onnx)
    if res.stages.get("trace", "ok") != "ok" and rejects(model, size):  # the model's own size, not a failure
        size = torchvision.models.get_model_weights(name).DEFAULT.transforms().crop_size[0]
        res = check_model(model, (1, 3, size, size), name=name, ratio=0.3, seed=0, onnx=onnx)
    return res.to_dict()


def child(args) -> None:
    limit = int(args.mem_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        out = run_one(args.one, not args.skip_onnx, args.threads)
    except BaseException as exc:  # noqa: BLE001 - e.g. MemoryError while building or copying the model
        out = {"model": args.one, "ok": False, "stages": {"run": f"{type(exc).__name__}: {exc}".strip()}}
    print(MARK + json.dumps(out), flush=True)


def spawn(name: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--one", name, "--timeout", str(args.timeout),
           "--mem-gb", str(args.mem_gb), "--threads", str(args.threads)] + (["--skip-onnx"] if args.skip_onnx else [])
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        out = {"model": name, "ok": False, "stages": {"run": f"timeout after {args.timeout:g} s"}}
    else:
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
        if lines:
            out = json.loads(lines[-1][len(MARK):])
        else:
            tail = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()][-1:] or [""]
            why = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit code {proc.returncode}"
            out = {"model": name, "ok": False, "stages": {"run": f"crashed ({why}): {tail[0].strip()}"[:500]}}
    out["wall_seconds"] = round(time.perf_counter() - t, 1)
    return out


def failure(r: dict) -> tuple[str, str]:
    for stage, text in r.get("stages", {}).items():
        if text != "ok":
            return stage, text
    return "", ""


def fmt(x, spec: str) -> str:
    return "" if x is None else format(x, spec)


def markdown(results: list[dict], meta: dict) -> str:
    head = ["model", "ok", "failing stage: error", "groups", "structures", "params before", "params after",
            "params ratio", "max abs diff", "onnx diff", "seconds"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        stage, err = failure(r)
        before, after = r.get("params_before"), r.get("params_after")
        ratio = after / before if before and after is not None else None
        err = f"{stage}: {err}".replace("|", "\\|").replace("\n", " ") if stage else ""
        rows.append("| " + " | ".join([
            r["model"], "yes" if r.get("ok") else "**no**", err, str(r.get("groups", "")),
            str(r.get("structures", "")), fmt(before, ","), fmt(after, ","), fmt(ratio, ".3f"),
            fmt(r.get("max_abs_diff"), ".2g"), fmt(r.get("onnx_max_abs_diff"), ".2g"), fmt(r["wall_seconds"], ".1f"),
        ]) + " |")
    passed = sum(bool(r.get("ok")) for r in results)
    title = (f"# torchvision models through `check_model` (ratio 0.3, seed 0, ONNX {'off' if meta['skip_onnx'] else 'on'})"
             f"\n\n`{meta['command']}`  \ntorch {meta['torch']}, torchvision {meta['torchvision']}, onnxruntime "
             f"{meta['onnxruntime']}, {meta['cpu_count']} CPUs, {meta['date']}, total {meta['total_seconds']:.0f} s\n")
    return title + "\n" + "\n".join(rows) + f"\n\n**{passed} passed of {len(results)}**\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", help="comma-separated names (default: every torchvision classification model)")
    p.add_argument("--skip-onnx", action="store_true")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per model")
    p.add_argument("--mem-gb", type=float, default=16.0,  # importing torch alone maps about 3.6 GB of it
                   help="address-space limit (RLIMIT_AS) per model process, GB")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", default="benchmarks/results/torchvision_check/cpu")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        return child(args)

    import onnxruntime
    import torch
    import torchvision

    names = sorted(args.models.split(",") if args.models else torchvision.models.list_models(module=torchvision.models))
    t0, results = time.perf_counter(), []
    for i, name in enumerate(names, 1):
        r = spawn(name, args)
        results.append(r)
        stage, err = failure(r)
        status = "ok" if r.get("ok") else f"FAIL {stage}: {err}"
        print(f"[{i}/{len(names)}] {name}: {status} ({r['wall_seconds']:.1f} s)", flush=True)
    meta = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "onnxruntime": onnxruntime.__version__,
            "cpu_count": os.cpu_count(), "threads": args.threads, "timeout_s": args.timeout, "mem_gb": args.mem_gb,
            "skip_onnx": args.skip_onnx, "python": platform.python_version(), "machine": platform.machine(),
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "total_seconds": time.perf_counter() - t0}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(markdown(results, meta))
    passed = sum(bool(r.get("ok")) for r in results)
    print(f"{passed} passed of {len(results)} in {meta['total_seconds']:.0f} s -> {args.out}.json, {args.out}.md")


if __name__ == "__main__":
    main()
