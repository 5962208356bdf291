"""``bmrs-compress inspect`` and ``bmrs-compress check``: formats, exit codes, bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import networkx as nx
import pytest
import torch
from torch import nn

from test_cli import assert_one_line_error, invoke, ok
from test_graph import Untraceable


def test_inspect_json_lists_groups_with_members_and_kinds():
    doc = json.loads(ok(invoke("inspect", "lenet5", "--format", "json")).stdout)
    assert doc["input_shape"] == [1, 1, 32, 32]
    assert [(g["kind"], g["structures"]) for g in doc["groups"]] == [
        ("channels", 6), ("flatten", 16), ("channels", 120), ("channels", 84)]
    assert doc["groups"][1]["members"] == [{"name": "3", "role": "out", "channels": 16},
                                           {"name": "7", "role": "in", "channels": 400}]


def test_inspect_text_dot_and_graphml(tmp_path):
    text = ok(invoke("inspect", "resnet_block")).stdout
    assert "residual" in text and "coupled groups" in text
    dot = ok(invoke("inspect", "resnet_block", "--format", "dot")).stdout
    assert dot.startswith("digraph") and '"_1_downsample_0" -> ' in dot
    out = tmp_path / "g.graphml"
    ok(invoke("inspect", "transformer_block", "--format", "graphml", "-o", out))
    g = nx.read_graphml(out)
    assert g.nodes["blocks_1_attn_out_proj"]["kind"] == "Linear"
    assert "patch" in g.nodes and g.number_of_edges() >= g.number_of_nodes() - 1


def test_inspect_torchvision_with_input_shape():
    doc = json.loads(ok(invoke("inspect", "torchvision:resnet18", "--input-shape", "1,3,64,64",
                               "--format", "json")).stdout)
    assert len(doc["groups"]) == 12 and doc["input_shape"] == [1, 3, 64, 64]


def test_check_passes_every_stage_json():
    doc = json.loads(ok(invoke("check", "depthwise_separable", "--json", "--ratio", "0.5")).stdout)
    assert doc["ok"] and set(doc["stages"].values()) == {"ok"}
    assert set(doc["stages"]) == {"trace", "groups", "gates", "surgery", "verify", "onnx"}
    assert doc["params_after"] < doc["params_before"] and doc["max_abs_diff"] < 1e-5
    for key in ("model", "groups", "params_before", "params_after", "max_abs_diff"):
        assert key in doc


def test_check_reports_failing_stage_with_exit_1_and_no_traceback():
    r = invoke("check", "lenet5", "--input-shape", "1,3,32,32", "--json")
    assert r.exit_code == 1, r.output
    doc = json.loads(r.stdout)
    assert doc["ok"] is False and "shape (1, 3, 32, 32)" in doc["stages"]["trace"]
    assert "Traceback" not in r.stdout + r.stderr


@pytest.mark.parametrize("args,fragments", [
    (["inspect", "nothing.pt"], ["does not exist"]),
    (["inspect", "lenet5", "--input-shape", "1,x"], ["--input-shape"]),
    (["inspect", "lenet5", "--input-shape", "1,3,32,32"], ["shape (1, 3, 32, 32)", "Conv2d"]),
    (["check", "torchvision:nope"], ["unknown torchvision model"]),
    (["inspect", "<untraceable>", "--trust-model", "--input-shape", "1,4"], ["cannot trace Untraceable"]),
    (["inspect", "<linear>", "--trust-model", "--input-shape", "1,4"], ["no prunable structure"]),
    (["check", "<state>", "--input-shape", "1,4"], ["state dict", "--arch"]),
    (["inspect", "<linear>", "--trust-model"], ["input shape unknown", "--input-shape"]),
])
def test_graph_commands_bad_input_is_one_line_exit_2(tmp_path, args, fragments):
    files = {"<untraceable>": Untraceable(), "<linear>": nn.Linear(4, 3), "<state>": nn.Linear(4, 3).state_dict()}
    resolved = []
    for a in args:
        if a in files:
            path = tmp_path / "m.pt"
            torch.save(files[a], path)
            a = str(path)
        resolved.append(a)
    assert_one_line_error(invoke(*resolved), *fragments)


@pytest.mark.slow
def test_console_script_check_exit_code():
    r = subprocess.run([sys.executable, "-m", "cli.main", "check", "mlp", "--no-onnx"],
                       capture_output=True, text=True, cwd="/")
    assert r.returncode == 0, r.stderr
    assert "PASS" in r.stdout


@pytest.mark.slow
def test_compress_transformer_with_library_attention_then_rescore_saved_gates(tmp_path):
    import numpy as np

    from test_cli import read_report

    rng = np.random.default_rng(0)
    data = tmp_path / "d.npz"
    np.savez(data, x=rng.standard_normal((60, 3, 16, 16)).astype(np.float32), y=np.arange(60) % 10)
    out = tmp_path / "run"
    ok(invoke("transformer_block", "--data", data, "--epochs", "1", "--finetune-epochs", "0", "-q",
              "--bench-batch-sizes", "", "--prior", "uniform", "--out", out))
    rep = read_report(out)
    assert [lay["kind"] for lay in rep["layers"]] == ["heads", "channels", "heads", "channels"]
    assert rep["surgery"]["proof"]["ok"]
    ck = torch.load(out / "gated.pt", weights_only=True)
    assert ck["traced"] is True  # nn.MultiheadAttention was written out: the gates sit in the graph
    again = tmp_path / "again"
    ok(invoke(out / "gated.pt", "--prior", "uniform", "--out", again, "-q", "--bench-batch-sizes", ""))
    assert read_report(again)["totals"]["structures_after"] == rep["totals"]["structures_after"]
    pruned = torch.load(again / "pruned.pt", weights_only=False)
    assert pruned(torch.randn(2, 3, 16, 16)).shape == (2, 10)
