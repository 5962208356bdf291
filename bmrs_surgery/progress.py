"""Progress of the fitting loop (the CLI and benchmarks pass a reporter to ``fit``): live bars on a
terminal (:class:`RichReporter`), flushed plain lines anywhere else (:class:`LineReporter`: a log
file, CI, a pipe), chosen by :func:`make_reporter`. Both show the settling signal at each check."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class RichReporter:
    """Shows one bar per epoch with running loss, then accuracy and kept fraction."""

    def __init__(self, console: Console | None = None):
        self.console = console or Console(stderr=True)
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}"),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            console=self.console,
        )
        self.task = None

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()

    def start_epoch(self, epoch: int, total: int, phase: str, steps: int) -> None:
        self.task = self.progress.add_task(
            f"{phase} {epoch + 1}/{total}", total=steps, loss=0.0, info=""
        )

    def step(self, done: int, mean_loss: float) -> None:
        self.progress.update(self.task, completed=done, loss=mean_loss)

    def end_epoch(self, record) -> None:
        self.progress.update(self.task, info=f"{quality_text(record, '  ')}  kept {record.kept_fraction:.3f}")

    def check(self, found) -> None:
        """A settling check (settling.SettleCheck): shown on the running epoch's bar."""
        if self.task is not None:
            self.progress.update(self.task, info=settle_text(found))


def quality_text(record, sep: str) -> str:
    """An epoch's accuracies, or without labels its mean cosine to the original outputs."""
    if getattr(record, "val_cosine", None) is not None:
        return f"val cos {record.val_cosine:.4f}"
    return f"train acc {record.train_accuracy:.3f}{sep}val acc {record.val_accuracy:.3f}"


def settle_text(found) -> str:
    """The settling signal of one check, in a few words."""
    return (f"step {found.step}: kept {found.kept:.3f}, flipped {found.flipped:.1%}, "
            f"projected {found.projected:.1%}, objective {found.objective_change:+.1%} "
            f"({'stable' if found.stable else 'moving'})")


class LineReporter:
    """One line per epoch and per settling check, flushed as it happens, never cut to a width:
    what a log file or a CI job shows while a fit runs."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.label = ""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def _say(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def start_epoch(self, epoch: int, total: int, phase: str, steps: int) -> None:
        self.label = f"{phase} {epoch + 1}/{total}"

    def step(self, done: int, mean_loss: float) -> None:
        return None

    def end_epoch(self, record) -> None:
        self._say(f"{self.label}: loss {record.loss:.4f}, {quality_text(record, ', ')}, "
                  f"kept {record.kept_fraction:.3f}, {record.seconds:.1f} s")

    def check(self, found) -> None:
        self._say(f"{self.label} settling check, {settle_text(found)}")


def make_reporter(stream=None):
    """Live bars when ``stream`` (default stderr) is a terminal, plain flushed lines otherwise."""
    stream = stream or sys.stderr
    isatty = getattr(stream, "isatty", None)
    if callable(isatty) and isatty():
        return RichReporter(Console(file=stream))
    return LineReporter(stream)
