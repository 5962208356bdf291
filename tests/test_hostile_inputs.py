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


@pytest.mark.slow  # a subprocess each (the in-process tests above cover the same refusal quickly)
@pytest.mark.parametrize("arch", ["os:abort", "signal:pause", "http.server:test"])
def test_checkpoint_naming_crashing_or_hanging_code_is_refused(tmp_path, arch):
    """Before the fix these crashed the process (abort) or hung (pause, a listening server): run in
    a subprocess with a timeout, so that the old behaviour fails the test instead of ending it."""
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


# ------------------------------------------------------------------------------------------------
# 2. Names from a model are data, never markup, escape sequences, formulas, mathtext or code
# ------------------------------------------------------------------------------------------------

HOSTILE_NAMES = [
    "[link=http://evil-example]a[/link]",  # rich markup: a hyperlink
    "[/x]b",  # rich markup: a closing tag without an opening one crashed the summary (exit 1)
    "c\x1b[31mred\x1b]0;title\x07",  # escape sequences: colour, window title
    "=cmd|' /C calc'!A0",  # a spreadsheet formula
    "$x^$",  # matplotlib mathtext that does not parse
    "<script>alert(1)</script>",  # HTML (report.html escaped it already)
]


def hostile_network() -> torch.nn.Module:
    """An MLP for digits (1x32x32) whose prunable layers carry hostile names."""
    from collections import OrderedDict

    layers, width = [("flat", torch.nn.Flatten())], 1024
    for i, name in enumerate(HOSTILE_NAMES):
        layers += [(name, torch.nn.Linear(width, 8)), (f"act{i}", torch.nn.ReLU())]
        width = 8
    layers.append(("out", torch.nn.Linear(width, 10)))
    return torch.nn.Sequential(OrderedDict(layers))


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory):
    """The whole job on the hostile network, through the command line, into an --out with markup."""
    tmp = tmp_path_factory.mktemp("hostile")
    path = tmp / "hostile.pt"
    torch.save(hostile_network(), path)
    out = tmp / "[/o]run"
    mp = pytest.MonkeyPatch()
    mp.setenv("COLUMNS", "200")  # the summary table is not wrapped
    try:
        result = invoke(path, "--trust-model", *FAST, "--out", out)
    finally:
        mp.undo()
    return result, out


def test_hostile_names_run_the_whole_job(hostile_run):
    result, out = hostile_run
    ok(result)
    for name in ("scores.csv", "report.json", "report.html", "pruned.pt", "pruned.onnx", "gated.pt"):
        assert (out / name).is_file(), name


def test_summary_shows_names_as_text(hostile_run):
    result, out = hostile_run
    ok(result)
    text = result.stdout
    assert "\x1b" not in text and "\x07" not in text  # no raw escape sequence reaches the terminal
    assert "c\\x1b[31mred\\x1b]0;title\\x07" in text  # shown as escapes
    for name in HOSTILE_NAMES[:2] + HOSTILE_NAMES[3:]:
        assert name in text, name  # markup shown literally, not interpreted
    assert str(out / "report.html") in text


def test_scores_csv_neutralises_formulas(hostile_run):
    import csv

    _, out = hostile_run
    with open(out / "scores.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    sites = {r["site"] for r in rows}
    assert "'=cmd|' /C calc'!A0" in sites and "=cmd|' /C calc'!A0" not in sites
    for row in rows:
        for value in row.values():
            if value.startswith(("=", "+", "@", "\t", "\r")):
                raise AssertionError(f"formula-like cell {value!r}")
            if value.startswith("-"):
                float(value)  # a negative number stays a number
    assert any(r["score"].startswith("-") for r in rows)


def test_report_json_keeps_names_exactly(hostile_run):
    import json

    _, out = hostile_run
    doc = json.loads((out / "report.json").read_text())
    assert {lay["name"] for lay in doc["layers"]} >= set(HOSTILE_NAMES)


def test_report_html_escapes_names(hostile_run):
    _, out = hostile_run
    page = (out / "report.html").read_text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<script" not in page


def test_csv_cell_rule():
    from bmrs_surgery.report import csv_cell

    for bad in ("=1+1", "+1", "-1+cmd", "@SUM(A1)", "\tx", "\rx"):
        assert csv_cell(bad) == "'" + bad
    assert csv_cell("conv1") == "conv1" and csv_cell(-1.5) == -1.5 and csv_cell(3) == 3


def test_report_html_draws_mathtext_names_as_text(recwarn):
    """A layer name that is invalid mathtext crashed the widths plot after the network was pruned."""
    from bmrs_surgery import report_html

    doc = {"criterion": "bmrs_u8", "layers": [{"name": n, "channels_before": 4, "channels_after": 2}
                                              for n in ("$x^$", "$\\frac{", "a$b")]}
    rows = [{"keep": True, "expected_theta": 0.9, "score": -1.0}, {"keep": False, "expected_theta": 0.1, "score": 2.0}]
    figs = report_html._figures(doc, rows)
    assert figs["widths"].startswith("data:image/png;base64,")


@pytest.mark.parametrize("name", ['q"uote', "new\nline", "back\\slash", "a\\bc", "cr\rx"])
def test_names_fx_cannot_write_are_one_line_graph_errors(tmp_path, name):
    from collections import OrderedDict

    from bmrs_surgery.errors import GraphError
    from bmrs_surgery.graph.trace import symbolic_trace

    net = torch.nn.Sequential(OrderedDict([("flat", torch.nn.Flatten()), (name, torch.nn.Linear(1024, 8)),
                                           ("act", torch.nn.ReLU()), ("out", torch.nn.Linear(8, 10))]))
    with pytest.raises(GraphError, match="rename it"):
        symbolic_trace(net)
    path = tmp_path / "net.pt"
    torch.save(net, path)
    assert_one_line_error(invoke("inspect", path, "--trust-model", "--input-shape", "1,1,32,32"), "rename it")
    out = tmp_path / "run"
    assert_one_line_error(invoke(path, "--trust-model", *FAST, "--out", out), "rename it")
    assert not out.exists()


@pytest.mark.parametrize("name", ["c\x1b[31mred", "tab\tx", "sp ace", "[/x]b", "$x^$", "é\u202eevil"])
def test_odd_but_writable_names_trace(name):
    from collections import OrderedDict

    from bmrs_surgery.graph.trace import symbolic_trace

    net = torch.nn.Sequential(OrderedDict([("flat", torch.nn.Flatten()), (name, torch.nn.Linear(1024, 8))]))
    gm, _ = symbolic_trace(net)
    x = torch.randn(2, 1, 32, 32)
    assert torch.equal(gm(x), net(x))


def test_inspect_text_shows_names_as_text(tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    path = tmp_path / "hostile.pt"
    torch.save(hostile_network(), path)
    r = ok(invoke("inspect", path, "--trust-model", "--input-shape", "1,1,32,32"))
    assert "\x1b" not in r.stdout and "\x07" not in r.stdout
    assert "[/x]b" in r.stdout and "[link=http://evil-example]a[/link]" in r.stdout
    dot = ok(invoke("inspect", path, "--trust-model", "--input-shape", "1,1,32,32", "--format", "dot")).stdout
    assert "\x1b" not in dot


def test_error_lines_carry_no_escape_sequences(tmp_path):
    result = invoke("lenet5", "--data", str(tmp_path / "x\x1b[2Jy.npz"), "--out", tmp_path / "run")
    line = assert_one_line_error(result)
    assert "\x1b" not in line and "\\x1b" in line
