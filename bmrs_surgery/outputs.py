"""The output folder: checked before any work, locked for the whole job, written as one set at the
end (all files staged in a hidden folder, then renamed into place; an interruption leaves either
the complete new set or the complete old one), and the resume state an interrupted fit leaves
there (one file per job: ``.bmrs-resume-<hash of the job>.pt``)."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from .errors import FitError, OutputError

RESUME_PREFIX = ".bmrs-resume-"
RESUME_FILE = ".bmrs-resume.pt"  # the single resume file of earlier versions (read only to name a mismatch)
RESUME_FORMAT = "bmrs-surgery/resume/1"
LOCK_FILE = ".bmrs-lock"
STAGING_PREFIX = ".bmrs-staging-"  # the new set, written before anything in the folder changes
BACKUP_PREFIX = ".bmrs-previous-"  # the old set while the new one is renamed into place
MANIFEST = "manifest.json"  # in a backup folder: the names published and which of them existed before


def resume_file(job: dict) -> str:
    """The resume state's file name for a job key: a finishing job deletes only its own."""
    text = json.dumps(job, sort_keys=True, default=repr)
    return f"{RESUME_PREFIX}{hashlib.sha256(text.encode()).hexdigest()[:16]}.pt"


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
    if path.is_symlink() and not path.exists():  # a dangling link: mkdir would fail only after the work
        try:
            target = os.readlink(path)
        except OSError:
            target = "?"
        raise OutputError(f"{path} is a symlink to {target}, which does not exist (or is a symlink loop)",
                          param="out")
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


class OutLock:
    """``with OutLock(out):`` -- the output folder for one job at a time (an exclusive ``flock`` on
    ``out/.bmrs-lock``, held until the block ends). A second job fails at once. The folder is
    created if missing, and removed again if the job leaves nothing in it."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.fd: int | None = None
        self.created: list[Path] = []

    def __enter__(self) -> OutLock:
        missing = [p for p in (self.out, *self.out.parents) if not p.exists()]
        prepare_out_dir(self.out, create=True)
        self.created = missing
        lock = self.out / LOCK_FILE
        try:
            while True:
                fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    raise OutputError(f"{self.out} is in use by another job (locked by {lock}); wait for it to "
                                      "finish or choose another folder", param="out") from None
                try:  # the holder before us may have removed the file after we opened it: lock the new one
                    same = os.stat(lock).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    same = False
                if same:
                    self.fd = fd
                    return self
                os.close(fd)
        except BaseException:
            self._remove_created()
            raise

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.out / LOCK_FILE)  # before unlocking: a waiting job then takes a fresh file
            os.close(self.fd)
            self.fd = None
        self._remove_created()

    def _remove_created(self) -> None:
        """Folders this lock created, where the job left them empty."""
        for p in self.created:
            try:
                p.rmdir()
            except OSError:
                break


_TMP = re.compile(r"^\.(.+)\.[A-Za-z0-9_]+\.tmp$")


def clean_stale(out: Path, names: Iterable[str]) -> list[str]:
    """Remove what killed runs left in ``out`` (call it holding the lock): an interrupted publish
    is rolled back to the old set, staging folders and ``atomic_write`` temporaries of ``names``
    and of resume states are removed. Returns what was removed or restored."""
    out = Path(out)
    if not out.is_dir():
        return []
    names = set(names)
    done = []
    for p in sorted(out.iterdir()):
        if p.is_dir() and p.name.startswith(BACKUP_PREFIX):
            _roll_back(out, p)
            done.append(p.name)
        elif p.is_dir() and p.name.startswith(STAGING_PREFIX):
            shutil.rmtree(p, ignore_errors=True)
            done.append(p.name)
        elif p.is_file() and (m := _TMP.match(p.name)) and (m.group(1) in names or m.group(1).startswith(RESUME_PREFIX)):
            p.unlink(missing_ok=True)
            done.append(p.name)
    return done


def _roll_back(out: Path, backup: Path) -> None:
    """Put the old set back from ``backup`` (see :func:`write_outputs`) and remove the new files."""
    try:
        manifest = json.loads((backup / MANIFEST).read_text())
        names, old = manifest["names"], set(manifest["old"])
    except (OSError, ValueError, KeyError, TypeError):
        names, old = [], set()  # killed before the manifest was complete: nothing was moved yet
    for name in names:
        if name in old:
            if (backup / name).exists():  # moved aside: the file in out (if any) is new
                os.replace(backup / name, out / name)
            # else: never moved, the file in out is still the old one
        else:
            (out / name).unlink(missing_ok=True)
    shutil.rmtree(backup, ignore_errors=True)


@contextlib.contextmanager
def _signals_deferred():
    """SIGINT and SIGTERM held back (delivered when the block ends) so that a rollback completes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    sigs = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def write_outputs(path: Path, files: dict[str, bytes]) -> Path:
    """Write ``files`` (name -> bytes) into the output folder as one set.

    Every file is written into a fresh hidden staging folder inside ``path`` first; then the old
    files of those names are moved into a backup folder (with a manifest) and the new ones renamed
    into place. On any error or interruption (Ctrl-C included) the old set is restored, so either
    the complete new set or the complete old set is there; a run killed outright leaves the backup
    folder, and :func:`clean_stale` restores the old set at the next job. A folder this call
    created is removed again on failure.
    """
    path = Path(path)
    missing = [p for p in (path, *path.parents) if not p.exists()]
    prepare_out_dir(path, create=True)
    staging = backup = None
    name = ""
    try:
        try:
            staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=path))
            for name, data in files.items():
                atomic_write(staging / name, lambda f, data=data: f.write(data))
            name = ""
            backup = Path(tempfile.mkdtemp(prefix=BACKUP_PREFIX, dir=path))
            old = [n for n in files if (path / n).exists()]
            atomic_write(backup / MANIFEST, lambda f: f.write(json.dumps({"names": list(files), "old": old}).encode()))
            for n in old:
                os.replace(path / n, backup / n)
            for n in files:
                os.replace(staging / n, path / n)
        except BaseException:
            with _signals_deferred():
                if backup is not None:
                    _roll_back(path, backup)
                if staging is not None:
                    shutil.rmtree(staging, ignore_errors=True)
                if missing:
                    shutil.rmtree(missing[-1], ignore_errors=True)
            raise
    except OSError as exc:
        what = f"cannot write {name}" if name else "cannot publish the outputs"
        raise OutputError(f"{path}: {what} ({exc.strerror or exc})", param="out") from None
    shutil.rmtree(backup, ignore_errors=True)
    shutil.rmtree(staging, ignore_errors=True)
    return path


