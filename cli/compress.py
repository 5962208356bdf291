"""``bmrs-compress [compress] MODEL``: fit gates (or use fitted ones), score, prune, report."""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

import click

from bmrs_surgery import api
from bmrs_surgery.errors import BmrsError, DataError
from bmrs_surgery.fit import FINETUNE_GATES, FitConfig

from ._common import fail, out_dir_option, prepare_out_dir, write_outputs

RESUME_FILE = ".bmrs-resume.pt"
RESUME_FORMAT = "bmrs-surgery/resume/1"


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


class ResumeWriter:
    """After every epoch, the training state, written atomically to ``--out/.bmrs-resume.pt``: an
    interrupted run leaves the last complete epoch (and any earlier complete outputs) intact."""

    def __init__(self, out: Path, job: dict):
        self.out, self.job = out, job

    def __call__(self, state: dict) -> None:
        import io

        import torch

        from bmrs_surgery.loading import atomic_write

        prepare_out_dir(self.out, create=True)
        buf = io.BytesIO()
        torch.save({"format": RESUME_FORMAT, "job": self.job, "state": state}, buf)
        atomic_write(self.out / RESUME_FILE, lambda f: f.write(buf.getvalue()))


def read_resume_state(out: Path, job: dict) -> dict:
    import torch

    path = out / RESUME_FILE
    if not path.is_file():
        raise BmrsError(f"--resume: no saved state in {out} (nothing was interrupted there)")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001
        raise BmrsError(f"--resume: {path} is damaged; run again without --resume") from None
    if not isinstance(saved, dict) or saved.get("format") != RESUME_FORMAT:
        raise BmrsError(f"--resume: {path} is not a bmrs-surgery resume state")
    if saved.get("job") != job:
        diff = sorted(k for k in set(job) | set(saved.get("job") or {}) if (saved.get("job") or {}).get(k) != job.get(k))
        raise BmrsError(f"--resume: the saved state belongs to a different job (differs in {', '.join(diff)})")
    return saved["state"]


def _epochs_saved(out: Path) -> int | None:
    try:
        import torch

        return int(torch.load(out / RESUME_FILE, weights_only=True)["state"]["epochs_done"])
    except Exception:  # noqa: BLE001
        return None


@click.command()
@click.argument("model")
@click.option("--prior", type=click.Choice(["normal", "uniform"]), default="uniform", show_default=True,
              help="Reduced prior: BMRS_U (uniform) or BMRS_N (normal; exact Eq. 8 rarely prunes while "
                   "fitting, see README).")
@click.option("--precision-bits", type=click.IntRange(1, 22), default=8, show_default=True,
              help="BMRS_U: bits of precision below which a gate counts as zero.")
@click.option("--data", "data_spec", metavar="SPEC",
              help="fashion-mnist, digits, or a path to an .npz file with arrays x and y.")
@click.option("--mode", type=click.Choice(["continuous", "post-training"]), default="continuous",
              show_default=True, help="Prune while fitting, or once after fitting.")
@click.option("--epochs", type=click.IntRange(min=0), default=None,
              help="Fitting epochs [default: 20, or 0 for a model that already carries fitted gates].")
@click.option("--finetune-epochs", type=click.IntRange(min=0), default=2, show_default=True,
              help="Epochs of fine-tuning with the masks frozen.")
@click.option("--prune-every", type=click.IntRange(min=1), default=1, show_default=True,
              help="Continuous mode: re-score every P epochs.")
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1.5e-3, show_default=True)
@click.option("--gate-lr", type=click.FloatRange(min=0, min_open=True), default=1.5e-2, show_default=True,
              help="Learning rate of the gate posteriors.")
@click.option("--kl-weighting", type=click.Choice(["mean", "elbo"]), default="mean", show_default=True,
              help="KL term: mean over structures (authors' code) or summed / training-set size (ELBO).")
@click.option("--noise", type=click.Choice(["sample", "structure", "element"]), default="sample",
              show_default=True, help="One gate sample per example, per step, or per activation element.")
@click.option("--finetune-gates", type=click.Choice(FINETUNE_GATES), default=FitConfig.finetune_gates,
              show_default=True, help="Fine-tune with noisy gates, or with the deployed E[theta] (posteriors frozen).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1, ...")
@click.option("--amp", is_flag=True, help="bf16 autocast for the network while fitting (gate math stays float32).")
@click.option("--arch", help="Architecture of a state-dict MODEL (bundled name or torchvision:NAME).")
@click.option("--trust-model", is_flag=True, help="Allow unpickling a whole nn.Module (runs code from the file).")
@click.option("--sweep", "sweep_levels", type=click.IntRange(min=0, max=100), default=0, show_default=True,
              help="Also sweep compression at K levels per criterion (needs --data) and plot it in report.html.")
@click.option("--round-to", type=click.IntRange(min=1), default=None,
              help="Keep a multiple of N channels in every group (hardware-friendly widths).")
