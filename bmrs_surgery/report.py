"""report.json: what a compression run did, in a versioned schema, and scores.csv per structure."""

from __future__ import annotations

import csv
import io
import json
import math
import platform
from pathlib import Path

import torch

from . import bmrs
from .accounting import compression, removable_per_module
from .gated import gate_bank, network

REPORT_SCHEMA = "bmrs-surgery/report/2"


def _summary(values: torch.Tensor) -> dict:
    v = values.double()
    if v.numel() == 0:
        return {}
    return {
        "min": float(v.min()),
        "median": float(v.median()),
        "mean": float(v.mean()),
        "max": float(v.max()),
        "n_nonnegative": int((v >= 0).sum()),
    }


def structure_table(gated, decision) -> list[dict]:
    """One row per structure: its group ("site"), index, posterior, E[theta], SNR, score and decision."""
    bank = gate_bank(gated)
    mu, ls = bank.mu.detach().double().cpu(), bank.log_sigma.detach().double().cpu()
    e = bmrs.expected_theta(mu, ls, bank.a, bank.b)
    s = bmrs.snr(mu, ls, bank.a, bank.b)
    rows = []
    for i, group in enumerate(bank.groups):
        sl = bank.slice_of(i)
        for j, k in enumerate(range(sl.start, sl.stop)):
            rows.append(
                {
                    "site": group.name,
                    "index": j,
                    "mu": float(mu[k]),
                    "log_sigma": float(ls[k]),
                    "expected_theta": float(e[k]),
                    "snr": float(s[k]),
                    "score": float(decision.score[k]),
                    "keep": bool(decision.keep[k]),
                }
            )
    return rows


def printable(text) -> str:
    """``text`` safe for a terminal or a plot: every character that is not printable (escape
    sequences, newlines, carriage returns, bidi overrides; layer names come from the model) shown as
    its Python escape (``\\x1b``), so the text cannot move the cursor, recolour or hide anything."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in str(text))


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value):
    """A cell a spreadsheet shows as text: a string (a layer name, from the model) that starts like
    a formula gets a leading single quote (OWASP's rule against CSV injection); numbers stay numbers."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def scores_csv(rows: list[dict]) -> bytes:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["site"])
    writer.writeheader()
    writer.writerows({k: csv_cell(v) for k, v in row.items()} for row in rows)
    return buf.getvalue().encode()


def build_report(*, gated, decision, model_spec: str, data_spec: str | None, prior: str,
                 precision_bits: int, fit_result=None, accuracy: dict | None = None,
                 wall_time_s: float, outputs: dict, deployment=None, sweep: dict | None = None,
                 extra: dict | None = None) -> dict:
    """The report.json document (plain data); ``extra``'s entries are added at the top level
    (``weights``: which weights the network had; ``plan``: widths and budget, see budget.Planner)."""
    bank = gate_bank(gated)
    net = network(gated)
    per_module = removable_per_module(net, bank, decision.keep)
    layers = []
    for i, group in enumerate(bank.groups):
        sl = bank.slice_of(i)
        keep = decision.keep[sl]
        removable = sum(per_module[m][0] for m in group.producers + group.norms if m in per_module)
        per = group.channels_per_structure
        layers.append(
            {
                "name": group.name,
                "channels_before": group.size * per,
                "channels_after": int(keep.sum()) * per,
                "kind": group.kind,
                "gates_at": group.consumers,
                "structures_before": group.size,
                "structures_after": int(keep.sum()),
                "parameters_removable_in_layer": removable,
                "dF": _summary(decision.score[sl]),
            }
        )
    comp = compression(net, bank, decision.keep)
    acc = accuracy or {}
    return _finite({
        "schema": REPORT_SCHEMA,
        "model": model_spec,
        "data": data_spec,
        "criterion": decision.criterion,
        "prior": prior,
        "precision_bits": precision_bits if prior == "uniform" else None,
        "decision_rule": "prune where dF >= 0",
        "fit": fit_result.to_dict() if fit_result is not None else None,
        # whether the gates settled while fitting (settling.py): None when nothing was fitted here
        "settled": fit_result.settled if fit_result is not None else None,
        "layers": layers,
        "totals": {
            "structures_before": bank.num_gates,
            "structures_after": int(decision.keep.sum()),
            "parameters": comp.total,
            "parameters_removable": comp.removable,
            "parameter_compression": comp.ratio,
            "dF": _summary(decision.score),
            "accuracy_before": acc.get("before"),
            "accuracy_gated": acc.get("gated"),
            "accuracy_after": acc.get("after"),
            "accuracy_pruned": acc.get("pruned"),
            "accuracy_split": acc.get("split"),
            "wall_time_s": wall_time_s,
        },
        "surgery": _deployment(deployment),
        "sweep": sweep,
        "environment": {"torch": torch.__version__, "python": platform.python_version()},
        "outputs": outputs,
        **(extra or {}),
    })


def _deployment(dep) -> dict | None:
    if dep is None:
        return None
    from .export import OPSET

    return {
        "proof": dep.proof.to_dict(),
        "counts": dep.counts,
        "onnx": {"opset": OPSET, "exporter": dep.exporter, "dynamic_batch": True,
                 "onnxruntime_max_abs_diff": dep.onnx_max_abs_diff,
                 "size_bytes_original": len(dep.onnx_original), "size_bytes_pruned": len(dep.onnx)},
        "benchmark": dep.bench,
    }


def _finite(obj):
    """``obj`` with every NaN or infinite float replaced by None (JSON has no NaN: an empty test
    split gives accuracy NaN, a diverged fit NaN scores); tuples become lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def report_json(report: dict) -> bytes:
    """The report as strict JSON (non-finite numbers become null), indented, newline-terminated."""
    return (json.dumps(_finite(report), indent=2, allow_nan=False) + "\n").encode()


def write_bytes(path: Path, data: bytes) -> None:
    from .outputs import atomic_write

    atomic_write(path, lambda f: f.write(data))
