"""Random networks through the dry-run check: analysis, gates, surgery, proof, ONNX Runtime parity.

Draws ``--cases`` networks from the hypothesis strategies of ``tests/test_random_surgery.py``
(about 70% image networks, 30% token networks with attention; ``--token-share``), each with a
random seed and pruning ratio, and runs :func:`bmrs_surgery.check.check_model` on every one. A
case that raises or runs past ``--timeout`` seconds counts as a failure; a network without any
prunable structure counts as nothing to test. Writes ``<out>.json`` (metadata and one record per
case, with the plan's repr that rebuilds it) and ``<out>.md`` (counts, failures, group kinds).

    python benchmarks/random_surgery.py [--cases 300] [--seed 0] [--max-blocks 5] [--token-share 0.3] \
        [--skip-onnx] [--timeout 120] [--threads 2] [--out benchmarks/results/random_surgery/cpu]
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402
from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402

import test_random_surgery as gen  # noqa: E402
from bmrs_surgery.placement import analyse_model  # noqa: E402


class CaseTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise CaseTimeout("case ran past the timeout")


def run_one(case: gen.Case, onnx: bool, timeout: float) -> dict:
    """One case, never raising: a crash or a timeout is recorded as a failure in stage ``run``."""
    net = case.net
    rec = {"family": "image" if isinstance(net, gen.ImageNet) else "token", "plan": gen.describe(net),
           "repr": repr(case), "blocks": [type(p).__name__ for p in net.blocks], "seed": case.seed,
           "ratio": case.ratio, "input_shape": list(net.input_shape)}
    t = time.perf_counter()
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        model = gen.build(net, case.seed)
        _, res = gen.run_case(case, onnx=onnx, model=model)
        d = res.to_dict()
        for k in ("stages", "groups", "structures", "structures_kept", "params_before", "params_after",
                  "max_abs_diff", "onnx_max_abs_diff", "output_scale", "opaque"):
            rec[k] = d[k]
        rec["stage_seconds"] = {k: round(v, 4) for k, v in d["seconds"].items()}
        if res.stages.get("groups") == "ok":  # group kinds (check_model does not return them)
            analysis = analyse_model(model, torch.randn(net.input_shape))
            rec["group_kinds"] = sorted(g.kind for g in analysis.groups)
        if gen.nothing_to_prune(res):
            rec["status"] = "no-structure"
        else:
            rec["status"] = "passed" if res.ok else "failed"
    except BaseException as exc:  # noqa: BLE001 - a crash is this case's failure, never the run's
        if isinstance(exc, KeyboardInterrupt):
            raise
        rec["stages"] = {"run": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"}
        rec["traceback"] = traceback.format_exc()[-3000:]
        rec["status"] = "failed"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    rec["seconds"] = round(time.perf_counter() - t, 3)
    return rec


def draw_and_run(strategy, count: int, seed_value: int, onnx: bool, timeout: float, results: list, label: str,
                 total: int) -> None:
    """Draw ``count`` cases from ``strategy`` with hypothesis (generation only, no shrinking) and run each."""
    if count <= 0:
        return

    @seed(seed_value)
    @settings(max_examples=count, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def body(case):
        rec = run_one(case, onnx, timeout)
        results.append(rec)
        stage, err = failure(rec)
        status = rec["status"] if rec["status"] != "failed" else f"FAIL {stage}: {err}"
        print(f"[{len(results)}/{total}] {label} {rec['seconds']:.2f}s {status}  {rec['plan']}", flush=True)

    body()


def failure(r: dict) -> tuple[str, str]:
    for stage, text in r.get("stages", {}).items():
        if text != "ok":
            return stage, text
    return "", ""


def _esc(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def markdown(results: list[dict], meta: dict) -> str:
    c = meta["counts"]
    out = [
        "# Random networks through `check_model` (hypothesis generator of `tests/test_random_surgery.py`)",
        "",
        f"`{meta['command']}`  ",
        f"torch {meta['torch']}, onnx {meta['onnx']}, onnxruntime {meta['onnxruntime']}, hypothesis "
        f"{meta['hypothesis']}, Python {meta['python']}, {meta['cpu_count']} CPUs ({meta['threads']} torch threads), "
        f"commit {meta['commit']}, {meta['date']}, total {meta['total_seconds']:.0f} s "
        f"({meta['seconds_per_case']:.2f} s per case)",
        "",
        "| | tried | passed | failed | nothing to prune |",
        "|---|---|---|---|---|",
    ]
    for fam in ("image", "token", "all"):
        f = c[fam]
        out.append(f"| {fam} | {f['tried']} | {f['passed']} | {f['failed']} | {f['no-structure']} |")
    out.append("")
    out.append(f"Distinct plans: {meta['distinct_cases']} of {c['all']['tried']} cases. ONNX stage "
               f"{'off' if meta['skip_onnx'] else 'on'}; per-case timeout {meta['timeout_s']:g} s.")
    fails = [r for r in results if r["status"] == "failed"]
    out += ["", f"## Failures ({len(fails)})", ""]
    if fails:
        out += ["| # | network | seed | ratio | stage | error |", "|---|---|---|---|---|---|"]
        for i, r in enumerate(fails, 1):
            stage, err = failure(r)
            out.append(f"| {i} | `{_esc(r['plan'])}` | {r['seed']} | {r['ratio']} | {stage} | {_esc(err)} |")
        out += ["", "Each failing case's `repr` in the JSON rebuilds it: "
                "`gen.run_case(eval(repr))` with `tests/test_random_surgery.py` imported as `gen` "
                "(`from test_random_surgery import *`)."]
    else:
        out.append("None.")
    kinds = collections.Counter()
    kind_cases = collections.Counter()
    for r in results:
        ks = r.get("group_kinds") or []
        kinds.update(ks)
        kind_cases.update(set(ks))
    out += ["", "## Group kinds seen", "", "| group kind | groups | cases with it |", "|---|---|---|"]
    for k, n in kinds.most_common():
        out.append(f"| {k} | {n} | {kind_cases[k]} |")
    blocks = collections.Counter()
    for r in results:
        blocks.update(set(r["blocks"]))
    out += ["", "## Block kinds drawn", "", "| block | cases with it |", "|---|---|"]
    for k, n in blocks.most_common():
        out.append(f"| {k} | {n} |")
    tested = [r for r in results if r["status"] != "no-structure" and r.get("params_after")]
    if tested:
        ratios = sorted(r["params_after"] / r["params_before"] for r in tested)
        diffs = [r["max_abs_diff"] / r["output_scale"] for r in tested if r.get("max_abs_diff") is not None]
        secs = sorted(r["seconds"] for r in results)
        out += ["", "## Sizes and errors", "",
                f"- groups per case: median {sorted(r['groups'] for r in tested)[len(tested) // 2]}, "
                f"max {max(r['groups'] for r in tested)}; structures per case: max {max(r['structures'] for r in tested)}",
                f"- params after / before: min {ratios[0]:.3f}, median {ratios[len(ratios) // 2]:.3f}, max {ratios[-1]:.3f}",
                f"- max abs diff / output scale (proof): max {max(diffs):.2g}" if diffs else "- no proofs",
                f"- seconds per case: median {secs[len(secs) // 2]:.2f}, max {secs[-1]:.2f}"]
    return "\n".join(out) + "\n"


def counts(results: list[dict]) -> dict:
    out = {}
    for fam in ("image", "token", "all"):
        rs = [r for r in results if fam == "all" or r["family"] == fam]
        out[fam] = {"tried": len(rs), **{s: sum(r["status"] == s for r in rs) for s in ("passed", "failed", "no-structure")}}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-blocks", type=int, default=5, help="blocks per network at most (the CI test uses 4)")
    p.add_argument("--token-share", type=float, default=0.3, help="share of token (attention) networks")
    p.add_argument("--skip-onnx", action="store_true")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per case")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--out", default="benchmarks/results/random_surgery/cpu")
    args = p.parse_args()

    import hypothesis
    import onnx
    import onnxruntime

    torch.set_num_threads(args.threads)
    signal.signal(signal.SIGALRM, _alarm)
    n_token = round(args.cases * args.token_share)
    n_image = args.cases - n_token
    results: list[dict] = []
    t0 = time.perf_counter()
    draw_and_run(gen.image_cases(args.max_blocks), n_image, args.seed, not args.skip_onnx, args.timeout, results,
                 "image", args.cases)
    draw_and_run(gen.token_cases(args.max_blocks), n_token, args.seed + 1, not args.skip_onnx, args.timeout, results,
                 "token", args.cases)
    total = time.perf_counter() - t0
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "bmrs_surgery"],
                               cwd=ROOT, capture_output=True, text=True).stdout.split()[1::2]
        if dirty:
            commit += f" (uncommitted changes in {', '.join(dirty)})"
    except Exception:  # noqa: BLE001
        commit = "unknown"
    meta = {"command": " ".join(["python"] + [os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]),
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "commit": commit,
            "torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "hypothesis": hypothesis.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "cpu_count": os.cpu_count(), "threads": args.threads, "cases_requested": args.cases, "seed": args.seed,
            "max_blocks": args.max_blocks, "token_share": args.token_share, "skip_onnx": args.skip_onnx,
            "timeout_s": args.timeout, "total_seconds": round(total, 1),
            "seconds_per_case": total / max(1, len(results)), "counts": counts(results),
            "distinct_cases": len({r["repr"] for r in results})}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    out.with_suffix(".md").write_text(markdown(results, meta))
    c = meta["counts"]["all"]
    print(f"tried {c['tried']}, passed {c['passed']}, failed {c['failed']}, nothing to prune {c['no-structure']} "
          f"in {total:.0f} s -> {out}.json, {out}.md")


if __name__ == "__main__":
    main()