@click.option("--bench-batch-sizes", default="1,8,32", show_default=True,
              help="ONNX Runtime benchmark of original vs pruned at these batch sizes ('' to skip).")
@click.option("--threads", type=click.IntRange(min=0), default=0, show_default=True,
              help="ONNX Runtime intra-op threads for the benchmark (0: all cores).")
@out_dir_option
@click.option("--resume", is_flag=True,
              help="Continue an interrupted fit from the state saved after its last complete epoch in --out.")
@click.option("--json", "as_json", is_flag=True, help="Print report.json to stdout instead of a summary.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def compress(model, prior, precision_bits, data_spec, mode, epochs, finetune_epochs, prune_every,
             batch_size, lr, gate_lr, kl_weighting, noise, finetune_gates, seed, device, amp, arch, trust_model, sweep_levels,
             round_to, bench_batch_sizes, threads, out, resume, as_json, quiet):
    """Fit BMRS gates on MODEL (or use its fitted gates), prune where dF >= 0, remove the pruned
    structures for real, prove the result, export and benchmark it.

    MODEL is a bundled name (lenet5, mlp, ...), torchvision:NAME, or a saved model file. Writes
    into --out: pruned.pt, pruned.onnx, gated.pt, scores.csv, report.json and report.html.
    """
    options = dict(locals())
    previous = signal.signal(signal.SIGTERM, _terminate)  # SIGTERM ends the run like Ctrl-C
    try:
        options["device"] = _init_distributed(device)
        _run(**options)
    except BmrsError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        done = _epochs_saved(out)
        where = f" after epoch {done}" if done else ""
        click.echo(f"Interrupted{where}: no outputs written; continue with the same command and --resume", err=True)
        sys.exit(130)
    finally:
        signal.signal(signal.SIGTERM, previous)
        _end_distributed()


def _run(model, prior, precision_bits, data_spec, mode, epochs, finetune_epochs, prune_every,
         batch_size, lr, gate_lr, kl_weighting, noise, finetune_gates, seed, device, amp, arch, trust_model, sweep_levels,
         round_to, bench_batch_sizes, threads, out, resume, as_json, quiet):
    import io

    import torch

    from bmrs_surgery import loading, report, report_html
    from bmrs_surgery.criteria import Decision
    from bmrs_surgery.deploy import deploy
    from bmrs_surgery.plan import plan_keep

    from .bench_cmd import _batch_sizes
    from bmrs_surgery.data import check_fits, load_data
    from bmrs_surgery.fit import accuracy, distributed_rank, fit

    start = time.perf_counter()
    sizes = _batch_sizes(bench_batch_sizes) if bench_batch_sizes.strip() else None
    prepare_out_dir(out, create=False)
    _check_device(device)
    torch.manual_seed(seed)  # --seed fixes everything, the initial weights of a fresh network included
    loaded = loading.load_model(model, arch=arch, trust=trust_model)
    data = load_data(data_spec, seed=seed) if data_spec else None
    if not loaded.gated and data is None:
        raise DataError(f"{model} carries no fitted gates: give --data to fit them")
    if epochs is None:
        epochs = 0 if loaded.gated else 20
    if epochs and data is None:
        raise DataError("--epochs needs --data")
    acc: dict = {}
    fit_result = None
    net = loaded.model
    if data is not None:
        check_fits(net, data)
        acc["split"] = "test"
        if not loaded.gated:
            acc["before"] = accuracy(net, data.test)
            example = data.train.tensors[0][:2]
            net = api.attach_gates(net, example, noise=noise)
        else:
            api.unmask(net)
            acc["before"] = accuracy(net, data.test)
    gated = net
    if epochs or (data is not None and finetune_epochs and not loaded.gated):
        cfg = FitConfig(
            epochs=epochs, mode=mode, prior=prior, precision_bits=precision_bits,
            prune_every=prune_every, finetune_epochs=finetune_epochs, batch_size=batch_size, lr=lr,
            gate_lr=gate_lr, kl_weighting=kl_weighting, device=device, seed=seed, amp=amp,
            finetune_gates=finetune_gates,
        )
        job = {"model": model, "data": data_spec, "arch": arch, "noise": noise, **cfg.__dict__}
        job.pop("device")
        state = read_resume_state(out, job) if resume else None
        rank, _ = distributed_rank()
        reporter = None
        if not quiet and not as_json and rank == 0:
            from bmrs_surgery.progress import RichReporter

            reporter = RichReporter()
        saver = ResumeWriter(out, job) if rank == 0 else None  # one writer: rank 0
        if reporter:
            with reporter:
                fit_result = fit(gated, data, cfg, reporter, checkpoint=saver, resume=state)
        else:
            fit_result = fit(gated, data, cfg, checkpoint=saver, resume=state)
        gated.to("cpu")
    elif resume:
        raise BmrsError("--resume: this job fits nothing (no --epochs, no fine-tuning), so there is nothing to resume")
    if distributed_rank()[0] != 0:
        return  # every rank holds the same fitted model; rank 0 scores, prunes and writes
    if data is not None:
        mask = api.gate_bank(gated).mask.clone()
        api.unmask(gated)
        acc["gated"] = accuracy(gated, data.test)
        api.gate_bank(gated).mask.copy_(mask)
    sweep_result = None
    if sweep_levels:
        if data is None:
            raise DataError("--sweep needs --data")
        from bmrs_surgery.sweep import sweep as run_sweep

        sweep_result = run_sweep(gated, data, levels=sweep_levels, precision_bits=precision_bits)
    decision = api.decision(gated, api.criterion_for(prior), precision_bits=precision_bits)
    bank = api.gate_bank(gated)
    keep = plan_keep(bank, decision.keep, decision.score, round_to)  # no group emptied; rounding
    decision = Decision(decision.criterion, decision.score, keep)
    api.apply_decision(gated, decision)
    if data is not None:
        acc["after"] = accuracy(gated, data.test)
    shape = loaded.input_shape or getattr(gated, "input_shape", None) or (data.input_shape if data is not None else None)
    if shape is None:
        raise BmrsError(f"{model}: input shape unknown (give --data, or save the model with its input shape)")
    real = [data.test.tensors[0][:64]] if data is not None else None
    dep = deploy(gated, keep, (1,) + tuple(shape), real, sizes, threads=threads)
    if data is not None:
        acc["pruned"] = accuracy(dep.pruned, data.test)

    # Everything is serialised in memory first: a failure up to here leaves --out untouched.
    outputs = {"pruned_model": "pruned.pt", "onnx": "pruned.onnx", "gated_model": "gated.pt",
               "scores": "scores.csv", "report": "report.json", "html": "report.html"}
    rows = report.structure_table(gated, decision)
    buf = io.BytesIO()
    torch.save(dep.pruned, buf)
    checkpoint = loading.checkpoint_bytes(gated, loaded.arch, shape)
    scores = report.scores_csv(rows)
    doc = report.build_report(
        gated=gated, decision=decision, model_spec=model, data_spec=data_spec, prior=prior,
        precision_bits=precision_bits, fit_result=fit_result, accuracy=acc,
        wall_time_s=time.perf_counter() - start, outputs=outputs, deployment=dep, sweep=sweep_result,
    )
    doc_bytes = report.report_json(doc)
    html_bytes = report_html.render(report._finite(doc), rows)
    out_path = write_outputs(out, {
        outputs["pruned_model"]: buf.getvalue(), outputs["onnx"]: dep.onnx,
        outputs["gated_model"]: checkpoint, outputs["scores"]: scores, outputs["report"]: doc_bytes,
        outputs["html"]: html_bytes,
    })
    (out / RESUME_FILE).unlink(missing_ok=True)  # the job is complete: nothing left to resume
    if as_json:
        click.echo(doc_bytes.decode(), nl=False)
    else:
        _print_summary(json.loads(doc_bytes), out_path)


