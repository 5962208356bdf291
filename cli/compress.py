"""``bmrs-compress [compress] MODEL``: fit gates (or use fitted ones), score, prune, report."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from bmrs_surgery import api
from bmrs_surgery.errors import BmrsError, DataError

from ._common import fail, out_dir_option, prepare_out_dir, write_outputs


@click.command()
@click.argument("model")
@click.option("--prior", type=click.Choice(["normal", "uniform"]), default="normal", show_default=True,
              help="Reduced prior: BMRS_N (normal) or BMRS_U (uniform).")
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
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1, ...")
@click.option("--arch", help="Architecture of a state-dict MODEL (bundled name or torchvision:NAME).")
@click.option("--trust-model", is_flag=True, help="Allow unpickling a whole nn.Module (runs code from the file).")
@out_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print report.json to stdout instead of a summary.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def compress(model, prior, precision_bits, data_spec, mode, epochs, finetune_epochs, prune_every,
             batch_size, lr, gate_lr, kl_weighting, noise, seed, device, arch, trust_model, out,
             as_json, quiet):
    """Fit BMRS gates on MODEL (or use its fitted gates), prune where dF >= 0, write the results.

    MODEL is a bundled name (lenet5, mlp), torchvision:NAME, or a saved model file. Writes
    gated.pt, scores.csv and report.json into --out.
    """
    try:
        _run(**locals())
    except BmrsError as exc:
        fail(str(exc))


def _run(model, prior, precision_bits, data_spec, mode, epochs, finetune_epochs, prune_every,
         batch_size, lr, gate_lr, kl_weighting, noise, seed, device, arch, trust_model, out,
         as_json, quiet):
    from bmrs_surgery import loading, report
    from bmrs_surgery.data import check_fits, load_data
    from bmrs_surgery.fit import FitConfig, accuracy, fit

    start = time.perf_counter()
    prepare_out_dir(out, create=False)
    _check_device(device)
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
            gate_lr=gate_lr, kl_weighting=kl_weighting, device=device, seed=seed,
        )
        reporter = None
        if not quiet and not as_json:
            from bmrs_surgery.progress import RichReporter

            reporter = RichReporter()
        if reporter:
            with reporter:
                fit_result = fit(gated, data, cfg, reporter)
        else:
            fit_result = fit(gated, data, cfg)
        gated.to("cpu")
    if data is not None:
        mask = api.gate_bank(gated).mask.clone()
        api.unmask(gated)
        acc["gated"] = accuracy(gated, data.test)
        api.gate_bank(gated).mask.copy_(mask)
    decision = api.decision(gated, api.criterion_for(prior), precision_bits=precision_bits)
    api.apply_decision(gated, decision)
    if data is not None:
        acc["after"] = accuracy(gated, data.test)

    # Everything is serialised in memory first: a failure up to here leaves --out untouched.
    outputs = {"gated_model": "gated.pt", "scores": "scores.csv", "report": "report.json"}
    rows = report.structure_table(gated, decision)
    shape = loaded.input_shape or (data.input_shape if data is not None else None)
    checkpoint = loading.checkpoint_bytes(gated, loaded.arch, shape)
    scores = report.scores_csv(rows)
    doc = report.build_report(
        gated=gated, decision=decision, model_spec=model, data_spec=data_spec, prior=prior,
        precision_bits=precision_bits, fit_result=fit_result, accuracy=acc,
        wall_time_s=time.perf_counter() - start, outputs=outputs,
    )
    doc_bytes = report.report_json(doc)
    out_path = write_outputs(out, {
        outputs["gated_model"]: checkpoint, outputs["scores"]: scores, outputs["report"]: doc_bytes,
    })
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
    console.print(f"wall time {t['wall_time_s']:.1f} s; report: {out_path / 'report.json'}")


def _fmt(value, spec: str) -> str:
    """A number for the summary; None (no data, or not finite) as 'n/a'."""
    return "n/a" if value is None else format(value, spec)
