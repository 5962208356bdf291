"""Coverage in vision: every timm family, torchvision classification/segmentation/video/detection/
optical flow (RAFT) and YOLO, through ``check`` (random weights, ``--ratio 0.3``) and through Torch-Pruning, side by side.

The model list is made at run time: for timm, the smallest variant (by parameter count, counted on
the meta device, ``test_*`` debug configs left out) of every family timm lists (``timm.list_modules()``);
for torchvision, the smallest builder of every classification family and every segmentation, video,
detection and optical-flow builder (``weights=None, weights_backbone=None``: nothing downloads); YOLOv8n and
YOLO11n from ultralytics' model YAMLs when ultralytics is installed. Each model runs in its own
subprocess under a time limit. Per model: the stages, the reach (share of parameters in prunable
groups), the parameter ratio after pruning 30% of every group's structures at random, the proof's
and ONNX Runtime's max abs difference, the seconds; then Torch-Pruning out of the box on the same
network (``MagnitudePruner``, L2 magnitude, ``pruning_ratio=0.3``, the classifier ignored): whether
it ran and the pruned network still gives outputs of the same shapes, and its parameter ratio.

    flock /tmp/bmrs-heavy.lock python benchmarks/coverage.py --timeout 150 \
        --out benchmarks/results/coverage/cpu
    python benchmarks/coverage.py --models timm:resnet10t,torchvision:r3d_18 --no-onnx --out /tmp/cov

Writes ``<out>.json`` (per model, with the command and the machine) and ``<out>.md`` (the table).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import platform
import subprocess
import sys
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

MARK = "@@RESULT@@ "  # the child's whole result (the check, then Torch-Pruning)
CHECKED = "@@CHECKED@@ "  # the check's result alone, printed before Torch-Pruning starts
RATIO = 0.3


# -- the model list -----------------------------------------------------------------------------------

def timm_smallest() -> dict[str, str]:
    """family -> its smallest model (parameters counted on the meta device, nothing allocated)."""
    import timm
    import torch

    from bmrs_surgery.zoo import timm_families

    out = {}
    for family, names in timm_families().items():
        best = None
        for name in names:
            if name.startswith("test_"):
                continue
            try:
                with warnings.catch_warnings(), torch.device("meta"):
                    warnings.simplefilter("ignore")
                    n = sum(p.numel() for p in timm.create_model(name, pretrained=False).parameters())
            except Exception:  # noqa: BLE001 - a variant that does not build on meta
                continue
            if best is None or n < best[1]:
                best = (name, n)
        if best is not None:
            out[family] = best[0]
    return out


def torchvision_list() -> dict[str, str]:
    """kind/family -> builder: the smallest classifier of each family, every other vision builder."""
    import torch
    from torchvision import models

    from bmrs_surgery.zoo import torchvision_kind, torchvision_model

    out = {}
    smallest: dict[str, tuple[str, int]] = {}
    for name in models.list_models(module=models):
        family = name.rstrip("0123456789_").split("_")[0].rstrip("0123456789")
        try:
            with warnings.catch_warnings(), torch.device("meta"):
                warnings.simplefilter("ignore")
                n = sum(p.numel() for p in torchvision_model(name)[0].parameters())
        except Exception:  # noqa: BLE001 - a builder that initialises weights by copying: not on meta
            continue
        if family not in smallest or n < smallest[family][1]:
            smallest[family] = (name, n)
    for family, (name, _) in sorted(smallest.items()):
        out[f"classification/{family}"] = name
    for kind in ("segmentation", "video", "detection", "optical_flow"):
        for name in models.list_models(module=getattr(models, kind)):
            assert torchvision_kind(name) == kind
            out[f"{kind}/{name}"] = name
    return out


LIST_CACHE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "coverage", "timm_smallest.json")


def timm_list(refresh: bool = False) -> dict[str, str]:
    """:func:`timm_smallest`, saved beside the results with timm's version (building every timm model
    on the meta device takes minutes on 2 cores); made again when timm's version differs."""
    import timm

    if not refresh and os.path.exists(LIST_CACHE):
        with open(LIST_CACHE) as f:
            cached = json.load(f)
        if cached.get("timm") == timm.__version__:
            return cached["smallest"]
    smallest = timm_smallest()
    os.makedirs(os.path.dirname(LIST_CACHE), exist_ok=True)
    with open(LIST_CACHE, "w") as f:
        json.dump({"timm": timm.__version__, "smallest": dict(sorted(smallest.items()))}, f, indent=1)
    return smallest


