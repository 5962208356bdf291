"""The library pipeline: the command line and ``bmrs_surgery.compress`` are one job; one source
for every default; errors name the option as each caller knows it."""

import dataclasses
import inspect
import io
import json
import types

import pytest
import torch
from click.testing import CliRunner

import bmrs_surgery
from bmrs_surgery import defaults
from bmrs_surgery.errors import STAGES, BmrsError, JobError
from bmrs_surgery.fit import FitConfig
from cli.compress import compress as compress_cmd
from cli.main import cli

JOB = dict(model="lenet5", data="fashion-mnist-sample", epochs=1, finetune_epochs=1, batch_size=256,
           bench_batch_sizes=())
ARGS = ["lenet5", "--data", "fashion-mnist-sample", "--epochs", "1", "--finetune-epochs", "1", "--batch-size", "256",
        "--bench-batch-sizes", "", "-q"]


def _comparable(report: dict) -> dict:
    """report.json without what differs between two runs of one job (times, machine load)."""
    doc = json.loads(json.dumps(report))
    doc["totals"].pop("wall_time_s")
    doc.pop("fit", None)
    for key in ("timings", "environment"):
        doc.pop(key, None)
    return doc


def _state(data: bytes) -> dict:
    obj = torch.load(io.BytesIO(data), weights_only=False)
    return obj.state_dict() if isinstance(obj, torch.nn.Module) else obj["state_dict"]


@pytest.mark.slow
def test_cli_and_library_give_identical_outputs(tmp_path):
    result = bmrs_surgery.compress(bmrs_surgery.Job(**JOB, out=tmp_path / "lib"))
    run = CliRunner().invoke(cli, [*ARGS, "--out", str(tmp_path / "cli")], catch_exceptions=False)
    assert run.exit_code == 0, run.output
    lib, cmd = tmp_path / "lib", tmp_path / "cli"
    names = sorted(p.name for p in lib.iterdir())
    assert names == sorted(p.name for p in cmd.iterdir()) == sorted(result.files)
    assert (lib / "scores.csv").read_bytes() == (cmd / "scores.csv").read_bytes()
    a, b = json.loads((lib / "report.json").read_text()), json.loads((cmd / "report.json").read_text())
    assert _comparable(a) == _comparable(b)
    assert a["fit"]["history"][0]["loss"] == b["fit"]["history"][0]["loss"]
    for name in ("pruned.pt", "gated.pt"):
        sa, sb = _state((lib / name).read_bytes()), _state((cmd / name).read_bytes())
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    # the result holds what was written, and the pruned network is the one in pruned.pt
    assert result.files["report.json"] == (lib / "report.json").read_bytes()
    assert result.report["totals"]["parameter_compression"] == a["totals"]["parameter_compression"]
    pruned = torch.load(lib / "pruned.pt", weights_only=False)
    x = torch.randn(3, 1, 32, 32)
    assert torch.equal(pruned.eval()(x), result.pruned.eval()(x))


@pytest.mark.slow  # a whole job: fine-tuning on the 4,800-image sample, surgery, ONNX, reports
def test_a_job_without_out_writes_nothing_and_returns_the_outputs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = bmrs_surgery.compress(bmrs_surgery.Job(model="lenet5", data="fashion-mnist-sample", epochs=0,
                                                    finetune_epochs=1, batch_size=256, bench_batch_sizes=()))
    assert list(tmp_path.iterdir()) == [] and result.out is None
    assert set(result.files) == {"pruned.pt", "pruned.onnx", "gated.pt", "scores.csv", "report.json", "report.html"}
    assert result.deployment.proof.ok and result.report["surgery"]["proof"]["ok"]


