"""Integrity of a job's inputs and outputs (issue 15, items 3-5): non-finite numbers never pass,
an output never replaces an input or an earlier run unasked, the output set is published as one
step under a lock, and each job's resume state is its own."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

import bmrs_surgery as bmrs
from bmrs_surgery import outputs
from bmrs_surgery.criteria import decision
from bmrs_surgery.data import load_data
from bmrs_surgery.errors import FitError, JobError, ModelLoadError, OutputError
from bmrs_surgery.fit import FitConfig, fit
from bmrs_surgery.outputs import OutLock, ResumeWriter, clean_stale, read_resume_state, resume_file, write_outputs
from bmrs_surgery.pipeline import OUTPUTS, check_out_contents
from bmrs_surgery.verify import check_weights
from models import get_model
from test_cli import assert_one_line_error, invoke

FAST = ["--data", "fashion-mnist-sample", "--epochs", "1", "--finetune-epochs", "0", "--batch-size", "256",
        "--bench-batch-sizes", "", "-q"]
OLD = {name: f"old {name}".encode() for name in OUTPUTS.values()}
NEW = {name: f"new {name}".encode() for name in OUTPUTS.values()}


def _contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def _nan_state_dict(path: Path) -> Path:
    state = get_model("lenet5").state_dict()
    state = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in state.items()}
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def digits():
    return load_data("digits", limit=200)


def _gated(data):
    torch.manual_seed(0)
    return bmrs.attach_gates(get_model("lenet5"), data.train.tensors[0][:2])


# ------------------------------------------------------------------------------------------------
# 3. NaN and infinities never pass


def test_an_all_nan_state_dict_is_refused_at_load_naming_the_weight(tmp_path):
    model = _nan_state_dict(tmp_path / "nan.pt")
    out = tmp_path / "o"
    assert_one_line_error(invoke(model, "--arch", "lenet5", *FAST, "--out", out), "nan.pt", "weight", "NaN")
    assert not out.exists()


def test_integer_and_complex_weights_are_refused_not_cast():
    net = nn.Linear(3, 2)
    net.weight = nn.Parameter(torch.ones(2, 3, dtype=torch.int64), requires_grad=False)
    with pytest.raises(ModelLoadError, match="parameter weight is int64"):
        check_weights(net, "m.pt")
    net = nn.Linear(3, 2)
    net.bias = nn.Parameter(torch.ones(2, dtype=torch.complex64))
    with pytest.raises(ModelLoadError, match="parameter bias is complex64"):
        check_weights(net, "m.pt")
    check_weights(nn.BatchNorm1d(3), "bn")  # an integer buffer (the batch count) is fine


def test_check_keep_weights_does_not_pass_on_nan_weights(tmp_path):
    model = _nan_state_dict(tmp_path / "nan.pt")
    result = invoke("check", model, "--arch", "lenet5", "--keep-weights", "--no-onnx")
    assert_one_line_error(result, "NaN")


@pytest.mark.parametrize("args, flag", [
    (["check", "lenet5", "--ratio", "nan", "--no-onnx"], "--ratio"),
    (["sweep", "lenet5", "--data", "digits", "--gate-lr", "inf", "--epochs", "0"], "--gate-lr"),
    (["sweep", "lenet5", "--data", "digits", "--lr", "nan"], "--lr"),
])
def test_non_finite_options_are_refused(args, flag, tmp_path):
    out = tmp_path / "o"
    result = invoke(*args, *(["--out", out] if args[0] == "sweep" else []))
    assert result.exit_code == 2, result.output
    assert flag in result.stderr and "finite" in result.stderr and "Traceback" not in result.output
    assert not out.exists()


def test_a_nan_score_never_counts_as_prune(digits):
    gated = _gated(digits)
    bank = gated.bmrs_gates
    with torch.no_grad():
        bank.posterior[0][7] = float("nan")
    name = bank.groups[1].name  # gate 7: the second structure of the second group
    for criterion in ("bmrs_u", "bmrs_n", "snr"):
        with pytest.raises(FitError, match=f"structure 1 of group {name}"):
            decision(gated, criterion)


def test_a_criterion_scoring_nan_stops_naming_the_group(digits):
    from bmrs_surgery.criteria import Decision, register_criterion

    @register_criterion("test_integrity_nan")
    def _nan(model, bank, **_):
        score = torch.zeros(bank.num_gates, dtype=torch.float64)
        score[bank.slice_of(2).start + 4] = float("nan")
        return Decision("test_integrity_nan", score, score < 0)

    gated = _gated(digits)
    with pytest.raises(FitError, match=f"score of structure 4 of group {gated.bmrs_gates.groups[2].name} is nan"):
        decision(gated, "test_integrity_nan")


def test_a_non_finite_loss_stops_the_fit_naming_epoch_and_step(digits):
    gated = _gated(digits)
    with torch.no_grad():
        next(p for n, p in gated.named_parameters() if "bmrs_gates" not in n and n.endswith("weight")).fill_(float("inf"))
    saved = []
    with pytest.raises(FitError, match=r"epoch 0 \(fit\), step 0"):
        fit(gated, digits, FitConfig(epochs=2, finetune_epochs=0, batch_size=64), checkpoint=saved.append)
    assert saved == []  # no resume state with the diverged weights


def test_a_nan_resume_state_is_refused(tmp_path, digits):
    gated = _gated(digits)
    state = {k: v.clone() for k, v in gated.state_dict().items()}
    next(v for v in state.values() if v.is_floating_point()).fill_(float("nan"))
    key = {"model": "lenet5", "batch_size": 32}
    ResumeWriter(tmp_path, key)({"epochs_done": 1, "model": state, "optimizer": {}, "history": []})
    with pytest.raises(FitError, match="NaN in model"):
        read_resume_state(tmp_path, key)


def test_a_non_finite_output_stops_the_run_before_surgery(tmp_path):
    from bmrs_surgery.errors import SurgeryError
    from bmrs_surgery.loading import save_checkpoint

    gated = bmrs.attach_gates(get_model("lenet5"), torch.randn(2, 1, 32, 32))
    with torch.no_grad():
        for n, p in gated.named_parameters():
            if "bmrs_gates" not in n and n.endswith("weight"):
                p.fill_(1e30)  # finite weights, outputs overflow to infinity
    save_checkpoint(gated, tmp_path / "big.pt", "lenet5", (1, 32, 32))
    with pytest.raises(SurgeryError, match="gated network's output on random input 0 holds"):
        bmrs.compress(bmrs.Job(model=str(tmp_path / "big.pt"), bench_batch_sizes=()))


def test_resume_from_a_nan_state_is_one_line_not_exit_0(tmp_path, digits):
    from bmrs_surgery.pipeline import resume_key

    out = tmp_path / "o"
    job = bmrs.Job(model="lenet5", data="fashion-mnist-sample", epochs=1, finetune_epochs=0, batch_size=256)
    state = {k: v.clone() for k, v in _gated(digits).state_dict().items()}
    next(v for v in state.values() if v.is_floating_point()).fill_(float("nan"))
    writer = ResumeWriter(out, resume_key(job, job.fit_config(1)))
    writer({"epochs_done": 1, "model": state, "optimizer": {}, "history": []})
    assert_one_line_error(invoke("lenet5", *FAST, "--out", out, "--resume"), "--resume", "NaN in model")
    assert sorted(p.name for p in out.iterdir()) == [writer.path.name]


# ------------------------------------------------------------------------------------------------
# 4. An output never replaces an input, nor an earlier run unasked


@pytest.mark.parametrize("name", ["pruned.pt", "gated.pt"])
def test_out_holding_the_model_file_is_refused_before_any_work(name, tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    model = d / name
    torch.save(get_model("lenet5"), model)
    before = _contents(d)
    for extra in ([], ["--overwrite"]):
        assert_one_line_error(invoke(model, "--trust-model", *FAST, "--out", d, *extra), "--out", name, "replace")
        assert _contents(d) == before


def test_out_holding_the_data_file_is_refused(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "scores.csv").write_text("x")
    with pytest.raises(JobError, match="data file") as caught:
        check_out_contents(bmrs.Job(model="lenet5", data=str(out / "scores.csv"), out=out, overwrite=True), out)
    assert caught.value.param == "out"


def test_earlier_results_need_overwrite_or_resume(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "report.json").write_text("{}")
    assert_one_line_error(invoke("lenet5", *FAST, "--out", out), "--out", "earlier run", "report.json", "--overwrite")
    assert _contents(out) == {"report.json": b"{}"}
    check_out_contents(bmrs.Job(model="lenet5", out=out, overwrite=True), out)
    check_out_contents(bmrs.Job(model="lenet5", out=out, resume=True), out)


# ------------------------------------------------------------------------------------------------
# 5. One output set, published as one step, one job per folder, one resume state per job


def test_an_interrupted_publish_leaves_the_complete_old_set(tmp_path, monkeypatch):
    out = tmp_path / "o"
    write_outputs(out, OLD)
    real, calls = os.replace, []

    def interrupted(src, dst):
        calls.append(dst)
        if len(calls) == len(OLD) + 3:  # old files moved aside, three new ones in place
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(outputs.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_outputs(out, NEW)
    monkeypatch.undo()
    assert _contents(out) == OLD  # no staging or backup folder left either
    write_outputs(out, NEW)
    assert _contents(out) == NEW


def test_a_publish_killed_outright_is_rolled_back_by_the_next_job(tmp_path):
    out = tmp_path / "o"
    write_outputs(out, OLD)
    names = list(NEW)
    backup = out / f"{outputs.BACKUP_PREFIX}x"  # what SIGKILL halfway through the renames leaves
    backup.mkdir()
    (backup / outputs.MANIFEST).write_text(json.dumps({"names": names, "old": names}))
    for n in names:
        os.replace(out / n, backup / n)
    for n in names[:2]:
        (out / n).write_bytes(NEW[n])
    (out / ".pruned.pt.abc123.tmp").write_bytes(b"half")  # atomic_write's temporary, killed
    (out / f"{outputs.STAGING_PREFIX}y").mkdir()
    (out / ".notes.tmp").write_text("the user's own")
    clean_stale(out, names)
    assert _contents(out) == {**OLD, ".notes.tmp": b"the user's own"}


def test_a_second_job_into_a_locked_out_fails_at_once(tmp_path):
    out = tmp_path / "o"
    with OutLock(out):
        assert (out / outputs.LOCK_FILE).exists()
        with pytest.raises(OutputError, match="in use by another job") as caught:
            bmrs.compress(bmrs.Job(model="lenet5", data="digits", epochs=1, out=out))
        assert caught.value.param == "out"
        assert_one_line_error(invoke("lenet5", *FAST, "--out", out), "--out", str(out), "in use")
    assert not out.exists()  # the lock made the folder, and the job left nothing: both gone


def test_each_job_has_its_own_resume_state(tmp_path):
    a, b = {"model": "lenet5", "batch_size": 32}, {"model": "lenet5", "batch_size": 64}
    assert resume_file(a) != resume_file(b) and resume_file(a) == resume_file(dict(a))
    ResumeWriter(tmp_path, a)({"epochs_done": 1, "model": {}, "optimizer": {}, "history": []})
    ResumeWriter(tmp_path, b)({"epochs_done": 2, "model": {}, "optimizer": {}, "history": []})
    assert read_resume_state(tmp_path, a)["epochs_done"] == 1
    assert read_resume_state(tmp_path, b)["epochs_done"] == 2
    with pytest.raises(FitError, match="different job .*batch_size"):
        read_resume_state(tmp_path, {"model": "lenet5", "batch_size": 16})


@pytest.mark.slow
def test_a_finishing_job_deletes_only_its_own_resume_state(tmp_path):
    out = tmp_path / "o"
    other = {"model": "mlp", "batch_size": 7}
    ResumeWriter(out, other)({"epochs_done": 1, "model": {}, "optimizer": {}, "history": []})
    result = bmrs.compress(bmrs.Job(model="lenet5", data="fashion-mnist-sample", epochs=1, finetune_epochs=0,
                                    batch_size=256, bench_batch_sizes=(), out=out))
    assert result.files is not None
    assert sorted(p.name for p in out.iterdir()) == sorted([*OUTPUTS.values(), resume_file(other)])