def model_list(refresh: bool = False) -> list[tuple[str, str, str]]:
    """(kind, family, spec) for every model of the benchmark."""
    rows = []
    try:
        import ultralytics  # noqa: F401

        rows += [("yolo", "yolov8", "yolo:yolov8n.yaml"), ("yolo", "yolo11", "yolo:yolo11n.yaml")]
    except ImportError:
        pass
    tv = []
    for key, name in torchvision_list().items():
        kind, fam = key.split("/", 1)
        tv.append((f"torchvision {kind}", fam, f"torchvision:{name}"))
    # the slowest kinds last (a run stopped at its time limit has the most models): detectors, then
    # the torchvision classifiers (every one of them is in benchmarks/torchvision_check.py)
    rows += [r for r in tv if r[0] in ("torchvision segmentation", "torchvision video", "torchvision optical_flow")]
    rows += [("timm", fam, f"timm:{name}") for fam, name in sorted(timm_list(refresh).items())]
    rows += [r for r in tv if r[0] == "torchvision detection"]
    rows += [r for r in tv if r[0] == "torchvision classification"]
    return rows


# -- one model (child process) ------------------------------------------------------------------------

def build(spec: str):
    if spec.startswith("yolo:"):
        from bmrs_surgery.zoo import yolo_model

        return yolo_model(spec.split(":", 1)[1])
    from bmrs_surgery.loading import build_arch

    return build_arch(spec)


def torch_pruning(model, shape) -> dict:
    """Torch-Pruning out of the box: L2 magnitude, 30% of every prunable group, classifier ignored."""
    import torch
    import torch_pruning as tp

    from bmrs_surgery.inputs import output_tensors

    t = time.perf_counter()
    example = torch.randn(shape)
    with torch.no_grad():
        before = [tuple(o.shape) for o in output_tensors(model(example))]
    n0 = sum(p.numel() for p in model.parameters())
    outs = {o[-1] for o in before if len(o) == 2}  # (batch, classes): the classifier's width
    ignored = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features in outs]
    try:
        pruner = tp.pruner.MagnitudePruner(model, example, importance=tp.importance.MagnitudeImportance(p=2),
                                           pruning_ratio=RATIO, ignored_layers=ignored)
        pruner.step()
        with torch.no_grad():
            after = [tuple(o.shape) for o in output_tensors(model(example))]
    except Exception as exc:  # noqa: BLE001 - report it
        return {"ok": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}",
                "seconds": time.perf_counter() - t}
    n1 = sum(p.numel() for p in model.parameters())
    ok = after == before
    return {"ok": ok, "ratio": n1 / n0, "seconds": time.perf_counter() - t,
            "error": None if ok else f"output shapes {after} != {before}"}


def check_detector(model, shape) -> dict:
    """A detector's top level does not trace: its parts (backbone with FPN, heads) are pruned and
    proven one by one (bmrs_surgery.graph.partial), and the whole model's boxes, scores and labels
    compared with the gated model's on random images (score threshold 0, so every box counts)."""
    import torch

    from bmrs_surgery.check import randomized_copy
    from bmrs_surgery.graph.partial import compare_whole, confident_detector, prune_parts
    from bmrs_surgery.surgery import parameter_count

    t = time.perf_counter()
    model = confident_detector(randomized_copy(model, torch.Generator().manual_seed(0)).eval())
    images = torch.rand((1,) + tuple(shape), generator=torch.Generator().manual_seed(1))
    pruned, reference, parts = prune_parts(model, images, ratio=RATIO)
    n0, n1 = parameter_count(model), parameter_count(pruned)
    out = {"params_before": n0, "params_after": n1, "parts": [p.__dict__ for p in parts], "stages": {}}
    out["stages"]["parts"] = ("ok" if parts and all(p.ok for p in parts) else
                              "no traceable part" if not parts else
                              "; ".join(f"{p.name}: {list(p.stages.values())[-1]}" for p in parts if not p.ok))
    out["reach"] = sum((p.reach or 0) * p.params_before for p in parts) / n0
    out["max_abs_diff"] = max((p.max_abs_diff or 0.0 for p in parts), default=None)
    tests = [images, torch.rand((1,) + tuple(shape), generator=torch.Generator().manual_seed(2))]
    proof, float32_diff = compare_whole(reference, pruned, tests)
    out["whole_max_abs_diff"] = proof.max_abs_diff
    if float32_diff is not None:  # ranked boxes reordered by float32 rounding: compared in float64
        out["whole_proof_dtype"], out["whole_float32_max_abs_diff"] = "float64", float32_diff
    out["stages"]["whole"] = "ok" if proof.ok else f"boxes/scores differ by {proof.max_abs_diff:.3g} (scale {proof.scale:.3g})"
    out["ok"] = all(v == "ok" for v in out["stages"].values())
    out["seconds"] = {"parts": time.perf_counter() - t}
    return out


