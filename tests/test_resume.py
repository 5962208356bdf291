"""Interruptions: a killed fit leaves the previous complete outputs (or none) and resumes exactly."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import bmrs_surgery as bmrs
from bmrs_surgery.data import load_data
from bmrs_surgery.fit import FitConfig, fit
from models import get_model

RESUME = ".bmrs-resume-*.pt"  # one per job: .bmrs-resume-<hash of the job>.pt


def _resume_states(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob(RESUME))


JOB = ["lenet5", "--data", "digits", "--epochs", "12", "--batch-size", "32", "--finetune-epochs", "1",
       "--bench-batch-sizes", "", "-q"]


def _gated(data):
    torch.manual_seed(0)
    return bmrs.attach_gates(get_model("lenet5"), data.train.tensors[0][:2])


def test_resumed_fit_is_bit_identical_to_an_uninterrupted_one():
    data = load_data("digits", limit=300)
    cfg = FitConfig(epochs=4, finetune_epochs=1, mode="continuous", prior="uniform", batch_size=32, gate_lr=1.5e-2)
    straight = _gated(data)
    fit(straight, data, cfg)

    saved = {}

    def stop_after_two(state):
        saved.update(state)
        if state["epochs_done"] == 2:
            raise KeyboardInterrupt

    first = _gated(data)
    with pytest.raises(KeyboardInterrupt):
        fit(first, data, cfg, checkpoint=stop_after_two)
    resumed = _gated(data)
    result = fit(resumed, data, cfg, resume=saved)
    assert [h.epoch for h in result.history] == [0, 1, 2, 3, 4]
    for (k, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k


def _start(out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cli.main", *JOB, "--out", str(out), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/")


def _kill_after_first_epoch(proc: subprocess.Popen, out: Path) -> tuple[int, str]:
    deadline = time.time() + 300  # generous: a loaded 2-core machine (a liveness bound, not a speed check)
    while not _resume_states(out):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "no epoch finished in 300 s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err


@pytest.mark.slow
def test_killed_fit_writes_nothing_and_resume_finishes(tmp_path):
    out = tmp_path / "out"
    rc, err = _kill_after_first_epoch(_start(out), out)
    assert rc == 130, err
    assert "Interrupted after epoch" in err and "--resume" in err and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == _resume_states(out) and len(_resume_states(out)) == 1  # no partial outputs
    done = subprocess.run([sys.executable, "-m", "cli.main", *JOB, "--out", str(out), "--resume"],
                          capture_output=True, text=True, cwd="/")
    assert done.returncode == 0, done.stderr
    names = sorted(p.name for p in out.iterdir())
    assert names == ["gated.pt", "pruned.onnx", "pruned.pt", "report.html", "report.json", "scores.csv"]
    history = json.loads((out / "report.json").read_text())["fit"]["history"]
    assert [h["epoch"] for h in history] == list(range(13))


@pytest.mark.slow
def test_killed_rerun_keeps_the_previous_complete_outputs(tmp_path):
    out = tmp_path / "out"
    first = subprocess.run([sys.executable, "-m", "cli.main", "lenet5", "--data", "digits", "--epochs",
                            "1", "--finetune-epochs", "0", "-q", "--bench-batch-sizes", "", "--out", str(out)],
                           capture_output=True, text=True, cwd="/")
    assert first.returncode == 0, first.stderr
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    rc, err = _kill_after_first_epoch(_start(out, "--overwrite"), out)
    assert rc == 130, err
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.name not in _resume_states(out)}
    assert after == before


@pytest.mark.slow
def test_resume_refuses_another_job_or_missing_state(tmp_path):
    from test_cli import assert_one_line_error, invoke

    assert_one_line_error(invoke(*JOB, "--out", tmp_path / "none", "--resume"), "no saved state")
    out = tmp_path / "out"
    rc, _ = _kill_after_first_epoch(_start(out), out)
    assert rc == 130
    other = [a if a != "32" else "64" for a in JOB]
    assert_one_line_error(invoke(*other, "--out", out, "--resume"), "different job", "batch_size")
