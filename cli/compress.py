"""``bmrs-compress [compress] MODEL``: options in, a :class:`~bmrs_surgery.job.Job` to the library's
``compress``, the summary out."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import click

from bmrs_surgery import defaults
from bmrs_surgery.bench import Interrupted
from bmrs_surgery.errors import BmrsError
from bmrs_surgery.fit import FINETUNE_GATES, MODES
from bmrs_surgery.gated import KL_WEIGHTINGS
from bmrs_surgery.gates import NOISE_MODES
from bmrs_surgery.job import Job
from bmrs_surgery.pipeline import compress as compress_job

from ._common import EPOCHS, fail, input_option, inputs_file_option, markup_safe, out_dir_option, parse_batch_sizes
from .user_options import ROUND_TO, user_options


def _init_distributed(device: str) -> str:
    """Under torchrun (WORLD_SIZE > 1): join the process group (NCCL on CUDA, gloo on CPU) and
    return this rank's device."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    import torch
    import torch.distributed as dist

    cuda = device.startswith("cuda")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return f"cuda:{local}"
    return device


def _end_distributed() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # no rank tears the group down while another still talks to it
        dist.destroy_process_group()


def _terminate(signum, frame):
    raise KeyboardInterrupt


@click.command()
@click.argument("model")
@click.option("--prior", type=click.Choice(["normal", "uniform"]), default=defaults.PRIOR, show_default=True,
              help="Reduced prior: BMRS_U (uniform) or BMRS_N (normal; exact Eq. 8 rarely prunes while "
                   "fitting, see README).")
@click.option("--precision-bits", type=click.IntRange(1, 22), default=defaults.PRECISION_BITS, show_default=True,
              help="BMRS_U: bits of precision below which a gate counts as zero.")
@click.option("--data", "data_spec", metavar="SPEC",
              help="fashion-mnist, fashion-mnist-sample, digits, a path to an .npz file with arrays x and y, "
                   "imagefolder:DIR (class folders, or train/ and val/) or csv:FILE (with --target COLUMN); with --input, "
                   "an .npz with one token array per input, and labels (without them the gates are fitted by "
                   "distillation to the model's own outputs).")
@click.option("--mode", type=click.Choice(MODES), default=defaults.MODE,
              show_default=True, help="Prune while fitting, or once after fitting.")
@click.option("--epochs", type=EPOCHS, default=None,
              help=f"Fitting epochs, or auto: fit until the gates settle (the decisions stable, a fit ten times as "
                   f"long projected to change them by at most {defaults.SETTLE_PROJECTED_TOLERANCE:.0%} of the "
                   f"parameters, the objective flat), at most --max-steps steps [default: {defaults.EPOCHS}, or 0 for a model "
                   "that already carries fitted gates].")
@click.option("--max-steps", type=click.IntRange(min=1), default=defaults.MAX_STEPS, show_default=True,
              help="--epochs auto: the most optimiser steps to fit for (a fit stopped here unsettled says so).")
@click.option("--max-minutes", type=click.FloatRange(min=0, min_open=True), default=None,
              help="--epochs auto: and the most wall time to fit for, in minutes [default: no limit].")
@click.option("--finetune-epochs", type=click.IntRange(min=0), default=defaults.FINETUNE_EPOCHS, show_default=True,
              help="Epochs of fine-tuning with the masks frozen.")
@click.option("--prune-every", type=click.IntRange(min=1), default=defaults.PRUNE_EVERY, show_default=True,
              help="Continuous mode: re-score every P epochs.")
@click.option("--batch-size", type=click.IntRange(min=1), default=defaults.BATCH_SIZE, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None,
              help=f"Learning rate of the weights [default: {defaults.LR:g}; {defaults.DISTILL_LR:g} on data without "
                   "labels, fitted by distillation to the model's own outputs].")
@click.option("--gate-lr", type=click.FloatRange(min=0, min_open=True), default=defaults.GATE_LR, show_default=True,
              help="Learning rate of the gate posteriors.")
@click.option("--kl-weighting", type=click.Choice(KL_WEIGHTINGS), default=defaults.KL_WEIGHTING, show_default=True,
              help="KL term: mean over structures (authors' code) or summed / training-set size (ELBO).")
@click.option("--noise", type=click.Choice(NOISE_MODES), default=defaults.NOISE,
              show_default=True, help="One gate sample per example, per step, or per activation element.")
@click.option("--finetune-gates", type=click.Choice(FINETUNE_GATES), default=defaults.FINETUNE_GATES,
              show_default=True, help="Fine-tune with noisy gates, or with the deployed E[theta] (posteriors frozen).")
