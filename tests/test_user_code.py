"""The user's own model code, run from the folder it lives in (issue 14, item 6): the console
script puts the working folder (and a pickled model's folder) on the import path while it imports
or unpickles the user's code, as ``python -m`` would, and says where it looked when it fails."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from bmrs_surgery.errors import ModelLoadError
from bmrs_surgery.loading import load_model

MYNET = textwrap.dedent("""
    import torch.nn as nn

    class MyNet(nn.Module):
        def __init__(self, num_classes=10):
            super().__init__()
            self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 24), nn.ReLU(), nn.Linear(24, num_classes))

        def forward(self, x):
            return self.body(x)

    def factory(num_classes=10):
        return MyNet(num_classes)
""")


@pytest.fixture
def user_folder(tmp_path, monkeypatch):
    (tmp_path / "mynet_user14.py").write_text(MYNET)
    monkeypatch.syspath_prepend(str(tmp_path))
    import mynet_user14

    torch.save(mynet_user14.factory().state_dict(), tmp_path / "mynet_sd.pt")
    torch.save(mynet_user14.factory(), tmp_path / "whole.pt")
    sys.modules.pop("mynet_user14")
    return tmp_path


def _run(args, cwd):
    from test_cli import _script

    return subprocess.run([*_script(), *args], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_factory_imports_from_the_working_folder(user_folder):
    proc = _run(["inspect", "mynet_sd.pt", "--arch", "mynet_user14:factory", "--input-shape", "1x8x8"], user_folder)
    assert proc.returncode == 0, proc.stderr
    assert "24" in proc.stdout  # the hidden layer's 24 neurons form a group


@pytest.mark.slow
def test_whole_module_unpickles_from_its_own_folder(user_folder, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    proc = _run(["inspect", str(user_folder / "whole.pt"), "--trust-model", "--input-shape", "1x8x8"], elsewhere)
    assert proc.returncode == 0, proc.stderr


def test_missing_module_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError, match=r"No module named 'no_such_mod'.*searched the current folder .*and the Python path"):
        load_model("no_such_mod:factory")


def test_import_path_is_restored(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mynet_user14b.py").write_text(MYNET)
    before = list(sys.path)
    loaded = load_model("mynet_user14b:factory")
    assert isinstance(loaded.model, torch.nn.Module)
    assert sys.path == before
    sys.modules.pop("mynet_user14b", None)
