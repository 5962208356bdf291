"""report.html: one self-contained page (inline CSS, plots as embedded PNGs, no scripts, no CDN)."""

from __future__ import annotations

import base64
import html
import io
import math

from .report import printable


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


# Names in the plots come from the model (layer names): matplotlib must draw them as they are, never
# parse them as mathtext (a name like ``$\frac{`` would end the run after the network was pruned).
PLAIN_TEXT = {"text.parse_math": False, "text.usetex": False}


def _figures(doc: dict, rows: list[dict]) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    with matplotlib.rc_context(PLAIN_TEXT):
        return _draw_figures(doc, rows)


def _draw_figures(doc: dict, rows: list[dict]) -> dict[str, str]:
    import matplotlib.pyplot as plt

    figs = {}
    kept = [r for r in rows if r["keep"]]
    dropped = [r for r in rows if not r["keep"]]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    bins = [i / 40 for i in range(41)]
    ax.hist([r["expected_theta"] for r in kept], bins=bins, alpha=0.75, label=f"kept ({len(kept)})", color="#2b7bba")
    ax.hist([r["expected_theta"] for r in dropped], bins=bins, alpha=0.75, label=f"pruned ({len(dropped)})", color="#d95f02")
    ax.set_xlabel("E[theta]")
    ax.set_ylabel("structures")
    ax.legend()
    ax.set_title("Gate means")
    figs["expected_theta"] = _png(fig)

    scores = [r["score"] for r in rows if r["score"] is not None and math.isfinite(r["score"])]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    if scores:
        ax.hist(scores, bins=50, color="#555555")
    ax.axvline(0.0, color="#d95f02", linestyle="--", label="prune where dF >= 0")
    ax.set_xlabel(f"dF ({doc['criterion']})")
    ax.set_ylabel("structures")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("Change in evidence per structure")
    figs["dF"] = _png(fig)

    layers = doc["layers"]
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(layers)), 3.4))
    xs = range(len(layers))
    ax.bar([x - 0.2 for x in xs], [lay["channels_before"] for lay in layers], width=0.4, label="before", color="#bbbbbb")
    ax.bar([x + 0.2 for x in xs], [lay["channels_after"] for lay in layers], width=0.4, label="after", color="#2b7bba")
    ax.set_xticks(list(xs))
    ax.set_xticklabels([printable(lay["name"]) for lay in layers], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("channels")
    ax.legend()
    ax.set_title("Widths per group")
    figs["widths"] = _png(fig)

    sweep = doc.get("sweep")
    if sweep:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for crit, pts in sweep["curves"].items():
            ax.plot([p["compression"] * 100 for p in pts], [p["accuracy"] * 100 for p in pts], marker="o", label=crit)
        stop = sweep.get("bmrs_stop")
        if stop:
            ax.axvline(stop["compression"] * 100, color="#d95f02", linestyle="--", label="BMRS stops here")
        ax.set_xlabel("parameter compression (%)")
        ax.set_ylabel("accuracy (%)")
        ax.legend(fontsize=8)
        ax.set_title("Accuracy against compression")
        figs["sweep"] = _png(fig)
    return figs


def _fmt(v, spec=",") -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float) and spec == ",":
        return f"{v:.4g}"
    return format(v, spec)


def _table(header: list[str], body: list[list]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in body)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


CSS = """body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1000px;color:#222}
h1{font-size:1.6em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img{max-width:100%;margin:.4em 0}
.small{color:#666;font-size:.85em}"""


def _settling_paragraph(doc: dict) -> str:
    """Whether the gates settled while fitting: a settled fit's result is an answer (0% included),
    an unsettled one's is not, and the page says so first."""
    info = (doc.get("fit") or {}).get("settling")
    if doc.get("settled") is None or not info:
        return ""
    last = info.get("last_check") or {}
    if doc["settled"]:
        projected = (info.get("tolerances") or {}).get("projected")
        ahead = (f", a fit {info['horizon'] + 1:g} times as long projected to change the compression by at most "
                 f"{_share(projected)}" if projected is not None and info.get("horizon") is not None else "")
        return (f"<p>The gates <b>settled</b> after {info['settled_at_step']} optimiser steps "
                f"(decisions stable{ahead} and the objective flat, in {info['patience']} checks in a row); the fit "
                f"stopped after {info['steps']} steps ({html.escape(str(info.get('stopped')))}).</p>")
    from .settling import unsettled_message

    return (f"<p style='color:#a00'><b>The gates had not settled.</b> {html.escape(unsettled_message(info))}. "
            f"Last check: {_share(last.get('flipped'))} of the decisions flipped, {_share(last.get('projected'))} "
            "projected to.</p>")


def _share(value) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _measure(doc: dict) -> tuple[str, str]:
    """(the key of the test measure in the budget's points, its name): accuracy, or without labels
    the mean cosine to the original outputs (report.json's ``fidelity``)."""
    return ("mean_cosine", "mean cosine") if doc.get("fidelity") else ("accuracy", "accuracy")


