"""The README's Python example runs as written and prunes."""

import re
import runpy
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs_and_prunes(tmp_path, monkeypatch, capsys):
    code = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)[0]
    script = tmp_path / "example.py"
    script.write_text(code)
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    runpy.run_path(str(script), run_name="__main__")
    out = capsys.readouterr().out
    compression = float(re.search(r"compression ([\d.]+)%", out).group(1))
    assert compression > 50.0
    assert (tmp_path / "gated.pt").stat().st_size > 0
