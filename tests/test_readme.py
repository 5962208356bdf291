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


def test_every_package_is_installed_from_a_wheel_too():
    """Packages are found, not listed (a listed one can be forgotten: it then works in an editable
    install and is missing from a wheel): every folder with an __init__.py under bmrs_surgery/,
    cli/ and models/ matches the find pattern, and the data files are package data."""
    import tomllib
    from setuptools import find_packages

    root = Path(__file__).resolve().parents[1]
    cfg = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = set(find_packages(str(root), include=cfg["packages"]["find"]["include"]))
    on_disk = {".".join(p.relative_to(root).parent.parts)
               for top in ("bmrs_surgery", "cli", "models") for p in (root / top).rglob("__init__.py")}
    assert on_disk == found, on_disk ^ found
    assert {"cli", "models", "bmrs_surgery.graph.rules"} <= found
    assert not any(n.startswith(("tests", "benchmarks")) for n in found)
    assert "*.pt" in cfg["package-data"]["models"] and list((root / "models").glob("*.pt"))
    assert "samples/*.npz" in cfg["package-data"]["bmrs_surgery"]
    assert (root / "bmrs_surgery" / "samples" / "fashion_mnist_sample.npz").is_file()


def test_readme_first_command_runs_the_whole_job(tmp_path, monkeypatch):
    """The set-up command's job part, exactly as written (output folder moved under tmp)."""
    import shlex

    from click.testing import CliRunner

    from cli.main import cli

    text = README.read_text()
    line = next(ln for ln in text.splitlines() if ln.startswith("pip install") and "bmrs-compress" in ln)
    args = shlex.split(line.split("&&", 1)[1])
    assert args[0] == "bmrs-compress"
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, args[1:], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "runs/demo/report.html" in result.output.replace("\n", "")
    for name in ("pruned.pt", "pruned.onnx", "report.html", "report.json"):
        assert (tmp_path / "runs" / "demo" / name).is_file()


def test_readme_sections_appear_once():
    headings = [ln for ln in README.read_text().splitlines() if ln.startswith("#")]
    assert len(headings) == len(set(headings)), [h for h in headings if headings.count(h) > 1]
    assert len(README.read_text().splitlines()) < 1000


ROOT = README.parent
_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def _docs():
    return [README, *sorted((ROOT / "docs").glob("*.md"))]


def _prose(text: str) -> str:
    """The text outside fenced code blocks."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    out = set()
    for line in _prose(path.read_text()).splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().replace("`", "").lower()
            out.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return out


def test_readme_is_a_short_front_page():
    assert len(README.read_text().splitlines()) <= 260


def test_every_relative_link_resolves():
    """Every relative link in README.md and docs/*.md names a file inside the repository (and a
    heading that exists, when it points into a markdown file)."""
    broken = []
    for doc in _docs():
        for target in _LINK.findall(_prose(doc.read_text())):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            file = (doc.parent / path).resolve() if path else doc
            if ROOT.resolve() not in file.parents or not file.exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target}")
            elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
                broken.append(f"{doc.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, broken


def test_nothing_points_outside_the_repository():
    """The documentation and the code stand alone: no references to a sibling shared/ folder."""
    files = [*_docs(), *(p for d in ("bmrs_surgery", "cli", "models") for p in (ROOT / d).rglob("*.py"))]
    hits = [str(p.relative_to(ROOT)) for p in files if "../shared" in p.read_text() or "shared/docs" in p.read_text()]
    assert not hits, hits