@click.option("--seed", type=int, default=defaults.SEED, show_default=True)
@click.option("--device", default=defaults.DEVICE, show_default=True, help="cpu, cuda, cuda:1, ...")
@click.option("--amp", is_flag=True, help="bf16 autocast for the network while fitting (gate math stays float32).")
@click.option("--arch", help="Architecture of a state-dict MODEL (bundled name or torchvision:NAME).")
@click.option("--trust-model", is_flag=True, help="Allow unpickling a whole nn.Module (runs code from the file).")
@click.option("--sweep", "sweep_levels", type=click.IntRange(min=0, max=100), default=defaults.SWEEP_LEVELS, show_default=True,
              help="Also sweep compression at K levels per criterion (needs --data) and plot it in report.html.")
@click.option("--round-to", type=ROUND_TO, default=defaults.ROUND_TO,
              help="Keep a multiple of N channels in every group (hardware-friendly widths), or auto: per group, "
                   "the width at or above BMRS's with the lowest latency measured in ONNX Runtime on this machine.")
@user_options
@input_option
@inputs_file_option
@click.option("--bench-batch-sizes", default=",".join(map(str, defaults.BENCH_BATCH_SIZES)), show_default=True,
              help="ONNX Runtime benchmark of original vs pruned at these batch sizes ('' to skip).")
@click.option("--threads", type=click.IntRange(min=0), default=defaults.THREADS, show_default=True,
              help="ONNX Runtime intra-op threads for the benchmark (0: all cores).")
@out_dir_option
@click.option("--resume", is_flag=True,
              help="Continue an interrupted fit from the state saved after its last complete epoch in --out.")
@click.option("--overwrite", is_flag=True,
              help="Replace the outputs of an earlier run in --out (refused otherwise; --resume allows it too).")
@click.option("--json", "as_json", is_flag=True, help="Print report.json to stdout instead of a summary.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def compress(model, prior, precision_bits, data_spec, mode, epochs, max_steps, max_minutes, finetune_epochs, prune_every,  # noqa: PLR0913
             batch_size, lr, gate_lr, kl_weighting, noise, finetune_gates, seed, device, amp, arch, trust_model,
             sweep_levels, round_to, inputs, inputs_file, bench_batch_sizes, threads, out, resume, overwrite, as_json,
             quiet, **user_opts):
    """Fit BMRS gates on MODEL (or use its fitted gates), prune where dF >= 0, remove the pruned
    structures for real, prove the result, export and benchmark it.

    MODEL is a bundled name (lenet5, mlp, ...), torchvision:NAME, or a saved model file. Writes
    into --out: pruned.pt, pruned.onnx, gated.pt, scores.csv, report.json and report.html.

    A model that takes named inputs (token ids, an attention mask) is given them with --input
    NAME:DTYPE:SHAPE (repeatable) or --inputs-file: fitted on --data tokens.npz (one array per
    input, and labels; without labels, by distillation to the model's own outputs), or, already
    carrying fitted gates, pruned without --data.
    """
    from bmrs_surgery.outputs import epochs_saved

    previous = signal.signal(signal.SIGTERM, _terminate)  # SIGTERM ends the run like Ctrl-C
    try:
        job = Job(
            model=model, data=data_spec, out=out, arch=arch, trust_model=trust_model, prior=prior,
            precision_bits=precision_bits, mode=mode, epochs=epochs, max_steps=max_steps, max_minutes=max_minutes,
            finetune_epochs=finetune_epochs,
            prune_every=prune_every, batch_size=batch_size, lr=lr, gate_lr=gate_lr, kl_weighting=kl_weighting,
            noise=noise, finetune_gates=finetune_gates, seed=seed, device=_init_distributed(device), amp=amp,
            sweep_levels=sweep_levels, round_to=round_to, inputs=tuple(inputs), inputs_file=inputs_file,
            bench_batch_sizes=parse_batch_sizes(bench_batch_sizes, "--bench-batch-sizes") if bench_batch_sizes.strip() else (),
            threads=threads, resume=resume, overwrite=overwrite, **user_opts,
        )
        result = _run(job, quiet or as_json)
    except BmrsError as exc:
        fail(exc)
    except (KeyboardInterrupt, Interrupted) as exc:
        code = getattr(exc, "code", 130)
        done = epochs_saved(out)
        if done:
            click.echo(f"Interrupted after epoch {done}: no outputs written; continue with the same command and "
                       "--resume", err=True)
        else:
            click.echo("Interrupted: no outputs written (no complete epoch to resume from)", err=True)
        sys.exit(code)
    finally:
        signal.signal(signal.SIGTERM, previous)
        _end_distributed()
    if result.report is None:
        return  # a data-parallel rank other than 0
    _say_settling(result.report)
    from bmrs_surgery.budget import unmet_warning

    warning = unmet_warning(result.report.get("plan"))
    if warning:  # a budget the run could not meet: said, not a silent success
        click.echo(warning, err=True)
    if as_json:
        click.echo(result.files["report.json"].decode(), nl=False)
    else:
        _print_summary(result.report, result.out)