def _budget_figure(points: list[tuple[str, float, float]], name: str = "accuracy") -> str:
    """The test measure against MACs ratio: BMRS's own stop and the budget's point."""
    import matplotlib

    matplotlib.use("Agg")
    with matplotlib.rc_context(PLAIN_TEXT):
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.2))
        for (label, x, y), color in zip(points, ("#2b7bba", "#d95f02")):
            ax.scatter([x], [y], s=50, color=color, label=label, zorder=3)
        ax.plot([p[1] for p in points], [p[2] for p in points], color="#999999", linestyle=":")
        ax.set_xlabel("MACs pruned / original")
        ax.set_ylabel(f"test {name}")
        ax.set_xlim(0, 1.05)
        ax.legend()
        ax.set_title(f"{name.capitalize()} against compression")
        return _png(fig)


def _plan_section(doc: dict) -> list[str]:
    """Which weights, widths chosen by latency, and a budget's two points (issue 18)."""
    parts = []
    w = doc.get("weights") or {}
    if w and w.get("source") != "initial":
        parts.append(f"<p class='small'>Weights: {html.escape(str(w.get('source')))} "
                     f"{html.escape(str(w.get('name') or ''))} from {html.escape(str(w.get('file')))} "
                     f"(sha256 {html.escape(str(w.get('sha256'))[:16])}...).</p>")
    plan = doc.get("plan") or {}
    if plan.get("round_to") == "auto" and plan.get("widths"):
        changed = sum(1 for c in plan["widths"].values() if c.get("chosen") != c.get("kept"))
        lt = plan.get("latency_table") or {}
        parts.append(f"<p class='small'>--round-to auto: {changed} of {len(plan['widths'])} groups widened to the "
                     f"width ONNX Runtime measured fastest ({lt.get('entries_measured', 0)} layer timings measured, "
                     f"{lt.get('entries_reused', 0)} reused from latency_table.json).</p>")
    b = plan.get("budget")
    if not b:
        return parts
    rows, points = [], []
    measure, name = _measure(doc)
    for label, key in (("BMRS's own stop (dF >= 0)", "bmrs"), (f"budget {b['option']} {b['target']:g}", "budget")):
        pt = b.get(key) or {}
        acc = pt.get(measure)
        rows.append([label, pt.get("structures_kept"), _fmt(pt.get("macs_ratio"), ".3f"), _fmt(pt.get("params_ratio"), ".3f"),
                     _fmt(pt.get("latency_ms"), ".3f") if pt.get("latency_ms") is not None else "",
                     _fmt(acc, ".4f") if acc is not None else "n/a"])
        if acc is not None and pt.get("macs_ratio") is not None:
            points.append((label, pt["macs_ratio"], acc))
    parts += ["<h2>Budget</h2>",
              f"<p>{html.escape(b['note'])}; target {'met' if b['met'] else '<b>not met</b>'}.</p>",
              _table(["point", "structures kept", "MACs ratio", "parameters ratio", "latency ms", name], rows)]
    if len(points) == 2:
        parts.append(f"<img alt='{name} against compression' src='{_budget_figure(points, name)}'>")
    return parts


def _quality_row(doc: dict) -> list:
    """The summary's test measure, before and after: accuracy, or without labels the mean cosine of
    the outputs to the original's."""
    fid = doc.get("fidelity")
    if fid:
        before, after, label = fid.get("before"), fid.get("pruned", fid.get("after")), f"{fid['metric']} (test)"
    else:
        t = doc["totals"]
        before, after, label = t.get("accuracy_before"), t.get("accuracy_pruned", t.get("accuracy_after")), "accuracy"
    return [label, _fmt(before, ".4f"), _fmt(after, ".4f"), ""]


def _fidelity_paragraph(doc: dict) -> str:
    """Without labels: what was fitted and measured (report.json's ``fidelity``)."""
    fid = doc.get("fidelity")
    if not fid:
        return ""
    return (f"<p class='small'>The data has no labels: the gates were fitted by distillation to the original model's "
            f"outputs ({html.escape(str(fid.get('output')))}; {html.escape(str(fid.get('likelihood')))}), and the test "
            f"measure is the {html.escape(str(fid.get('metric')))}: gated {_fmt(fid.get('gated'), '.4f')}, after the "
            f"decision {_fmt(fid.get('after'), '.4f')}, pruned {_fmt(fid.get('pruned'), '.4f')}.</p>")