class ResumeWriter:
    """After every epoch, the training state, written atomically to ``out/.bmrs-resume-<hash>.pt``
    (the job's own file, :func:`resume_file`): an interrupted run leaves the last complete epoch
    (and any earlier complete outputs) intact."""

    def __init__(self, out: Path, job: dict):
        self.out, self.job = Path(out), job
        self.path = self.out / resume_file(job)

    def __call__(self, state: dict) -> None:
        prepare_out_dir(self.out, create=True)
        buf = io.BytesIO()
        torch.save({"format": RESUME_FORMAT, "job": self.job, "state": state}, buf)
        atomic_write(self.path, lambda f: f.write(buf.getvalue()))


def resume_files(out: Path) -> list[Path]:
    """Every resume state in ``out``, newest first."""
    out = Path(out)
    if not out.is_dir():
        return []
    found = [p for p in out.iterdir() if p.is_file() and (p.name == RESUME_FILE or (
        p.name.startswith(RESUME_PREFIX) and p.name.endswith(".pt")))]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def _load_resume(path: Path) -> dict:
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001
        raise FitError(f"{path} is damaged; run again without it", param="resume") from None
    if not isinstance(saved, dict) or saved.get("format") != RESUME_FORMAT:
        raise FitError(f"{path} is not a bmrs-surgery resume state", param="resume")
    return saved


def read_resume_state(out: Path, job: dict) -> dict:
    path = Path(out) / resume_file(job)
    if not path.is_file():
        others = resume_files(out)
        if not others:
            raise FitError(f"no saved state in {out} (nothing was interrupted there)", param="resume")
        saved = _load_resume(others[0])  # another job's state: say how it differs
        theirs = saved.get("job") or {}
        diff = sorted(k for k in set(job) | set(theirs) if theirs.get(k) != job.get(k))
        raise FitError(f"the saved state belongs to a different job (differs in {', '.join(diff) or 'format'})",
                       param="resume")
    saved = _load_resume(path)
    if saved.get("job") != job:
        diff = sorted(k for k in set(job) | set(saved.get("job") or {}) if (saved.get("job") or {}).get(k) != job.get(k))
        raise FitError(f"the saved state belongs to a different job (differs in {', '.join(diff)})", param="resume")
    state = saved["state"]
    bad = nonfinite_in_state(state)
    if bad:
        raise FitError(f"{path}: the saved state holds {bad}; run again without --resume", param="resume")
    return state


def nonfinite_in_state(state) -> str | None:
    """Where a saved training state holds a NaN or an infinity ("NaN in model.fc.weight"), else None."""
    def walk(obj, where):
        if isinstance(obj, torch.Tensor):
            if obj.is_floating_point() or obj.is_complex():
                ok = torch.isfinite(obj)
                if not bool(ok.all()):
                    kind = "NaN" if bool(torch.isnan(obj).any()) else "an infinity"
                    return f"{kind} in {where}"
            return None
        if isinstance(obj, float):
            return None if obj == obj and abs(obj) != float("inf") else f"{obj} in {where}"
        if isinstance(obj, dict):
            items = obj.items()
        elif isinstance(obj, (list, tuple)):
            items = enumerate(obj)
        else:
            return None
        for k, v in items:
            found = walk(v, f"{where}.{k}" if where else str(k))
            if found:
                return found
        return None

    losses = {f"history.{i}.{k}": h.get(k) for i, h in enumerate(state.get("history") or []) if isinstance(h, dict)
              for k in ("loss", "kl")}
    return walk({"model": state.get("model"), "optimizer": state.get("optimizer"), **losses}, "")


def epochs_saved(out: Path) -> int | None:
    """Complete epochs in ``out``'s newest resume state (None without one)."""
    try:
        return int(torch.load(resume_files(out)[0], weights_only=True)["state"]["epochs_done"])
    except Exception:  # noqa: BLE001
        return None
