"""``bmrs-compress`` options for a user's own data, weights and budget (issue 18), as one decorator:
each option's value goes, under its own name, to the :class:`~bmrs_surgery.job.Job`."""

from __future__ import annotations

import click

from bmrs_surgery import defaults


class RoundToParam(click.ParamType):
    """``--round-to``: a positive integer, or ``auto`` (widths chosen by measured latency)."""

    name = "N|auto"

    def convert(self, value, param, ctx):
        if value is None or value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return value
        text = str(value).strip().lower()
        if text == "auto":
            return "auto"
        try:
            number = int(text)
        except ValueError:
            number = 0
        if number < 1:
            self.fail(f"{value!r} is not a positive integer or auto", param, ctx)
        return number


ROUND_TO = RoundToParam()

_OPTIONS = [
    click.option("--target", "target", metavar="COLUMN", help="csv:FILE data: the column holding the class."),
    click.option("--image-size", type=click.IntRange(8, 4096), default=None,
                 help="imagefolder:DIR data: side of the square input [default: the model's own, else 224]."),
    click.option("--weights", metavar="DEFAULT|NAME|FILE",
                 help="torchvision:NAME: its pretrained weights (DEFAULT or an enum name such as IMAGENET1K_V1), "
                      "from $TORCH_HOME/hub/checkpoints, never downloaded; or a state-dict FILE loaded into MODEL's "
                      "architecture."),
    click.option("--pretrained", is_flag=True,
                 help="timm:NAME: its pretrained weights from the Hugging Face cache, never downloaded."),
    click.option("--target-macs", type=click.FloatRange(0, 1, min_open=True), default=None, metavar="R",
                 help="Prune further, in dF order, until pruned/original MACs <= R (BMRS's own stop if it goes further)."),
    click.option("--target-params", type=click.FloatRange(0, 1, min_open=True), default=None, metavar="R",
                 help="Prune further, in dF order, until pruned/original parameters <= R."),
    click.option("--target-latency", type=click.FloatRange(0, min_open=True), default=None, metavar="MS",
                 help="Prune further, in dF order, until the ONNX Runtime CPU latency is <= MS milliseconds."),
    click.option("--target-batch", type=click.IntRange(1, 4096), default=defaults.LATENCY_TARGET_BATCH,
                 show_default=True, help="--target-latency: the batch size it is measured at."),
    click.option("--distill", is_flag=True,
                 help="Fit and fine-tune against the original network's logits too (knowledge distillation, "
                      f"temperature {defaults.DISTILL_TEMPERATURE:g}, weight {defaults.DISTILL_WEIGHT:g})."),
    click.option("--lr-schedule", type=click.Choice(("constant", "cosine")), default=defaults.LR_SCHEDULE,
                 show_default=True, help="Learning rates within each phase (fitting, fine-tuning): constant, or "
                                         "falling to 0 along half a cosine."),
]


def user_options(fn):
    """Add the options above to a click command (innermost first, so --help lists them in order)."""
    for option in reversed(_OPTIONS):
        fn = option(fn)
    return fn
