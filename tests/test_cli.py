"""Tests of the ``bmrs-compress`` command line (cli).

Fast by construction: sklearn digits, one fitting epoch, no fine-tuning, in-process through
click's CliRunner; a few runs of the real console script check exit codes and stderr end to end.
Every user mistake must end in exit code 2, one ``Error:`` line on stderr, no traceback, and
nothing written to ``--out``.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import bmrs_surgery
import bmrs_surgery.loading
from bmrs_surgery.loading import CHECKPOINT_FORMAT
from bmrs_surgery.report import REPORT_SCHEMA
from cli.main import cli
from models import get_model

FAST = ["--data", "digits", "--epochs", "1", "--finetune-epochs", "0", "-q", "--bench-batch-sizes", ""]
LENET5_STRUCTURES = 6 + 16 + 120 + 84
FASHION_DIR = Path(os.environ.get("BMRS_FASHION_MNIST_DIR") or "/usr/share/datasets/fashion-mnist")
HAVE_FASHION = (FASHION_DIR / "train-images-idx3-ubyte.gz").is_file()


def _runner() -> CliRunner:
    try:  # click < 8.2 mixes stderr into stdout unless told not to
        return CliRunner(mix_stderr=False)
    except TypeError:
        return CliRunner()


def invoke(*args):
    return _runner().invoke(cli, [str(a) for a in args], catch_exceptions=True)


def ok(result):
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def assert_one_line_error(result, *fragments: str) -> str:
    """Exit 2, exactly one line on stderr starting 'Error:', no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def read_report(folder: Path) -> dict:
    return json.loads((folder / "report.json").read_text())


def read_scores(folder: Path) -> list[dict]:
    with open(folder / "scores.csv", newline="") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------------------------
# Fixtures: one real run shared by the tests, and bad input files
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, object]:
    """lenet5 fitted on digits for one epoch (BMRS_U), written to a fresh folder."""
    out = tmp_path_factory.mktemp("run") / "first"
    result = ok(invoke("lenet5", *FAST, "--prior", "uniform", "--out", out, "--bench-batch-sizes", "1,4"))
    return out, result


