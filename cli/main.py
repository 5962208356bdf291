"""The ``bmrs-compress`` command line: thin; parses options, calls the library, prints.

``bmrs-compress MODEL ...`` runs the compression job (the ``compress`` command, the default);
further commands are added as subcommands. Every user mistake ends in a one-line message on stderr
and exit code 2; nothing is written to ``--out`` unless the whole job succeeds.
"""

from __future__ import annotations

import os
import signal
import sys


def _interrupted_while_starting(signum, frame):  # Ctrl-C during the imports below (torch takes seconds)
    os.write(2, b"Interrupted while starting: nothing was done\n")
    os._exit(130)


if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, _interrupted_while_starting)

import click  # noqa: E402 - after the start-up handler

from bmrs_surgery.errors import BmrsError  # noqa: E402

from ._common import fail  # noqa: E402
from .bench_cmd import bench  # noqa: E402
from .check_cmd import check  # noqa: E402
from .compress import compress  # noqa: E402
from .inspect_cmd import inspect  # noqa: E402
from .sweep_cmd import sweep  # noqa: E402


class DefaultGroup(click.Group):
    """A group whose first argument, when it is not a subcommand, goes to ``default_command``."""

    default_command = "compress"

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = [self.default_command, *args]
        return super().parse_args(ctx, args)


@click.group(cls=DefaultGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="bmrs-surgery")
def cli() -> None:
    """Compress PyTorch networks with BMRS (Bayesian Model Reduction for Structured pruning).

    \b
    bmrs-compress MODEL --prior uniform --data digits --out runs/demo
    bmrs-compress inspect torchvision:resnet18          (coupled groups)
    bmrs-compress check torchvision:resnet18            (dry run of every stage)
    bmrs-compress compress --help     (all options of the default command)
    """


cli.add_command(compress)
cli.add_command(inspect)
cli.add_command(check)
cli.add_command(bench)
cli.add_command(sweep)


def main(argv: list[str] | None = None) -> None:
    """The console script: click's own usage errors become one line too (exit code 2)."""
    if signal.getsignal(signal.SIGINT) is _interrupted_while_starting:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # started: Ctrl-C is KeyboardInterrupt again
    try:
        code = cli.main(args=argv, prog_name="bmrs-compress", standalone_mode=False)
    except click.UsageError as exc:
        where = f"bmrs-compress {exc.ctx.info_name} --help" if exc.ctx and exc.ctx.parent else "bmrs-compress --help"
        click.echo(f"Error: {exc.format_message()} (see {where})", err=True)
        sys.exit(2)
    except click.ClickException as exc:
        click.echo(f"Error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("Aborted", err=True)
        sys.exit(130)
    except BmrsError as exc:  # raised outside a command's own handler
        fail(exc)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