def _run(job: Job, quiet: bool):
    """The library pipeline, with a progress display on rank 0 unless ``quiet``."""
    from bmrs_surgery.fit import distributed_rank

    if quiet or distributed_rank()[0] != 0:
        return compress_job(job)
    from bmrs_surgery.progress import make_reporter

    return compress_job(job, make_reporter())  # bars on a terminal, flushed lines in a log


def _say_settling(doc: dict) -> None:
    """Whether the gates settled, on stderr (so a log or CI sees it, --json or not): an unsettled fit
    is one line saying so and what to run instead; a settled one's result, 0% included, is an answer."""
    info = (doc.get("fit") or {}).get("settling")
    if doc.get("settled") is None or not info:
        return
    if doc["settled"]:
        click.echo(f"the gates settled after {info['settled_at_step']} optimiser steps "
                   f"(fit stopped after {info['steps']}: {info['stopped']})", err=True)
    else:
        from bmrs_surgery.settling import unsettled_message

        click.echo(f"Warning: {unsettled_message(info)}", err=True)


def _print_summary(doc: dict, out_path: Path) -> None:
    """The summary on stdout. Layer names come from the model and the path from the user: both go
    through :func:`markup_safe` (no rich markup, no control characters reach the terminal)."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"BMRS ({markup_safe(doc['criterion'])}): structures kept per layer")
    for col in ("layer", "before", "after", "min dF", "max dF"):
        table.add_column(col, justify="right" if col != "layer" else "left")
    for layer in doc["layers"]:
        table.add_row(markup_safe(layer["name"]), str(layer["structures_before"]), str(layer["structures_after"]),
                      _fmt(layer["dF"].get("min"), ".3g"), _fmt(layer["dF"].get("max"), ".3g"))
    console.print(table)
    t = doc["totals"]
    console.print(f"parameter compression: {t['parameter_compression']:.2%} "
                  f"({t['parameters_removable']} of {t['parameters']} parameters removable)")
    fid = doc.get("fidelity")
    if fid:  # data without labels: the mean cosine to the original outputs, not an accuracy
        console.print(f"test {fid['metric']}: before {_fmt(fid.get('before'), '.4f')}, gated "
                      f"{_fmt(fid.get('gated'), '.4f')}, after pruning {_fmt(fid.get('after'), '.4f')}", highlight=False)
    elif doc["data"] is not None:
        console.print(f"test accuracy: before {_fmt(t['accuracy_before'], '.4f')}, "
                      f"gated {_fmt(t['accuracy_gated'], '.4f')}, after pruning {_fmt(t['accuracy_after'], '.4f')}")
    sur = doc.get("surgery")
    if sur:
        c = sur["counts"]
        console.print(f"pruned network: parameters {c['params_before']:,} -> {c['params_after']:,} "
                      f"({c['params_ratio']:.3f}x), MACs {c['macs_before']:,} -> {c['macs_after']:,} "
                      f"({c['macs_ratio']:.3f}x); proof max abs diff {sur['proof']['max_abs_diff']:.2g}, "
                      f"ONNX Runtime {sur['onnx']['onnxruntime_max_abs_diff']:.2g}", highlight=False)
        if t.get("accuracy_pruned") is not None:
            console.print(f"pruned network test accuracy: {t['accuracy_pruned']:.4f}")
        if fid and fid.get("pruned") is not None:
            console.print(f"pruned network test {fid['metric']}: {fid['pruned']:.4f}", highlight=False)
        bench = sur.get("benchmark")
        if bench:
            a, b = bench["models"]
            console.print("ONNX Runtime latency pruned/original: " + ", ".join(
                f"batch {x['batch']}: {y['median_ms']:.3f}/{x['median_ms']:.3f} ms = {y['median_ms'] / x['median_ms']:.2f}x"
                for x, y in zip(a["batches"], b["batches"])), highlight=False)
    console.print(f"wall time {t['wall_time_s']:.1f} s; report: {markup_safe(out_path / 'report.html')}",
                  highlight=False)


def _fmt(value, spec: str) -> str:
    """A number for the summary; None (no data, or not finite) as 'n/a'."""
    return "n/a" if value is None else format(value, spec)