@pytest.fixture(scope="module")
def files(tmp_path_factory, trained) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    paths = {name: d / name for name in (
        "empty.pt", "random.pt", "half.pt", "state_dict.pt", "whole.pt", "inner.pt",
        "bad_shape.npz", "many_classes.npz", "tiny.npz", "ck_arch.pt", "ck_sites.pt", "afile",
        "nan.npz", "neg_labels.npz", "no_examples.npz", "linear.pt",
    )}
    paths["empty.pt"].write_bytes(b"")
    paths["random.pt"].write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    good = (trained[0] / "gated.pt").read_bytes()
    paths["half.pt"].write_bytes(good[: len(good) // 2])
    torch.save(get_model("lenet5").state_dict(), paths["state_dict.pt"])
    gated = bmrs_surgery.attach_gates(get_model("mlp"), torch.randn(2, 1, 32, 32))
    torch.save(gated, paths["whole.pt"])
    torch.save(gated.model, paths["inner.pt"])  # the hooked network without its gate bank
    np.savez(paths["bad_shape.npz"], x=rng.random((20, 3, 7, 7), dtype=np.float32), y=np.arange(20) % 10)
    np.savez(paths["many_classes.npz"], x=rng.random((40, 1, 32, 32), dtype=np.float32), y=np.arange(40) % 12)
    # 3 examples: the test split is empty, so test accuracy is NaN (must become JSON null)
    np.savez(paths["tiny.npz"], x=rng.random((3, 1, 32, 32), dtype=np.float32), y=np.array([0, 5, 9]))
    ck = torch.load(trained[0] / "gated.pt", weights_only=True)
    torch.save({**ck, "arch": 5}, paths["ck_arch.pt"])
    torch.save({**ck, "groups": [dict(g, taps=[dict(t, module="nope") for t in g["taps"]]) for g in ck["groups"]]},
               paths["ck_sites.pt"])
    paths["afile"].write_text("not a folder\n")
    x = rng.random((40, 1, 32, 32), dtype=np.float32)
    with_nan = x.copy()
    with_nan[3, 0, 5, 5] = np.nan
    np.savez(paths["nan.npz"], x=with_nan, y=np.arange(40) % 10)
    np.savez(paths["neg_labels.npz"], x=x, y=np.arange(40) % 10 - 1)
    np.savez(paths["no_examples.npz"], x=x[:0], y=np.zeros(0, dtype=np.int64))
    torch.save(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(1024, 10)), paths["linear.pt"])
    return paths


# ------------------------------------------------------------------------------------------------
# 1. Happy path
# ------------------------------------------------------------------------------------------------


def test_happy_path_writes_all_outputs(trained):
    out, result = trained
    assert sorted(p.name for p in out.iterdir()) == [
        "gated.pt", "pruned.onnx", "pruned.pt", "report.html", "report.json", "scores.csv"]
    assert "parameter compression" in result.stdout
    # a one-epoch fit cannot have settled, and says so in one line (nothing else on stderr)
    assert result.stderr.splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("Warning: the gates had not settled after")


def test_report_json_schema(trained):
    rep = read_report(trained[0])
    assert rep["schema"] == REPORT_SCHEMA == "bmrs-surgery/report/2"
    assert rep["model"] == "lenet5" and rep["data"] == "digits" and rep["prior"] == "uniform"
    assert rep["criterion"] == "bmrs_u8" and rep["precision_bits"] == 8
    layers = rep["layers"]
    assert [layer["structures_before"] for layer in layers] == [6, 16, 120, 84]
    for layer in layers:
        assert 0 <= layer["structures_after"] <= layer["structures_before"]
        assert set(layer["dF"]) >= {"min", "max", "median"}
    t = rep["totals"]
    assert t["structures_before"] == LENET5_STRUCTURES
    assert t["structures_after"] == sum(layer["structures_after"] for layer in layers)
    assert 0.0 <= t["parameter_compression"] <= 1.0
    assert t["parameters"] > t["parameters_removable"] >= 0
    for key in ("accuracy_before", "accuracy_gated", "accuracy_after"):
        assert isinstance(t[key], float) and 0.0 <= t[key] <= 1.0, key
    assert t["accuracy_split"] == "test"
    assert isinstance(t["wall_time_s"], float) and t["wall_time_s"] > 0
    assert rep["fit"]["config"]["epochs"] == 1 and len(rep["fit"]["history"]) == 1
    assert rep["outputs"] == {"pruned_model": "pruned.pt", "onnx": "pruned.onnx", "gated_model": "gated.pt",
                              "scores": "scores.csv", "report": "report.json", "html": "report.html"}
    sur = rep["surgery"]
    assert sur["proof"]["ok"] and sur["proof"]["max_abs_diff"] <= 1e-4 * sur["proof"]["output_scale"]
    c = sur["counts"]
    assert c["params_after"] <= c["params_before"] and c["macs_after"] <= c["macs_before"]
    assert sur["onnx"]["opset"] >= 17 and sur["onnx"]["onnxruntime_max_abs_diff"] < 1e-4
    bench = sur["benchmark"]
    assert [b["batch"] for b in bench["models"][1]["batches"]] == [1, 4]
    assert bench["session"]["graph_optimization"] == "ORT_ENABLE_ALL"
    assert t["accuracy_pruned"] == pytest.approx(t["accuracy_after"], abs=0.01)


def test_scores_csv_one_row_per_structure(trained):
    rows = read_scores(trained[0])
    assert len(rows) == LENET5_STRUCTURES
    assert set(rows[0]) == {"site", "index", "mu", "log_sigma", "expected_theta", "snr", "score", "keep"}
    kept = sum(r["keep"] == "True" for r in rows)
    assert kept == read_report(trained[0])["totals"]["structures_after"]
    for site in {r["site"] for r in rows}:  # the decision rule: prune where dF >= 0 ...
        mine = [r for r in rows if r["site"] == site]
        if any(float(r["score"]) < 0 for r in mine):
            assert all((r["keep"] == "True") == (float(r["score"]) < 0) for r in mine)
        else:  # ... except that a group never loses its last structure (its best one stays)
            assert sum(r["keep"] == "True" for r in mine) == 1


def test_pruned_outputs_load_and_compute_the_gated_network(trained):
    import onnxruntime as ort

    out = trained[0]
    pruned = torch.load(out / "pruned.pt", weights_only=False)
    assert not any(type(m).__module__.startswith("bmrs_surgery") for m in pruned.modules())
    gated = bmrs_surgery.loading.load_model(str(out / "gated.pt")).model.eval()  # masks as saved
    x = torch.randn(5, 1, 32, 32)
    with torch.no_grad():
        ref = gated(x)
        assert (pruned(x) - ref).abs().max() <= 1e-4 * ref.abs().max()
    sess = ort.InferenceSession(str(out / "pruned.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, pruned(x).numpy(), atol=1e-5)
    page = (out / "report.html").read_text()
    assert page.count("<img") >= 3 and "data:image/png;base64," in page
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert "ONNX Runtime latency, batch 4" in page


def test_gated_checkpoint_is_weights_only(trained):
    ck = torch.load(trained[0] / "gated.pt", weights_only=True)
    assert ck["format"] == CHECKPOINT_FORMAT and ck["arch"] == "lenet5"
    assert ck["input_shape"] == [1, 32, 32] and [g["name"] for g in ck["groups"]] == ["0", "3", "7", "9"]


def test_version_2_checkpoints_with_gate_sites_still_load(trained, tmp_path):
    """Files written before the groups were unified call them "sites" (with producers, norms and
    consumers stored alongside): they load into the same gated model."""
    from bmrs_surgery.loading import load_model

    ck = torch.load(trained[0] / "gated.pt", weights_only=True)
    groups = ck.pop("groups")
    ck["format"] = "bmrs-surgery/checkpoint/2"
    ck["sites"] = [{k: v for k, v in g.items() if k not in ("id", "tags")} | {"producers": [g["name"]], "norms": [],
                                                                          "consumers": []} for g in groups]
    old = tmp_path / "v2.pt"
    torch.save(ck, old)
    a, b = load_model(str(trained[0] / "gated.pt")).model, load_model(str(old)).model
    assert [g.name for g in b.bmrs_gates.groups] == ["0", "3", "7", "9"]
    assert all(x.same_structure(y) for x, y in zip(a.bmrs_gates.groups, b.bmrs_gates.groups))
    assert torch.equal(a.bmrs_gates.posterior, b.bmrs_gates.posterior)


@pytest.mark.slow
def test_json_flag_prints_report(tmp_path):
    out = tmp_path / "j"
    result = ok(invoke("lenet5", *FAST, "--prior", "normal", "--out", out, "--json"))
    printed = json.loads(result.stdout)  # stdout is nothing but the JSON document
    assert printed == read_report(out)
    assert printed["criterion"] == "bmrs_n" and printed["precision_bits"] is None


@pytest.mark.slow
def test_existing_empty_out_folder_is_used(tmp_path):
    ok(invoke("lenet5", "--data", "digits", "--epochs", "0", "--finetune-epochs", "0", "-q", "--out", tmp_path,
              "--bench-batch-sizes", ""))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "gated.pt", "pruned.onnx", "pruned.pt", "report.html", "report.json", "scores.csv"]
    rep = read_report(tmp_path)
    assert rep["fit"] is None
    # the default rule is BMRS_U-8: exact BMRS_N pruned nothing in continuous mode (paper_fmnist.md)
    assert rep["criterion"] == "bmrs_u8" and rep["prior"] == "uniform" and rep["precision_bits"] == 8


@pytest.mark.slow
def test_state_dict_with_arch(files, tmp_path):
    out = tmp_path / "sd"
    ok(invoke(files["state_dict.pt"], "--arch", "lenet5", "--data", "digits", "--epochs", "0",
              "--finetune-epochs", "0", "-q", "--out", out, "--bench-batch-sizes", ""))
    assert read_report(out)["totals"]["structures_before"] == LENET5_STRUCTURES


@pytest.mark.slow
def test_empty_test_split_gives_null_accuracy(files, tmp_path):
    """Regression: NaN accuracy used to crash json.dumps after gated.pt was already written."""
    out = tmp_path / "tiny"
    ok(invoke("lenet5", "--data", files["tiny.npz"], "--epochs", "1", "--finetune-epochs", "0", "-q",
              "--out", out))
    t = read_report(out)["totals"]
    assert t["accuracy_before"] is None and t["accuracy_after"] is None


# ------------------------------------------------------------------------------------------------
# 2. The written gated.pt loads back
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_gated_checkpoint_rescored_without_data(trained, tmp_path):
    out = tmp_path / "again"
    ok(invoke(trained[0] / "gated.pt", "--prior", "normal", "--out", out))
    rep = read_report(out)
    assert rep["criterion"] == "bmrs_n" and rep["data"] is None and rep["fit"] is None
    t = rep["totals"]
    assert t["accuracy_before"] is None and t["accuracy_gated"] is None and t["accuracy_after"] is None
    assert t["structures_before"] == LENET5_STRUCTURES
    assert len(read_scores(out)) == LENET5_STRUCTURES


@pytest.mark.slow
def test_gated_checkpoint_round_trip_same_scores(trained, tmp_path):
    """Re-scoring the saved gates with the same prior gives the scores of the run that fitted them."""
    out = tmp_path / "same"
    ok(invoke(trained[0] / "gated.pt", "--prior", "uniform", "--out", out, "-q"))
    before, after = read_scores(trained[0]), read_scores(out)
    assert [(r["site"], r["index"], r["keep"]) for r in before] == [(r["site"], r["index"], r["keep"]) for r in after]
    for a, b in zip(before, after):
        assert math.isclose(float(a["score"]), float(b["score"]), rel_tol=1e-9, abs_tol=1e-9)


@pytest.mark.slow
def test_gated_checkpoint_with_data_reports_accuracy(trained, tmp_path):
    out = tmp_path / "acc"
    result = ok(invoke(trained[0] / "gated.pt", "--data", "digits", "--out", out, "--json"))
    t = json.loads(result.stdout)["totals"]
    for key in ("accuracy_before", "accuracy_gated", "accuracy_after"):
        assert isinstance(t[key], float) and 0.0 <= t[key] <= 1.0, key
    # no fitting by default for a model with fitted gates: the gated accuracy is the first run's
    first = read_report(trained[0])["totals"]
    assert t["accuracy_gated"] == pytest.approx(first["accuracy_gated"])


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_FASHION, reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_loads_and_fits_gated_checkpoint(trained, tmp_path):
    """fashion-mnist through the CLI: loads, fits lenet5's input shape; no fitting (epochs 0)."""
    out = tmp_path / "fashion"
    result = ok(invoke(trained[0] / "gated.pt", "--data", "fashion-mnist", "--epochs", "0", "--out", out,
                       "--json"))
    rep = json.loads(result.stdout)
    assert rep["data"] == "fashion-mnist"
    assert 0.0 <= rep["totals"]["accuracy_after"] <= 1.0


# ------------------------------------------------------------------------------------------------
# 3. Pickled modules need --trust-model
# ------------------------------------------------------------------------------------------------


def test_pickled_module_refused_without_trust(files, tmp_path):
    out = tmp_path / "w"
    assert_one_line_error(invoke(files["whole.pt"], "--out", out), "--trust-model")
    assert not out.exists()


@pytest.mark.slow
def test_pickled_module_accepted_with_trust(files, tmp_path):
    out = tmp_path / "w"
    ok(invoke(files["whole.pt"], "--trust-model", "--out", out, "-q"))
    rep = read_report(out)
    assert rep["totals"]["structures_before"] == 150 + 150
    assert len(read_scores(out)) == 300
    # no architecture name: the result is a pickled module again, which also needs trust
    again = tmp_path / "w2"
    assert_one_line_error(invoke(out / "gated.pt", "--out", again), "--trust-model")
    ok(invoke(out / "gated.pt", "--trust-model", "--out", again, "-q"))


# ------------------------------------------------------------------------------------------------
# 4. Bad input: exit 2, one line, nothing written
# ------------------------------------------------------------------------------------------------

BAD_INPUTS = {
    "unknown model": (["nope", "--data", "digits"], "unknown model"),
    "missing file": (["<tmp>/missing.pt", "--data", "digits"], "does not exist"),
    "model is a folder": (["<tmp>", "--data", "digits"], "folder"),
    "empty file": (["<empty.pt>", "--data", "digits"], "empty"),
    "random bytes": (["<random.pt>", "--data", "digits"], "cannot read"),
    "truncated checkpoint": (["<half.pt>"], "cannot read"),
    "state dict without --arch": (["<state_dict.pt>", "--data", "digits"], "--arch"),
    "state dict, wrong --arch": (["<state_dict.pt>", "--arch", "mlp", "--data", "digits"], "does not match"),
    "state dict, unknown --arch": (["<state_dict.pt>", "--arch", "nope", "--data", "digits"], "unknown model"),
    "damaged checkpoint arch": (["<ck_arch.pt>"], "damaged"),
    "damaged checkpoint sites": (["<ck_sites.pt>"], "damaged"),
    "gated network without bank": (["<inner.pt>", "--trust-model", "--data", "digits"], "without its gates"),
    "unknown dataset": (["lenet5", "--data", "bogus"], "unknown dataset"),
    "missing npz": (["lenet5", "--data", "<tmp>/nothing.npz"], "not found"),
    "npz shape does not fit": (["lenet5", "--data", "<bad_shape.npz>"], "does not fit"),
    "npz too many classes": (["lenet5", "--data", "<many_classes.npz>"], "12 classes"),
    "NaN in data": (["lenet5", "--data", "<nan.npz>"], "NaN"),
    "labels out of range": (["lenet5", "--data", "<neg_labels.npz>"], "negative labels"),
    "empty dataset": (["lenet5", "--data", "<no_examples.npz>"], "empty dataset"),
    "no prunable layer": (["<linear.pt>", "--trust-model", "--data", "digits"], "no prunable structure"),
    "wrong input shape": (["torchvision:resnet18", "--data", "digits"], "does not fit"),
    "ungated model without data": (["lenet5"], "--data"),
    "unknown device": (["lenet5", *FAST, "--device", "tpu"], "--device"),
    "out is a file": (["lenet5", *FAST, "--out", "<afile>"], "is a file"),
    "out below a file": (["lenet5", *FAST, "--out", "<afile>/sub"], "is a file"),
}


def _fill(args: list[str], files: dict[str, Path], tmp: Path) -> list[str]:
    """Replace <name> by the path of that input file (<tmp>: a scratch folder)."""
    names = {**{k: str(v) for k, v in files.items()}, "tmp": str(tmp)}
    return [re.sub(r"<([^>]+)>", lambda m: names[m.group(1)], a) for a in args]


@pytest.mark.parametrize("existing", [False, True], ids=["new-out", "empty-out"])
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_one_line_exit_2_nothing_written(case, existing, files, tmp_path):
    args, fragment = BAD_INPUTS[case]
    args = _fill(args, files, tmp_path / "scratch")
    (tmp_path / "scratch").mkdir()
    out = tmp_path / "out"
    if existing:
        out.mkdir()
    if "--out" not in args:
        args = [*args, "--out", str(out)]
    before = {p: p.read_bytes() for p in files.values()}
    assert_one_line_error(invoke(*args), fragment)
    if existing:
        assert list(out.iterdir()) == []
    else:
        assert not out.exists()
    assert not (files["afile"].parent / "afile" / "sub").exists()
    assert {p: p.read_bytes() for p in files.values()} == before  # inputs untouched


def test_epochs_on_gated_model_need_data(trained, tmp_path):
    out = tmp_path / "o"
    assert_one_line_error(invoke(trained[0] / "gated.pt", "--epochs", "1", "--out", out), "--data")
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_device_without_cuda(tmp_path):
    out = tmp_path / "o"
    assert_one_line_error(invoke("lenet5", *FAST, "--device", "cuda", "--out", out), "CUDA")
    assert not out.exists()


@pytest.mark.parametrize("args, option", [
    (["--precision-bits", "0"], "--precision-bits"),
    (["--precision-bits", "23"], "--precision-bits"),
    (["--prior", "bogus"], "--prior"),
    (["--mode", "bogus"], "--mode"),
    (["--epochs", "-1"], "--epochs"),
    (["--batch-size", "0"], "--batch-size"),
])
def test_option_parsing_errors(args, option, tmp_path):
    """click's own usage errors: exit 2 and the option named on stderr (a usage block is fine)."""
    out = tmp_path / "o"
    result = invoke("lenet5", "--data", "digits", *args, "--out", out)
    assert result.exit_code == 2, result.output
    assert option in result.stderr and "Traceback" not in result.output
    assert not out.exists()


def test_missing_out_is_a_usage_error():
    result = invoke("lenet5", "--data", "digits")
    assert result.exit_code == 2 and "--out" in result.stderr


def test_read_only_out_folder_is_refused_before_any_work(tmp_path, monkeypatch):
    """As a non-root user sees a folder without write permission (root ignores the mode bits)."""
    parent = tmp_path / "ro"
    parent.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == parent else real(p, mode, **kw))
    assert_one_line_error(invoke("lenet5", *FAST, "--out", parent / "run"), "not writable")
    assert list(parent.iterdir()) == []


@pytest.mark.slow
def test_write_failure_leaves_no_folder(trained, tmp_path, monkeypatch):
    """A write error halfway (disk full, say) removes what this run created: one line, exit 2."""
    import bmrs_surgery.outputs as outputs

    real = outputs.atomic_write
    calls = []

    def flaky(path, write):
        calls.append(Path(path).name)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real(path, write)

    monkeypatch.setattr(outputs, "atomic_write", flaky)
    out = tmp_path / "new" / "out"
    assert_one_line_error(invoke(trained[0] / "gated.pt", "--out", out, "-q"), "No space left")
    assert not (tmp_path / "new").exists()


# ------------------------------------------------------------------------------------------------
# 5. Help, and the real console script
# ------------------------------------------------------------------------------------------------


def test_help():
    result = ok(invoke("--help"))
    assert "compress" in result.stdout
    result = ok(invoke("compress", "--help"))
    for option in ("--prior", "--precision-bits", "--data", "--out", "--trust-model", "--json"):
        assert option in result.stdout


def _script() -> list[str]:
    exe = shutil.which("bmrs-compress")
    if exe is None:
        candidate = Path(sys.executable).with_name("bmrs-compress")
        exe = str(candidate) if candidate.exists() else None
    if exe is None:
        pytest.skip("console script bmrs-compress not installed")
    return [exe]


@pytest.mark.slow
def test_console_script_error_is_one_line(tmp_path):
    out = tmp_path / "X"
    proc = subprocess.run([*_script(), "nope", "--out", str(out)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [proc.stderr.strip()] and proc.stderr.startswith("Error: ")
    assert "unknown model 'nope'" in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stdout == ""
    assert not out.exists()


@pytest.mark.parametrize("args, expected", [
    (["lenet5", "--prior", "flat", "--out", "X"], "Error: Invalid value for '--prior': 'flat' is not one of"),
    (["lenet5", "--bogus", "--out", "X"], "Error: No such option '--bogus'"),
    (["check", "mlp", "--ratio", "x"], "Error: Invalid value for '--ratio'"),
])
def test_console_script_option_errors_are_one_line(tmp_path, args, expected):
    """click's own usage errors (four lines by default) end like every other mistake."""
    proc = subprocess.run([sys.executable, "-c", "import sys; from cli.main import main; main(sys.argv[1:])", *args],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [proc.stderr.strip()] and proc.stderr.startswith(expected), proc.stderr
    assert "--help" in proc.stderr and not (tmp_path / "X").exists()


@pytest.mark.slow
def test_console_script_help():
    for args in (["--help"], ["compress", "--help"]):
        proc = subprocess.run([*_script(), *args], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert "Usage:" in proc.stdout


@pytest.mark.slow
def test_ctrl_c_while_starting_is_one_line_not_a_traceback(tmp_path):
    """Ctrl-C during the seconds the imports take (torch) ends with one line and exit 130."""
    import signal
    import time

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "lenet5", "--data", "digits", "--out", str(tmp_path / "o")],
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.splitlines() == ["Interrupted while starting: nothing was done"], err
    assert not (tmp_path / "o").exists()