def render(doc: dict, rows: list[dict]) -> bytes:
    figs = _figures(doc, rows)
    t = doc["totals"]
    surgery = doc.get("surgery") or {}
    counts = surgery.get("counts") or {}
    summary = [
        ["parameters", _fmt(counts.get("params_before", t["parameters"])), _fmt(counts.get("params_after")),
         _fmt(counts.get("params_ratio"), ".3f") if counts else "n/a"],
        ["MACs", _fmt(counts.get("macs_before")), _fmt(counts.get("macs_after")),
         _fmt(counts.get("macs_ratio"), ".3f") if counts else "n/a"],
        _quality_row(doc),
    ]
    bench = surgery.get("benchmark")
    if bench:
        a, b = bench["models"]
        for x, y in zip(a["batches"], b["batches"]):
            summary.append([f"ONNX Runtime latency, batch {x['batch']} (ms, median)", f"{x['median_ms']:.3f}",
                            f"{y['median_ms']:.3f}", f"{y['median_ms'] / x['median_ms']:.3f}"])
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>bmrs-surgery report: {html.escape(str(doc['model']))}</title><style>{CSS}</style></head><body>",
        f"<h1>BMRS compression of {html.escape(str(doc['model']))}</h1>",
        f"<p>criterion <b>{html.escape(doc['criterion'])}</b> ({html.escape(doc['decision_rule'])}); "
        f"data {html.escape(str(doc['data']))}; parameter compression as the paper counts it: "
        f"<b>{t['parameter_compression'] * 100:.2f}%</b>; {t['structures_after']} of {t['structures_before']} structures kept.</p>",
        _settling_paragraph(doc),
        "<h2>Summary</h2>", _table(["", "before", "after", "after / before"], summary), _fidelity_paragraph(doc),
    ]
    if surgery:
        p = surgery["proof"]
        o = surgery["onnx"]
        parts.append(f"<p class='small'>Equivalence proof: max |pruned - gated| = {p['max_abs_diff']:.3g} over "
                     f"{p['inputs']} input batches (output scale {p['output_scale']:.3g}, tolerance "
                     f"{p['tolerance']:g} x scale). ONNX opset {o['opset']} ({o['exporter']} exporter), ONNX Runtime "
                     f"vs torch: {o['onnxruntime_max_abs_diff']:.3g}.</p>")
        if bench:
            s = bench["session"]
            parts.append(f"<p class='small'>ONNX Runtime {s['onnxruntime']}, {s['provider']}, intra-op threads "
                         f"{s['intra_op_threads']}, {s['graph_optimization']}; {s['runs']} runs per batch size, "
                         f"original and pruned interleaved in {s['rounds_interleaved']} rounds.</p>")
    parts += _plan_section(doc)
    parts += [
        "<h2>Widths per group</h2>",
        _table(["group", "kind", "channels before", "channels after", "structures before", "structures after"],
               [[lay["name"], lay.get("kind", ""), lay["channels_before"], lay["channels_after"],
                 lay["structures_before"], lay["structures_after"]] for lay in doc["layers"]]),
        f"<img alt='widths per group' src='{figs['widths']}'>",
        "<h2>Gates</h2>",
        f"<img alt='histogram of E[theta]' src='{figs['expected_theta']}'>",
        f"<img alt='histogram of dF' src='{figs['dF']}'>",
    ]
    if "sweep" in figs:
        parts += ["<h2>Accuracy against compression</h2>", f"<img alt='sweep' src='{figs['sweep']}'>"]
    parts.append(f"<p class='small'>schema {html.escape(doc['schema'])}; wall time {t['wall_time_s']:.1f} s.</p>")
    parts.append("</body></html>\n")
    return "".join(parts).encode()


def sweep_page(result: dict) -> bytes:
    """A self-contained page with the sweep's curves, knees and BMRS's stopping point."""
    import matplotlib

    matplotlib.use("Agg")
    with matplotlib.rc_context(PLAIN_TEXT):
        img = _sweep_figure(result)
    stop = result.get("bmrs_stop")
    rows = []
    for crit, k in result["knees"].items():
        if k:
            rows.append([f"knee of {crit}", f"{k['compression'] * 100:.1f}", f"{k['accuracy'] * 100:.1f}"])
    if stop:
        rows.append([f"BMRS stop ({stop['criterion']})", f"{stop['compression'] * 100:.1f}", f"{stop['accuracy'] * 100:.1f}"])
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>bmrs-surgery sweep</title><style>{CSS}</style>"
            f"</head><body><h1>Sweep: {html.escape(str(result.get('model')))} on {html.escape(str(result.get('data')))}</h1>"
            f"<img alt='accuracy against compression' src='{img}'>"
            + _table(["point", "compression %", "accuracy %"], rows)
            + f"<p class='small'>{result['levels']} levels per criterion; fine-tuning epochs per level: "
              f"{result['finetune_epochs']}.</p></body></html>\n")
    return page.encode()


def _sweep_figure(result: dict) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for crit, pts in result["curves"].items():
        ax.plot([p["compression"] * 100 for p in pts], [p["accuracy"] * 100 for p in pts], marker="o", ms=3, label=crit)
    stop = result.get("bmrs_stop")
    if stop:
        ax.axvline(stop["compression"] * 100, color="#d95f02", linestyle="--", label=f"{stop['criterion']} stops")
    ax.set_xlabel("parameter compression (%)")
    ax.set_ylabel(f"{result['split']} accuracy (%)")
    ax.legend(fontsize=8)
    return _png(fig)