def run_one(spec: str, onnx: bool, threads: int, tp_too: bool) -> dict:
    import copy

    import torch

    from bmrs_surgery.check import check_model

    torch.set_num_threads(threads)
    t = time.perf_counter()
    model, shape = build(spec)
    model.eval()
    full = (2,) + tuple(shape)
    if spec.startswith("torchvision:"):
        from bmrs_surgery.zoo import torchvision_kind

        detector = torchvision_kind(spec.split(":", 1)[1]) == "detection"
    else:
        detector = False
    if detector:
        res = check_detector(copy.deepcopy(model), shape)
    else:
        res = check_model(copy.deepcopy(model), full, name=spec, ratio=RATIO, seed=0, onnx=onnx).to_dict()
    res["seconds_total"] = time.perf_counter() - t
    print(CHECKED + json.dumps(res, default=str), flush=True)  # kept if Torch-Pruning runs past the limit
    if tp_too:
        from bmrs_surgery.check import randomized_copy

        try:
            res["torch_pruning"] = torch_pruning(randomized_copy(model, torch.Generator().manual_seed(0)).eval(),
                                                 (1,) + tuple(shape))
        except Exception as exc:  # noqa: BLE001
            res["torch_pruning"] = {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    return res


# -- the table ----------------------------------------------------------------------------------------

def _fmt(x, spec="{:.2f}"):
    return "" if x is None else spec.format(x)


def _failure(r: dict) -> str:
    for stage, status in r.get("stages", {}).items():
        if status != "ok":
            return f"{stage}: {status}"[:110].replace("|", "/")
    return ""


def table(results: list[dict]) -> str:
    lines = ["| kind | family | model | pass | reach | ratio | proof diff | ORT diff | s | TP pass | TP ratio | failure "
             "| kept by (ratio > 0.75) |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        tp = r.get("torch_pruning") or {}
        ratio = r["params_after"] / r["params_before"] if r.get("params_after") and r.get("params_before") else None
        lines.append("| " + " | ".join([
            r["kind"], r["family"], r["spec"], "yes" if r.get("ok") else "no", _fmt(r.get("reach")), _fmt(ratio),
            _fmt(r.get("max_abs_diff"), "{:.1e}") + (" (float64)" if r.get("proof_dtype") == "float64" else "")
            + (" (whole in float64)" if r.get("whole_proof_dtype") == "float64" else ""),
            _fmt(r.get("onnx_max_abs_diff"), "{:.1e}"),
            _fmt(r.get("seconds_total"), "{:.0f}"), ("yes" if tp.get("ok") else "no") if tp else "-",
            _fmt(tp.get("ratio")),
            _failure(r) or ("" if tp.get("ok") or not tp else "TP: " + str(tp.get("error", ""))[:80].replace("|", "/")),
            kept_by(r),
        ]) + " |")
    return "\n".join(lines)


def _ratio(r: dict) -> float | None:
    return r["params_after"] / r["params_before"] if r.get("params_after") and r.get("params_before") else None


def normalised_stream(r: dict) -> bool:
    """The row's channels are held by a LayerNorm-type norm over them (a residual stream it
    normalises): ``nn.LayerNorm``/``layer_norm``, timm's ``SimpleNorm`` (LayerNorm's variance
    without its centring) or a norm over channels that no rescale keeps exact; every such rule says
    "normalises over channels" (GroupNorm "mixes channels", GRN is exact)."""
    return any("normalises over channels" in o for o in r.get("opaque") or [])


def kept_by(r: dict) -> str:
    """For a passing row that keeps more than 75% of its parameters: what holds its channels, the
    two most frequent reasons the analysis gave (norms over the stream first)."""
    ratio = _ratio(r)
    if not r.get("ok") or ratio is None or ratio <= 0.75:
        return ""
    reasons = collections.Counter(o.split(": ", 1)[-1] for o in r.get("opaque") or [])
    ranked = sorted(reasons, key=lambda k: ("normalises over channels" not in k, -reasons[k], k))
    text = "; ".join(ranked[:2]) or "nothing reported (see reach)"
    return text[:90].replace("|", "/")


def summary(results: list[dict]) -> str:
    out = []
    kinds = sorted({r["kind"] for r in results})
    for kind in kinds:
        rs = [r for r in results if r["kind"] == kind]
        ok = [r for r in rs if r.get("ok")]
        removed = [r for r in ok if r.get("params_after") and r["params_after"] / r["params_before"] <= 0.75]
        tp_ok = [r for r in rs if (r.get("torch_pruning") or {}).get("ok")]
        tp_removed = [r for r in tp_ok if r["torch_pruning"]["ratio"] <= 0.75]
        streams = [r for r in ok if r not in removed and normalised_stream(r)]
        out.append(f"| {kind} | {len(rs)} | {len(ok)} | {len(removed)} | {len(streams)} | {len(tp_ok)} | "
                   f"{len(tp_removed)} |")
    head = ["| kind | models | pass | pass, ratio <= 0.75 | pass, ratio > 0.75 with a LayerNorm-type stream | TP pass | "
            "TP pass, ratio <= 0.75 |", "|---|---|---|---|---|---|---|"]
    return "\n".join(head + out)


def _rss_gb(pid: int) -> float:
    """Resident memory of a process, in GB (0 when it has gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(ln.split()[1]) / 2**20 for ln in f if ln.startswith("VmRSS:")), 0.0)
    except OSError:
        return 0.0


def _run_child(row, args) -> dict:
    kind, family, spec = row
    cmd = [sys.executable, __file__, "--one", spec, "--threads", str(args.threads)]
    cmd += ["--no-onnx"] if args.no_onnx else []
    cmd += ["--no-tp"] if args.no_tp else []
    t = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    stopped = None
    while True:
        try:
            stdout, stderr = p.communicate(timeout=2.0)
            break
        except subprocess.TimeoutExpired:
            if time.perf_counter() - t > args.timeout:
                stopped = f"over the {args.timeout:.0f} s limit"
            elif _rss_gb(p.pid) > args.max_gb:
                stopped = f"over the {args.max_gb:g} GB memory limit"
            if stopped:
                p.kill()
                stdout, _ = p.communicate()  # what the child printed before it was stopped
                break
    checked = [ln for ln in (stdout or "").splitlines() if ln.startswith(CHECKED)]
    if stopped and checked:  # the check finished; Torch-Pruning ran past the limit
        r = json.loads(checked[-1][len(CHECKED):])
        r["torch_pruning"] = {"ok": False, "error": stopped}
    elif stopped:
        r = {"ok": False, "stages": {"run": stopped}}
    else:
        line = [ln for ln in stdout.splitlines() if ln.startswith(MARK)]
        if line:
            r = json.loads(line[-1][len(MARK):])
        else:
            last = (stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1]
            r = {"ok": False, "stages": {"run": last[:200]}}
    r.update(kind=kind, family=family, spec=spec)
    r.setdefault("seconds_total", time.perf_counter() - t)
    print(f"{spec:45s} {'PASS' if r.get('ok') else 'FAIL'} {_failure(r)[:90]}", flush=True)
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", help="comma-separated specs (timm:NAME, torchvision:NAME, yolo:YAML); default: all")
    ap.add_argument("--kinds", help="only these kinds (timm, torchvision, yolo), comma-separated")
    ap.add_argument("--exclude", help="kinds left out, comma-separated (\"torchvision detection\")")
    ap.add_argument("--no-onnx", action="store_true")
    ap.add_argument("--no-tp", action="store_true", help="skip Torch-Pruning")
    ap.add_argument("--timeout", type=float, default=150.0, help="seconds per model")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-gb", type=float, default=8.0, help="resident memory per model before it is stopped")
    ap.add_argument("--out", default="benchmarks/results/coverage/cpu")
    ap.add_argument("--jobs", type=int, default=1, help="models checked at once (each in its own process)")
    ap.add_argument("--refresh-list", action="store_true", help="make timm's family list again")
    ap.add_argument("--resume", action="store_true",
                    help="keep the finished rows of <out>.json and run only the models it lacks")
    ap.add_argument("--retry-limits", action="store_true",
                    help="with --resume, run again the models stopped at the time or memory limit")
    ap.add_argument("--rerun", help="comma-separated specs run again (after a code change) and their rows replaced "
                                    "in <out>.json, the other rows kept; the run is listed under the table")
    ap.add_argument("--after", type=int, help="with --rerun: write only once process PID (a run writing the same "
                                              "file) has ended")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rerun:
        return rerun(args)
    if args.one:
        warnings.simplefilter("ignore")
        print(MARK + json.dumps(run_one(args.one, not args.no_onnx, args.threads, not args.no_tp), default=str))
        return
    if args.models:
        rows = [("given", s.split(":", 1)[-1], s) for s in args.models.split(",")]
    else:
        rows = model_list(args.refresh_list)
    if args.kinds:  # "timm", "torchvision" or one of its kinds ("torchvision detection"), "yolo"
        wanted = args.kinds.split(",")
        rows = [r for r in rows if r[0] in wanted or r[0].split()[0] in wanted]
    if args.exclude:
        rows = [r for r in rows if r[0] not in args.exclude.split(",")]
    model_order = [r[2] for r in rows]
    started = time.time()
    results: list[dict] = []
    if args.resume and os.path.exists(args.out + ".json"):
        with open(args.out + ".json") as f:
            previous = json.load(f)
        results = [r for r in previous["results"]
                   if not (args.retry_limits and " limit" in r.get("stages", {}).get("run", ""))]
        args.earlier = previous["meta"]
        done = {r["spec"] for r in results}
        started -= previous["meta"].get("seconds", 0.0)
        print(f"resuming: {len(done)} models kept from {args.out}.json", flush=True)
        rows_all = rows
        rows = [r for r in rows if r[2] not in done]
        results = [r for r in results if r["spec"] in {x[2] for x in rows_all}]
    planned = len(rows) + len(results)

    lock = threading.Lock()

    def one(row):
        r = _run_child(row, args)
        with lock:
            results.append(r)
            _write(args, results, started, planned)  # after every model: a stopped run keeps what it did
        return r

    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        list(pool.map(one, rows))
    order = {spec: i for i, spec in enumerate(model_order)}
    results.sort(key=lambda r: order.get(r["spec"], len(order)))
    _write(args, results, started, planned)


def rerun(args) -> None:
    """``--rerun``: the given models run again, their rows of ``<out>.json`` replaced in place (the
    table keeps its order), the command recorded under ``reruns`` of the file's meta. The file is
    read after the models ran (and after process ``--after`` ended), so rows that a run still going
    wrote meanwhile are kept."""
    specs = [s for s in args.rerun.split(",") if s]
    known = {r[2]: r for r in model_list(args.refresh_list)}
    rows = [known.get(s, ("given", s.split(":", 1)[-1], s)) for s in specs]
    fresh = {}
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        for r in pool.map(lambda row: _run_child(row, args), rows):
            fresh[r["spec"]] = r
    while args.after and os.path.exists(f"/proc/{args.after}"):  # a run writing the same file: let it end
        time.sleep(5)
    with open(args.out + ".json") as f:
        doc = json.load(f)
    results = [fresh.pop(r["spec"], r) for r in doc["results"]] + list(fresh.values())
    command = " ".join([os.path.basename(sys.executable)] + sys.argv)
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    meta = dict(doc["meta"])
    meta["reruns"] = list(meta.get("reruns", [])) + [f"{', '.join(specs)}: `{command}` ({date})"]
    meta["models_done"] = len(results)
    with open(args.out + ".json", "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1, default=str)
    _write_md(args.out, meta, results)


def _resumed(meta: dict) -> str:
    """The earlier runs whose rows a --resume run kept, newest first."""
    lines, m = [], meta.get("resumed")
    while m:
        lines.append(f"Resumed from: `{m['command']}` ({m['date']}, {m['models_done']} models)")
        lines += [f"Rows re-run then: {x}" for x in m.get("reruns", [])]
        m = m.get("resumed")
    return "".join(line + "\n\n" for line in lines)


def _write(args, results: list[dict], started: float, planned: int) -> None:
    results = list(results)
    meta = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv), "date": datetime.datetime.now(
        datetime.timezone.utc).isoformat(timespec="seconds"), "machine": platform.platform(), "cpus": os.cpu_count(),
        "ratio": RATIO, "seconds": time.time() - started, "models_done": len(results), "models_planned": planned}
    if getattr(args, "earlier", None):  # --resume: the run whose finished rows were kept
        meta["resumed"] = args.earlier
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1, default=str)
    _write_md(args.out, meta, results)


def _write_md(out: str, meta: dict, results: list[dict]) -> None:
    reruns = "".join(f"Rows re-run since: {x}\n\n" for x in meta.get("reruns", []))
    with open(out + ".md", "w") as f:
        f.write(f"# Coverage at --ratio {RATIO}\n\nCommand: `{meta['command']}` ({meta['date']}, {meta['machine']}, "
                f"{meta['cpus']} CPUs, {meta['seconds']:.0f} s; {len(results)} of {meta['models_planned']} models done)"
                "\n\n" + _resumed(meta) + reruns + summary(results) + "\n\n" + table(results) + "\n")


if __name__ == "__main__":
    main()
