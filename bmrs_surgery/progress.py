"""Rich progress bars for the fitting loop (the CLI and benchmarks pass one to ``fit``)."""

from __future__ import annotations

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
        info = (
            f"train acc {record.train_accuracy:.3f}  val acc {record.val_accuracy:.3f}  "
            f"kept {record.kept_fraction:.3f}"
        )
        self.progress.update(self.task, info=info)