def _check_device(device: str) -> None:
    """``--device`` names a device this machine has (checked before any work)."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise BmrsError(f"--device {device}: not a device name (use cpu, cuda or cuda:N)") from None
    if dev.type == "cpu":
        return
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise BmrsError(f"--device {device}: CUDA is not available on this machine")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise BmrsError(f"--device {device}: this machine has {count} CUDA device(s)")
        return
    if dev.type == "mps" and torch.backends.mps.is_available():
        return
    raise BmrsError(f"--device {device}: unsupported or unavailable device (use cpu, cuda or cuda:N)")


def _print_summary(doc: dict, out_path: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"BMRS ({doc['criterion']}): structures kept per layer")
    for col in ("layer", "before", "after", "min dF", "max dF"):
        table.add_column(col, justify="right" if col != "layer" else "left")
    for layer in doc["layers"]:
        table.add_row(layer["name"], str(layer["structures_before"]), str(layer["structures_after"]),
                      _fmt(layer["dF"].get("min"), ".3g"), _fmt(layer["dF"].get("max"), ".3g"))
    console.print(table)
    t = doc["totals"]
    console.print(f"parameter compression: {t['parameter_compression']:.2%} "
                  f"({t['parameters_removable']} of {t['parameters']} parameters removable)")
    if doc["data"] is not None:
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
        bench = sur.get("benchmark")
        if bench:
            a, b = bench["models"]
            console.print("ONNX Runtime latency pruned/original: " + ", ".join(
                f"batch {x['batch']}: {y['median_ms']:.3f}/{x['median_ms']:.3f} ms = {y['median_ms'] / x['median_ms']:.2f}x"
                for x, y in zip(a["batches"], b["batches"])), highlight=False)
    console.print(f"wall time {t['wall_time_s']:.1f} s; report: {out_path / 'report.html'}")


def _fmt(value, spec: str) -> str:
    """A number for the summary; None (no data, or not finite) as 'n/a'."""
    return "n/a" if value is None else format(value, spec)
