"""ONNX export time, dynamo against TorchScript, on the pruned models ``check`` exports (issue 17, item 5).

Each network is built with random weights and pruned exactly as ``bmrs-compress check --ratio 0.3``
does: :func:`bmrs_surgery.check.check_model` runs every stage, and its ONNX stage is intercepted to
keep the pruned model and the example it would have exported (nothing here prunes by itself). That
model is then exported with ``bmrs_surgery.export.onnx_bytes(..., exporter=K)`` for K = dynamo and
torchscript, interleaved (dynamo, torchscript, dynamo, ...) for ``--rounds`` rounds, recording
seconds, the ONNX size, node count and op-type histogram of each. Both ONNX models then run in
ONNX Runtime (``bmrs_surgery.export.session``) on the same random inputs, the example's batch and
one more row (and, for token inputs, one token fewer): the max abs difference between the two, and
of each against the torch model, relative to the output scale.

    python benchmarks/onnx_export.py [--models SPEC ...] [--rounds 3] [--threads 1]

The dynamo exporter needs ``onnxscript``, which the project does not install; without it ``auto``
falls back to TorchScript at once. Each model runs in its own process (a cold start, as ``check`` has),
under a time limit; rows go to benchmarks/results/onnx_export/rows/, cpu.json and cpu.md are rebuilt
from every row.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

OUT = Path(__file__).parent / "results" / "onnx_export"
TOKENS = "input_ids:int64:1x16 attention_mask:int64:1x16"
MODELS = [
    "torchvision:resnet18", "torchvision:resnet50", "torchvision:mobilenet_v3_large",
    "torchvision:efficientnet_b0", "torchvision:convnext_tiny", "torchvision:vit_b_16",
    "timm:vit_tiny_patch16_224", "hf:BertConfig",
]
NAMED = {"hf:BertConfig": TOKENS}  # models given named (token) inputs instead of one float tensor
KINDS = ("dynamo", "torchscript")
MARK = "@@ROW@@ "


def _slug(spec: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in spec.lower()).strip("_")


def pruned_model(spec: str):
    """(pruned model, example, check result) from check_model at ratio 0.3, seed 0."""
    import bmrs_surgery.export as export
    from bmrs_surgery.check import check_model
    from cli._common import load_network_inputs

    # what `bmrs-compress check SPEC [--input ...]` loads: the network, its input shape, named inputs
    net, shape, specs, _ = load_network_inputs(spec, None, NAMED.get(spec, "").split(), None, None, False)
    captured = {}

    def capture(model, input_shape, inputs, tolerance=1e-4):  # check's ONNX stage: keep what it would export
        captured["model"], captured["example"] = model, inputs[0]
        return 0.0

    saved = export.onnx_parity
    export.onnx_parity = capture
    try:
        res = check_model(net, shape, name=spec, ratio=0.3, seed=0, specs=specs)
    finally:
        export.onnx_parity = saved
    if "model" not in captured:
        raise RuntimeError(f"check stopped before ONNX: {res.stages}")
    return captured["model"], captured["example"], res


def graph_stats(data: bytes) -> dict:
    import onnx

    proto = onnx.load_from_string(data)
    ops = collections.Counter(n.op_type for n in proto.graph.node)
    return {"bytes": len(data), "nodes": sum(ops.values()), "functions": len(proto.functions),
            "initializers": len(proto.graph.initializer), "ops": dict(sorted(ops.items(), key=lambda kv: -kv[1])),
            "inputs": [(i.name, [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim])
                       for i in proto.graph.input]}


def feeds(example):
    """The example and a batch of one more row (and one token fewer, for token inputs)."""
    import torch

    from bmrs_surgery.export import _is_sequence

    if isinstance(example, dict):
        return [example, {k: torch.cat([v, v[:1]]) for k, v in example.items()},
                {k: v[:, :-1] if _is_sequence(v) else v for k, v in example.items()}]
    return [example, torch.cat([example, example[:1]])]


def run_ort(data: bytes, x):
    from bmrs_surgery.export import session

    sess = session(data, threads=1)
    if isinstance(x, dict):
        feed = {i.name: x[i.name].numpy() for i in sess.get_inputs()}
    else:
        feed = {sess.get_inputs()[0].name: x.float().numpy()}
    return sess.run(None, feed)[0]


def ort_latency(data: dict, x, runs: int) -> dict:
    """Median milliseconds of each graph in ONNX Runtime, one thread, runs interleaved after 2 warm-ups."""
    from bmrs_surgery.export import session

    sessions = {k: session(d, threads=1) for k, d in data.items()}
    feeds_ = {k: ({i.name: x[i.name].numpy() for i in s.get_inputs()} if isinstance(x, dict)
                  else {s.get_inputs()[0].name: x.float().numpy()}) for k, s in sessions.items()}
    times = {k: [] for k in sessions}
    for i in range(runs + 2):
        for k, s in sessions.items():
            t = time.perf_counter()
            s.run(None, feeds_[k])
            if i >= 2:
                times[k].append(time.perf_counter() - t)
    return {k: round(1000 * statistics.median(v), 2) for k, v in times.items()}


def torch_out(model, x):
    import torch

    with torch.no_grad():
        out = model(**x) if isinstance(x, dict) else model(x)
    while not isinstance(out, torch.Tensor):
        out = next(iter(out.values())) if isinstance(out, dict) else out[0]
    return out.float().numpy()


def measure(spec: str, rounds: int, threads: int, runs: int = 10) -> dict:
    import numpy as np
    import torch

    from bmrs_surgery.export import onnx_bytes

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    t = time.perf_counter()
    model, example, res = pruned_model(spec)
    row = {"model": spec, "check_stages": res.stages, "params_before": res.params_before,
           "params_after": res.params_after, "prune_seconds": round(time.perf_counter() - t, 1),
           "example": (({k: list(v.shape) for k, v in example.items()}) if isinstance(example, dict)
                       else list(example.shape))}
    times = {k: [] for k in KINDS}
    data, errors = {}, {}
    for _ in range(rounds):
        for kind in KINDS:
            if kind in errors:
                continue
            t = time.perf_counter()
            try:
                data[kind], used = onnx_bytes(model, example, kind)
                assert used == kind
            except Exception as exc:  # noqa: BLE001 - recorded
                errors[kind] = str(exc).splitlines()[0][:300]
                continue
            times[kind].append(time.perf_counter() - t)
    for kind in KINDS:
        row[kind] = ({"ok": False, "error": errors[kind]} if kind in errors else
                     {"ok": True, "seconds": [round(s, 3) for s in times[kind]],
                      "median_s": round(statistics.median(times[kind]), 3), **graph_stats(data[kind])})
    if all(row[k]["ok"] for k in KINDS):
        row["ratio_dynamo_over_torchscript"] = round(row["dynamo"]["median_s"] / row["torchscript"]["median_s"], 2)
        row["ratio_first_round"] = round(row["dynamo"]["seconds"][0] / row["torchscript"]["seconds"][0], 2)
    parity = []
    for x in feeds(example):
        ref = torch_out(model, x)
        scale = float(np.abs(ref).max()) or 1.0
        outs, entry = {}, {"batch": list(next(iter(x.values())).shape) if isinstance(x, dict) else list(x.shape),
                           "output_scale": scale}
        for kind in data:
            try:
                outs[kind] = run_ort(data[kind], x)
            except Exception as exc:  # noqa: BLE001
                entry[f"{kind}_ort_error"] = str(exc).splitlines()[0][:300]
                continue
            entry[f"{kind}_vs_torch"] = float(np.abs(outs[kind] - ref).max()) if outs[kind].shape == ref.shape else None
        if len(outs) == 2:
            a, b = outs["dynamo"], outs["torchscript"]
            entry["dynamo_vs_torchscript"] = float(np.abs(a - b).max()) if a.shape == b.shape else None
            if entry["dynamo_vs_torchscript"] is not None:
                entry["relative"] = entry["dynamo_vs_torchscript"] / scale
        parity.append(entry)
    row["parity"] = parity
    if len(data) == 2:  # the graphs' speed in ONNX Runtime (1 thread, the example), runs interleaved
        row["ort_ms"] = ort_latency(data, example, runs)
        row["ort_ratio_dynamo_over_torchscript"] = round(row["ort_ms"]["dynamo"] / row["ort_ms"]["torchscript"], 3)
    rel = [e.get("relative") for e in parity]
    row["same_outputs"] = (None if len(data) < 2 else
                           all(r is not None and r <= 1e-4 for r in rel))
    return row


def one(args) -> None:
    print(MARK + json.dumps(measure(args.one, args.rounds, args.threads, args.ort_runs)), flush=True)


def _md(meta: dict) -> str:
    lines = [
        "# ONNX export time: dynamo against TorchScript on check's pruned models (issue 17, item 5)",
        "",
        f"`{meta['command']}`  ",
        f"{meta['date']}; {meta['machine']}; torch {meta['torch']}, onnx {meta['onnx']}, onnxruntime "
        f"{meta['onnxruntime']}, onnxscript {meta['onnxscript']}; {meta['threads']} torch thread(s)",
        "",
        "Each model: random weights, pruned as `bmrs-compress check --ratio 0.3 --seed 0` does (check_model, its "
        "ONNX stage intercepted to keep the pruned model), then exported by `onnx_bytes(model, example, K)` with "
        f"K = dynamo and torchscript interleaved, {meta['rounds']} rounds, in a fresh process per model. "
        "The machine was loaded (2 cores shared with two long benchmarks): absolute seconds vary with the load; "
        "the ratios of interleaved runs are what count. `dyn/ts` is the ratio of medians, `1st` the ratio of "
        "the first (cold) round, which is what one `check` pays. `diff` is the max abs difference of the two ONNX "
        "models' outputs in ONNX Runtime on the same inputs (the example's batch, one row more, and one token "
        "fewer for token inputs), relative to the output scale. `ORT ms` is each graph's median time in ONNX Runtime "
        f"(1 thread, the example's batch, {meta.get('ort_runs', 10)} runs interleaved).",
        "",
        "| model | params after | dynamo s (median) | TorchScript s (median) | dyn/ts | 1st | MB dyn / ts "
        "| nodes dyn / ts | diff (rel) | each vs torch (max abs) | ORT ms dyn / ts |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in meta["rows"]:
        if "error" in r:
            lines.append(f"| {r['model']} | failed: {r['error']} |||||||||")
            continue
        d, t = r["dynamo"], r["torchscript"]

        def sec(x):
            return f"{x['median_s']:.2f}" if x["ok"] else f"fails: {x['error'][:80]}"

        size = (f"{d['bytes'] / 1e6:.1f} / {t['bytes'] / 1e6:.1f}" if d["ok"] and t["ok"] else "-")
        nodes = f"{d['nodes']} / {t['nodes']}" if d["ok"] and t["ok"] else "-"
        rel = max((e.get("relative") or 0.0) for e in r["parity"]) if r.get("same_outputs") is not None else None
        vs = " / ".join(f"{max((e.get(f'{k}_vs_torch') or 0.0) for e in r['parity']):.1e}" for k in KINDS
                        if r[k]["ok"])
        ort = " / ".join(f"{r['ort_ms'][k]:.1f}" for k in KINDS) if "ort_ms" in r else "-"
        lines.append(f"| {r['model']} | {r['params_after']:,} | {sec(d)} | {sec(t)} | "
                     f"{r.get('ratio_dynamo_over_torchscript', '-')} | {r.get('ratio_first_round', '-')} | {size} | "
                     f"{nodes} | {'-' if rel is None else f'{rel:.1e}'} | {vs} | {ort} |")
    lines += ["", "Op types (top 8 of each exporter):", ""]
    for r in meta["rows"]:
        if "error" in r:
            continue
        for k in KINDS:
            if r[k]["ok"]:
                top = ", ".join(f"{op} {n}" for op, n in list(r[k]["ops"].items())[:8])
                lines.append(f"- {r['model']}, {k}: {top}")
    if meta.get("notes"):
        lines += ["", *meta["notes"]]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="*", default=MODELS)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ort-runs", type=int, default=10, help="ONNX Runtime runs of each graph (interleaved)")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--rebuild", action="store_true", help="only rebuild cpu.json/cpu.md from the rows")
    args = ap.parse_args()
    if args.one:
        return one(args)
    (OUT / "rows").mkdir(parents=True, exist_ok=True)
    for spec in [] if args.rebuild else args.models:
        cmd = [sys.executable, __file__, "--one", spec, "--rounds", str(args.rounds), "--threads", str(args.threads),
               "--ort-runs", str(args.ort_runs)]
        t = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)), None)
            row = (json.loads(line[len(MARK):]) if line else
                   {"model": spec, "error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]})
        except subprocess.TimeoutExpired:
            row = {"model": spec, "error": f"did not finish in {args.timeout:g} s"}
        row["wall_s"] = round(time.perf_counter() - t, 1)
        (OUT / "rows" / f"{_slug(spec)}.json").write_text(json.dumps(row, indent=1) + "\n")
        print(spec, row.get("ratio_dynamo_over_torchscript"), row.get("error", ""), flush=True)
    import onnx
    import onnxruntime
    import torch

    try:
        import onnxscript

        oxs = onnxscript.__version__
    except ImportError:
        oxs = "not installed"
    order = {s: i for i, s in enumerate(MODELS)}
    rows = sorted((json.loads(p.read_text()) for p in (OUT / "rows").glob("*.json")),
                  key=lambda r: order.get(r["model"], len(order)))
    notes_file = OUT / "notes.md"
    meta = {"command": "PYTHONPATH=<onnxscript 0.7.2 + onnx_ir 1.1.0> nice -n 15 python benchmarks/onnx_export.py",
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}",
            "torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "onnxscript": oxs, "rounds": args.rounds, "ort_runs": args.ort_runs, "threads": args.threads, "rows": rows,
            "notes": notes_file.read_text().splitlines() if notes_file.exists() else []}
    (OUT / "cpu.json").write_text(json.dumps(meta, indent=1) + "\n")
    (OUT / "cpu.md").write_text(_md(meta))
    print(_md(meta))


if __name__ == "__main__":
    main()
