"""Safe loading: weights-only formats with an architecture; code runs only when asked for."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

from bmrs_surgery.errors import ModelLoadError
from bmrs_surgery.loading import load_model
from models import get_model
from test_cli import assert_one_line_error, invoke, ok


@pytest.fixture()
def factory_module(tmp_path, monkeypatch):
    (tmp_path / "my_nets.py").write_text(textwrap.dedent("""
        from torch import nn
        def small(num_classes=10):
            return nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 30 * 30, num_classes))
        def broken():
            raise RuntimeError("no such layer")
        NOT_A_FACTORY = 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_nets"
    sys.modules.pop("my_nets", None)


def test_safetensors_with_bundled_arch_loads_the_weights(tmp_path):
    net = get_model("lenet5")
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    loaded = load_model(str(path), arch="lenet5")
    for k, v in net.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[k], v)
    assert loaded.input_shape == (1, 32, 32)


def test_safetensors_with_module_factory_arch_goes_through_check(tmp_path, factory_module):
    net = __import__(factory_module).small()
    path = tmp_path / "w.safetensors"
    save_file(net.state_dict(), str(path))
    r = ok(invoke("check", path, "--arch", f"{factory_module}:small", "--input-shape", "1,1,32,32", "--no-onnx"))
    assert "PASS" in r.stdout


@pytest.mark.parametrize("arch,fragment", [
    (None, "--arch"),
    ("nope_module_xyz:small", "cannot import"),
    ("my_nets:missing", "no callable"),
    ("my_nets:NOT_A_FACTORY", "no callable"),
    ("my_nets:broken", "no such layer"),
])
def test_safetensors_bad_arch_is_one_line(tmp_path, factory_module, arch, fragment):
    path = tmp_path / "w.safetensors"
    save_file(get_model("mlp").state_dict(), str(path))
    args = ["inspect", path, "--input-shape", "1,1,32,32"] + (["--arch", arch] if arch else [])
    assert_one_line_error(invoke(*args), fragment)


def test_damaged_safetensors_is_one_line(tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ModelLoadError, match="not a safetensors file"):
        load_model(str(path), arch="mlp")


def test_pickled_module_is_refused_without_trust_and_runs_no_code(tmp_path):
    marker = tmp_path / "ran"
    payload = tmp_path / "evil.pt"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"model": Evil()}, payload)
    with pytest.raises(ModelLoadError, match="--trust-model"):
        load_model(str(payload))
    assert not marker.exists()
