"""``bmrs-compress sweep MODEL``: accuracy against compression for BMRS_N, BMRS_U, SNR and L2."""

from __future__ import annotations

import json

import click

from bmrs_surgery.errors import BmrsError, DataError
from bmrs_surgery.outputs import prepare_out_dir, write_outputs

from ._common import fail, out_dir_option, printable
from ._finite import finite


@click.command()
@click.argument("model")
@click.option("--data", "data_spec", metavar="SPEC", required=True,
              help="fashion-mnist, digits, or a path to an .npz file with arrays x and y.")
@click.option("--epochs", type=click.IntRange(min=0), default=None,
              help="Post-training fit of the gates before the sweep [default: 10, or 0 for a gated model].")
@click.option("--levels", type=click.IntRange(min=2, max=100), default=10, show_default=True,
              help="Compression levels per criterion.")
@click.option("--criteria", default="bmrs_n,bmrs_u,snr,l2", show_default=True)
@click.option("--finetune-epochs", type=click.IntRange(min=0), default=0, show_default=True,
              help="Fine-tuning epochs at each level (masks frozen).")
@click.option("--precision-bits", type=click.IntRange(1, 22), default=8, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1.5e-3, show_default=True, callback=finite)
@click.option("--gate-lr", type=click.FloatRange(min=0, min_open=True), default=1.5e-2, show_default=True,
              callback=finite)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--arch", help="Architecture of a state-dict MODEL (bundled name or torchvision:NAME).")
@click.option("--trust-model", is_flag=True, help="Allow unpickling a whole nn.Module (runs code from the file).")
@out_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print sweep.json to stdout.")
def sweep(model, data_spec, epochs, levels, criteria, finetune_epochs, precision_bits, batch_size, lr, gate_lr,
          seed, arch, trust_model, out, as_json):
    """Remove MODEL's structures in score order at --levels compression levels for each criterion
    and plot accuracy against compression, with BMRS's own stopping point marked.

    Writes sweep.json and sweep.html (self-contained) into --out.
    """
    try:
        _run(model, data_spec, epochs, levels, criteria, finetune_epochs, precision_bits, batch_size, lr, gate_lr,
             seed, arch, trust_model, out, as_json)
    except BmrsError as exc:
        fail(exc)


def _run(model, data_spec, epochs, levels, criteria, finetune_epochs, precision_bits, batch_size, lr, gate_lr,
         seed, arch, trust_model, out, as_json):
    from bmrs_surgery import loading
    from bmrs_surgery.data import check_fits, head, load_data
    from bmrs_surgery.fit import FitConfig, fit
    from bmrs_surgery.gated import attach_gates, unmask
    from bmrs_surgery.report_html import sweep_page
    from bmrs_surgery.sweep import SWEEP_CRITERIA
    from bmrs_surgery.sweep import sweep as run_sweep

    crits = tuple(c.strip() for c in criteria.split(",") if c.strip())
    bad = [c for c in crits if c not in SWEEP_CRITERIA]
    if bad or not crits:
        raise BmrsError(f"--criteria: unknown {bad[0] if bad else '(empty)'}; choose from {', '.join(SWEEP_CRITERIA)}")
    prepare_out_dir(out, create=False)
    loaded = loading.load_model(model, arch=arch, trust=trust_model)
    data = load_data(data_spec, seed=seed)
    net = loaded.model
    check_fits(net, data)
    if epochs is None:
        epochs = 0 if loaded.gated else 10
    if not loaded.gated:
        net = attach_gates(net, head(data.train, 2))  # in-memory and streamed (imagefolder:) splits alike
    elif epochs == 0:
        unmask(net)
    cfg = FitConfig(epochs=epochs, mode="post-training", prior="uniform", precision_bits=precision_bits,
                    batch_size=batch_size, lr=lr, gate_lr=gate_lr, seed=seed, finetune_epochs=0)
    if epochs:
        from bmrs_surgery.progress import make_reporter

        fit(net, data, cfg, None if as_json else make_reporter())
        net.to("cpu")
        unmask(net)
    if not loaded.gated and not epochs:
        raise DataError("sweep needs fitted gates: give --epochs > 0 for a model without gates")
    result = run_sweep(net, data, crits, levels, finetune_epochs, precision_bits, cfg,
                       progress=None if as_json else lambda text: click.echo(text, err=True))
    result["model"], result["data"] = model, data_spec
    doc = (json.dumps(result, indent=2) + "\n").encode()
    write_outputs(out, {"sweep.json": doc, "sweep.html": sweep_page(result)})
    if as_json:
        click.echo(doc.decode(), nl=False)
        return
    stop = result["bmrs_stop"]
    for crit, pts in result["curves"].items():
        click.echo(f"{crit:7s} " + "  ".join(f"{p['compression'] * 100:5.1f}%:{p['accuracy'] * 100:5.1f}" for p in pts))
    if stop:
        click.echo(f"BMRS ({stop['criterion']}) stops at {stop['compression'] * 100:.1f}% compression, "
                   f"accuracy {stop['accuracy'] * 100:.1f}%")
    if "stop_minus_knee" in result:
        d = result["stop_minus_knee"]
        click.echo(f"stop minus knee: {d['compression_points']:+.1f} compression points, "
                   f"{d['accuracy_points']:+.1f} accuracy points")
    click.echo(f"written: {printable(out / 'sweep.html')}")