def test_every_default_has_one_source():
    """Job, FitConfig, the library functions and `bmrs-compress compress --help` all show the
    values of bmrs_surgery.defaults."""
    job = {f.name: f.default for f in dataclasses.fields(bmrs_surgery.Job)}
    cfg = {f.name: f.default for f in dataclasses.fields(FitConfig)}
    for name in ("prior", "precision_bits", "mode", "finetune_epochs", "prune_every", "batch_size", "gate_lr",
                 "kl_weighting", "finetune_gates", "seed", "device", "round_to", "threads"):
        assert job[name] == getattr(defaults, name.upper()), name
    for name in ("prior", "precision_bits", "mode", "epochs", "finetune_epochs", "prune_every", "batch_size",
                 "gate_lr", "kl_weighting", "finetune_gates", "seed", "device"):
        assert cfg[name] == getattr(defaults, name.upper()), name
    # the weights' learning rate is chosen by the data: LR with labels, DISTILL_LR without
    assert job["lr"] is None and cfg["lr"] is None
    from bmrs_surgery.fit import weights_lr

    labelled, unlabelled = types.SimpleNamespace(labelled=True), types.SimpleNamespace(labelled=False)
    assert weights_lr(FitConfig(), labelled) == defaults.LR and weights_lr(FitConfig(), unlabelled) == defaults.DISTILL_LR
    assert weights_lr(FitConfig(lr=0.01), unlabelled) == 0.01
    assert job["noise"] == defaults.NOISE and job["bench_batch_sizes"] == defaults.BENCH_BATCH_SIZES
    assert job["sweep_levels"] == defaults.SWEEP_LEVELS
    assert job["max_steps"] == cfg["max_steps"] == defaults.MAX_STEPS
    for fn in (bmrs_surgery.prune, bmrs_surgery.scores):
        sig = inspect.signature(fn).parameters
        assert sig["prior"].default == defaults.PRIOR and sig["precision_bits"].default == defaults.PRECISION_BITS
    sig = inspect.signature(bmrs_surgery.attach_gates).parameters
    assert sig["noise"].default == defaults.NOISE and sig["init_log_sigma"].default == defaults.INIT_LOG_SIGMA

    shown = {p.name: p.default for p in compress_cmd.params}
    for option, name in (("prior", "PRIOR"), ("precision_bits", "PRECISION_BITS"), ("mode", "MODE"),
                         ("finetune_epochs", "FINETUNE_EPOCHS"), ("prune_every", "PRUNE_EVERY"),
                         ("batch_size", "BATCH_SIZE"), ("gate_lr", "GATE_LR"),
                         ("kl_weighting", "KL_WEIGHTING"), ("noise", "NOISE"), ("finetune_gates", "FINETUNE_GATES"),
                         ("seed", "SEED"), ("device", "DEVICE"), ("sweep_levels", "SWEEP_LEVELS"),
                         ("round_to", "ROUND_TO"), ("threads", "THREADS")):
        assert shown[option] == getattr(defaults, name), option
    assert shown["bench_batch_sizes"] == ",".join(map(str, defaults.BENCH_BATCH_SIZES))
    assert shown["max_steps"] == defaults.MAX_STEPS
    text = " ".join(CliRunner().invoke(cli, ["compress", "--help"], terminal_width=200).output.split())
    assert f"[default: {defaults.PRIOR}]" in text and f"[default: {defaults.GATE_LR}; x>0]" in text
    assert f"[default: {defaults.LR:g}; {defaults.DISTILL_LR:g} on data without labels" in text
    assert f"[default: {defaults.EPOCHS}, or 0" in text


@pytest.mark.parametrize("field, value, flag", [
    ("lr", float("nan"), "--lr"), ("gate_lr", float("inf"), "--gate-lr"), ("prior", "flat", "--prior"),
    ("round_to", 0, "--round-to"), ("precision_bits", 40, "--precision-bits"), ("batch_size", 0, "--batch-size"),
])
def test_a_bad_option_is_named_by_the_library_and_by_the_cli(field, value, flag, tmp_path):
    with pytest.raises(JobError) as caught:
        bmrs_surgery.compress(bmrs_surgery.Job(model="lenet5", data="digits", out=tmp_path / "x", **{field: value}))
    assert caught.value.param == field and caught.value.stage == "job"
    assert str(caught.value).startswith(f"{field}: ")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("flag, value", [("--lr", "nan"), ("--gate-lr", "inf"), ("--gate-lr", "nan")])
def test_a_non_finite_learning_rate_is_one_line_naming_the_flag(flag, value, tmp_path):
    run = CliRunner().invoke(cli, ["lenet5", "--data", "digits", flag, value, "--out", str(tmp_path / "o")])
    assert run.exit_code == 2 and run.stderr.strip() == f"Error: {flag}: must be a finite positive number, got {value}"
    assert not (tmp_path / "o").exists()


def test_every_error_class_names_its_stage():
    import bmrs_surgery.errors as errors

    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, BmrsError)]
    assert len(classes) >= 10
    assert all(c.stage in STAGES for c in classes)
    assert len({c.stage for c in classes if c is not BmrsError}) == len(classes) - 1  # one class per stage
