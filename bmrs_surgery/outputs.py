"""The output folder: checked before any work, written all at once at the end (each file
atomically), and the resume state an interrupted fit leaves there."""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from .errors import FitError, OutputError

RESUME_FILE = ".bmrs-resume.pt"
RESUME_FORMAT = "bmrs-surgery/resume/1"


def atomic_write(path: str | Path, write: Callable[[io.BufferedWriter], None]) -> None:
    """Write a file through ``write(f)`` into a temporary file beside it, then rename it over."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; outputs get the usual permissions
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def prepare_out_dir(path: Path, create: bool) -> Path:
    """Check (and with ``create``, make) the output folder; a file there is an error."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{path} is a file, not a folder", param="out")
    if not create:
        parent = path if path.exists() else next((p for p in path.parents if p.exists()), Path("."))
        if not parent.is_dir():
            raise OutputError(f"{path}: {parent} is a file, not a folder", param="out")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise OutputError(f"{path}: folder {parent} is not writable", param="out")
        return path
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{path}: cannot create folder ({exc.strerror})", param="out") from None
    return path


def write_outputs(path: Path, files: dict[str, bytes]) -> Path:
    """Create the output folder and write ``files`` (name -> bytes) into it, each atomically.

    On a write error the files written so far, and the folder if this call created it, are removed.
    """
    path = Path(path)
    missing = [p for p in (path, *path.parents) if not p.exists()]
    prepare_out_dir(path, create=True)
    written: list[Path] = []  # new files only: a file replaced from an earlier run stays
    name = ""
    try:
        for name, data in files.items():
            target = path / name
            is_new = not target.exists()
            atomic_write(target, lambda f, data=data: f.write(data))
            if is_new:
                written.append(target)
    except OSError as exc:
        for target in written:
            target.unlink(missing_ok=True)
        if missing:
            shutil.rmtree(missing[-1], ignore_errors=True)
        raise OutputError(f"{path}: cannot write {name} ({exc.strerror or exc})", param="out") from None
    return path


class ResumeWriter:
    """After every epoch, the training state, written atomically to ``out/.bmrs-resume.pt``: an
    interrupted run leaves the last complete epoch (and any earlier complete outputs) intact."""

    def __init__(self, out: Path, job: dict):
        self.out, self.job = Path(out), job

    def __call__(self, state: dict) -> None:
        prepare_out_dir(self.out, create=True)
        buf = io.BytesIO()
        torch.save({"format": RESUME_FORMAT, "job": self.job, "state": state}, buf)
        atomic_write(self.out / RESUME_FILE, lambda f: f.write(buf.getvalue()))


def read_resume_state(out: Path, job: dict) -> dict:
    path = Path(out) / RESUME_FILE
    if not path.is_file():
        raise FitError(f"no saved state in {out} (nothing was interrupted there)", param="resume")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001
        raise FitError(f"{path} is damaged; run again without it", param="resume") from None
    if not isinstance(saved, dict) or saved.get("format") != RESUME_FORMAT:
        raise FitError(f"{path} is not a bmrs-surgery resume state", param="resume")
    if saved.get("job") != job:
        diff = sorted(k for k in set(job) | set(saved.get("job") or {}) if (saved.get("job") or {}).get(k) != job.get(k))
        raise FitError(f"the saved state belongs to a different job (differs in {', '.join(diff)})", param="resume")
    return saved["state"]


def epochs_saved(out: Path) -> int | None:
    """Complete epochs in ``out``'s resume state (None without one)."""
    try:
        return int(torch.load(Path(out) / RESUME_FILE, weights_only=True)["state"]["epochs_done"])
    except Exception:  # noqa: BLE001
        return None
