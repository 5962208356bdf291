"""Hostile inputs (project issue 15, items 1 and 2).

1. A checkpoint chooses no code: a ``gated.pt`` may name only architectures the toolkit knows
   (bundled names, ``torchvision:NAME``) with bounded sizes; a ``module:factory`` in a file is built
   only when the user names the same one (``--arch``) or trusts the file (``--trust-model``); user
   code that exits is a one-line error; a bundled name is never hijacked by a file of that name.
2. Names from a model (layer names) never become terminal markup, escape sequences, spreadsheet
   formulas, matplotlib mathtext or broken torch.fx code.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from bmrs_surgery.errors import ModelLoadError
from bmrs_surgery.loading import CHECKPOINT_FORMAT, load_model, save_checkpoint
from models import get_model
from test_cli import FAST, LENET5_STRUCTURES, assert_one_line_error, invoke, ok

REPO = Path(__file__).resolve().parent.parent


def crafted_checkpoint(path: Path, arch, *, num_classes=None, input_shape=(1, 32, 32), **extra) -> Path:
    """A file in our checkpoint format that names ``arch`` (no gates, no weights: the architecture is
    all that matters, it is what a crafted file chooses)."""
    ck = {"format": CHECKPOINT_FORMAT, "arch": arch, "num_classes": num_classes,
          "input_shape": list(input_shape) if input_shape else None, "groups": [], "traced": False,
          "noise": None, "state_dict": {}, **extra}
    torch.save(ck, path)
    return path


@pytest.fixture()
def marker_module(tmp_path, monkeypatch):
    """A module on sys.path whose import writes ``imported`` and whose factory writes ``called``."""
    name = "bmrs_hostile_marker_mod"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from torch import nn
        Path({str(tmp_path / "imported")!r}).write_text("import-time code ran")
        def net(num_classes=10):
            Path({str(tmp_path / "called")!r}).write_text("factory ran")
            return nn.Sequential(nn.Flatten(), nn.Linear(1024, 32), nn.ReLU(), nn.Linear(32, num_classes))
        def quits():
            sys.exit(0)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


# ------------------------------------------------------------------------------------------------
# 1. A checkpoint chooses no code
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["sys:exit", "builtins:exit", "os:getcwd", "importlib:import_module"])
def test_checkpoint_naming_code_is_refused_one_line_nothing_written(tmp_path, arch):
    ck = crafted_checkpoint(tmp_path / "gated.pt", arch)
    out = tmp_path / "run"
    line = assert_one_line_error(invoke(ck, *FAST, "--out", out), "--trust-model", repr(arch))
    assert "damaged" not in line
    assert not out.exists()


def test_checkpoint_naming_a_module_does_not_import_it(tmp_path, marker_module):
    ck = crafted_checkpoint(tmp_path / "gated.pt", f"{marker_module}:net")
    out = tmp_path / "run"
    assert_one_line_error(invoke(ck, *FAST, "--out", out), "--trust-model")
    assert_one_line_error(invoke("inspect", ck), "--trust-model")
    with pytest.raises(ModelLoadError, match="--arch"):
        load_model(str(ck))
    assert not (tmp_path / "imported").exists() and not (tmp_path / "called").exists()
    assert marker_module not in sys.modules
    assert not out.exists()


@pytest.mark.parametrize("arch", ["os:abort", "signal:pause", "http.server:test"])
def test_checkpoint_naming_crashing_or_hanging_code_is_refused(tmp_path, arch):
    """Before the fix these crashed the process (abort) or hung (pause, a listening server)."""
    ck = crafted_checkpoint(tmp_path / "gated.pt", arch)
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "cli.main", str(ck), "--data", "digits", "-q", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "--trust-model" in lines[0], proc.stderr
    assert not out.exists()


def test_checkpoint_factory_runs_when_the_user_names_it_or_trusts_the_file(tmp_path, marker_module):
    net = __import__(marker_module).net()
    path = tmp_path / "gated.pt"
    save_checkpoint(net, path, f"{marker_module}:net", (1, 32, 32))
    with pytest.raises(ModelLoadError, match="--trust-model"):
        load_model(str(path), arch="lenet5")  # another architecture is not the user's consent
    for loaded in (load_model(str(path), arch=f"{marker_module}:net"), load_model(str(path), trust=True)):
        assert loaded.arch == f"{marker_module}:net"
        for k, v in net.state_dict().items():
            assert torch.equal(loaded.model.state_dict()[k], v)


@pytest.mark.parametrize("arch", ["torchvision:resnet18", "lenet5"])
@pytest.mark.parametrize("num_classes", [10**9, 100_001, 0, -3])
def test_checkpoint_num_classes_is_bounded(tmp_path, arch, num_classes):
    ck = crafted_checkpoint(tmp_path / "gated.pt", arch, num_classes=num_classes)
    out = tmp_path / "run"
    assert_one_line_error(invoke(ck, *FAST, "--out", out), "num_classes", "100,000")
    assert not out.exists()


def test_checkpoint_input_shape_is_bounded(tmp_path):
    ck = crafted_checkpoint(tmp_path / "gated.pt", "lenet5", input_shape=(3, 100_000, 100_000))
    with pytest.raises(ModelLoadError, match="too large"):
        load_model(str(ck))


@pytest.mark.parametrize("arch", ["torchvision:no_such_net", "torchvision:list_models", "torchvision:", "nonsense"])
def test_checkpoint_unknown_architecture_is_one_line(tmp_path, arch):
    ck = crafted_checkpoint(tmp_path / "gated.pt", arch)
    assert_one_line_error(invoke("inspect", ck), "unknown")


@pytest.mark.parametrize("spec", ["sys:exit", "builtins:exit", "bmrs_hostile_marker_mod:quits"])
def test_user_factory_that_exits_is_one_line_error(tmp_path, marker_module, spec):
    """``SystemExit`` from the user's own factory (typed by the user) ends in exit 2, one line; it
    used to end the command with exit code 0, nothing written and no message."""
    out = tmp_path / "run"
    assert_one_line_error(invoke(spec, *FAST, "--out", out), "exit")
    assert not out.exists()
    weights = tmp_path / "w.safetensors"
    save_file(get_model("mlp").state_dict(), str(weights))
    assert_one_line_error(invoke("inspect", weights, "--arch", spec, "--input-shape", "1,1,32,32"), "exit")


def test_bundled_name_wins_over_a_file_of_that_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    save_checkpoint(get_model("mlp"), tmp_path / "lenet5", "mlp", (1, 32, 32))  # a stray file named lenet5
    assert load_model("lenet5").arch == "lenet5"
    assert load_model("./lenet5").arch == "mlp"  # ./NAME is the file
    assert load_model(str(tmp_path / "lenet5")).arch == "mlp"
    r = ok(invoke("inspect", "lenet5"))
    assert f"lenet5: 4 coupled groups, {LENET5_STRUCTURES} prunable structures" in r.stdout  # not the file's MLP


def test_unknown_name_with_a_file_of_that_name_says_how_to_load_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    save_checkpoint(get_model("mlp"), tmp_path / "mynet", "mlp", (1, 32, 32))
    assert_one_line_error(invoke("inspect", "mynet"), "./mynet")
    ok(invoke("inspect", "./mynet"))


def test_model_file_suffixes_are_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    save_checkpoint(get_model("mlp"), tmp_path / "net.pt", "mlp", (1, 32, 32))
    assert load_model("net.pt").arch == "mlp"
    assert_one_line_error(invoke("inspect", "missing.pth"), "does not exist")
