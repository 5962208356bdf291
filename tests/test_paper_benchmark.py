"""benchmarks/paper_fmnist.py on a tiny budget: every method runs, L2 matches its reference's
compression, and a second invocation merges into the same result files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow  # benchmark scripts in subprocesses, training runs


def _run(out: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "paper_fmnist.py"), "--models", "mlp", "--seeds", "2",
           "--epochs", "8", "--finetune", "1", "--limit", "4000", "--gate-lr-factor", "60", "--out", str(out), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def test_paper_benchmark_runs_every_method_and_merges_invocations(tmp_path):
    out = tmp_path / "paper"
    r = _run(out, "--methods", "none", "bmrs_u4", "l2", "l2_layer", "--l2-match", "bmrs_u4")
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads(out.with_suffix(".json").read_text())
    runs = {(x["method"], x["seed"]): x for x in data["runs"]}
    assert sorted(runs) == [(m, s) for m in ("bmrs_u4", "l2", "l2_layer", "none") for s in (0, 1)]
    for s in (0, 1):
        assert runs[("none", s)]["compression"] == 0.0
        assert runs[("bmrs_u4", s)]["compression"] > 0.3  # 8 epochs at 60x gate lr already prune
        for l2 in ("l2", "l2_layer"):  # matched, rounded up
            assert runs[(l2, s)]["compression"] >= runs[("bmrs_u4", s)]["compression"]
        lw = runs[("l2_layer", s)]["widths"]
        assert abs(lw[0] - lw[1]) <= 1  # the same share of both 150-unit layers
        assert 0.1 < runs[("none", s)]["accuracy"] <= 1.0
        widths = runs[("bmrs_u4", s)]["widths"]  # kept structures per gate site, as the mask says
        assert len(widths) == 2 and all(1 <= k <= 150 for k in widths)
        assert sum(widths) == round(runs[("bmrs_u4", s)]["kept_fraction"] * 300)
    md = out.with_suffix(".md").read_text()
    assert "| None | 2 |" in md and "| BMRS_U-4 | 2 |" in md and "| L2 | 2 |" in md and "| L2, same share per layer | 2 |" in md
    before = out.with_suffix(".json").read_text()
    r = _run(out, "--methods", "none", "bmrs_u4", "l2", "l2_layer", "--l2-match", "bmrs_u4")
    assert r.returncode == 0 and "0 runs in" in r.stderr  # all recorded: nothing runs again
    assert json.loads(out.with_suffix(".json").read_text())["runs"] == json.loads(before)["runs"]
    r = _run(out, "--methods", "snr")  # a second invocation adds to the same files
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads(out.with_suffix(".json").read_text())
    assert len(data["runs"]) == 10 and len(data["commands"]) == 2
    assert "| SNR < 1 | 2 |" in out.with_suffix(".md").read_text()


def test_paper_benchmark_refuses_l2_without_its_reference(tmp_path):
    r = _run(tmp_path / "x", "--methods", "l2", "--l2-match", "bmrs_n")
    assert r.returncode == 2 and "needs bmrs_n" in r.stderr


def test_scratch_capacity_trains_the_cut_network(tmp_path):
    out = tmp_path / "scratch"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "scratch_capacity.py"), "--model", "mlp", "--widths", "10,96",
           "12,6", "--seeds", "1", "--epochs", "1", "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = {tuple(x["widths"]): x for x in json.loads(out.with_suffix(".json").read_text())["summary"]}
    # the paper's count at these widths: 93.00% and 93.01% of 177,910 parameters removable
    assert abs(rows[(10, 96)]["compression"] - 93.00) < 0.01 and abs(rows[(12, 6)]["compression"] - 93.01) < 0.01
    assert rows[(10, 96)]["params"] == 1025 * 10 + 11 * 96 + 97 * 10  # the shrunk network, gates gone
    assert 60 < rows[(10, 96)]["accuracy"][0] < 100  # one epoch already learns
    bad = subprocess.run(cmd[:5] + ["10"] + cmd[7:], capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "2 groups, got 1 widths" in bad.stderr
