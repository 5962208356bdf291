"""Every error a user can cause, in one place: one class per pipeline stage.

Each error names the stage it belongs to (``stage``) and, when one option is at fault, the
library parameter (``param``, e.g. ``"epochs"``); the command line maps parameters to its flags
(``epochs`` -> ``--epochs``). Nothing finds a stage by searching a message's text. The CLI turns
every :class:`BmrsError` into one line on stderr and exit code 2.
"""

from __future__ import annotations

import errno
import os
import stat


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (its type name if it has none)."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__


_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"))


def file_problem(path: str | os.PathLike, *, missing: str = "does not exist") -> str | None:
    """Why ``path`` is not a regular file we can read, as the end of a sentence naming it ("does
    not exist", "is a symlink loop", "is not a regular file (a FIFO)", "cannot be read: permission
    denied", ...), or None when it is one. Never opens anything but a regular file (a FIFO's open
    would block)."""
    try:
        st = os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "is a symlink loop"
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            if os.path.islink(path):
                return f"is a symlink to {os.readlink(path)}, which does not exist"
            return missing
        if exc.errno in (errno.EACCES, errno.EPERM):
            return "cannot be read: permission denied"
        return f"cannot be read ({exc.strerror})"
    if stat.S_ISDIR(st.st_mode):
        return "is a folder, not a file"
    if not stat.S_ISREG(st.st_mode):
        kind = next((name for test, name in _KINDS if test(st.st_mode)), "a special file")
        return f"is not a regular file ({kind})"
    try:
        fd = os.open(path, os.O_RDONLY)
    except PermissionError:
        return "cannot be read: permission denied"
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    os.close(fd)
    return None


class BmrsError(Exception):
    """Base class of every error a user can cause."""

    stage = "job"

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param

    def __str__(self) -> str:
        return f"{self.param}: {self.message}" if self.param else self.message

    def render(self, flags: dict[str, str] | None = None) -> str:
        """The message with the parameter named as the caller knows it (``flags``: param -> name)."""
        if not self.param:
            return self.message
        return f"{(flags or {}).get(self.param, self.param)}: {self.message}"


class JobError(BmrsError, ValueError):
    """An option out of range, or options that do not go together."""

    stage = "job"


class ModelLoadError(BmrsError):
    """A model name or file that cannot be turned into an nn.Module."""

    stage = "load"


class DataError(BmrsError):
    """A dataset that is missing, malformed or does not fit the model."""

    stage = "data"


class GraphError(BmrsError):
    """The model cannot be traced or run at the example's shape (names the module and why)."""

    stage = "trace"


class GatePlacementError(BmrsError):
    """A model where gates cannot be placed (nothing prunable, unsupported structure)."""

    stage = "groups"


class NoGatesError(BmrsError):
    """An operation that needs gates on a model that has none."""

    stage = "gates"


class FitError(BmrsError):
    """Fitting could not run as asked (resume state missing or from another job)."""

    stage = "fit"


class SurgeryError(BmrsError):
    """The pruned network does not compute what the gated one did (names the group)."""

    stage = "surgery"


class ExportError(BmrsError):
    """ONNX export or ONNX Runtime disagrees with the pruned network."""

    stage = "onnx"


class OutputError(BmrsError):
    """The output folder cannot be used or written."""

    stage = "output"


STAGES = ("job", "load", "data", "trace", "groups", "gates", "fit", "surgery", "onnx", "output")
