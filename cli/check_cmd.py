"""``bmrs-compress check MODEL``: a dry run of every stage with random gates, no data needed."""

from __future__ import annotations

import json

import click

from bmrs_surgery.errors import BmrsError

from ._common import (
    fail,
    input_option,
    input_shape_option,
    inputs_file_option,
    load_network_inputs,
    markup_safe,
    tracer_option,
)
from ._finite import finite


@click.command()
@click.argument("model")
@input_shape_option
@input_option
@inputs_file_option
@tracer_option
@click.option("--ratio", type=click.FloatRange(0, 1, max_open=True), default=0.3, show_default=True,
              callback=finite, help="Share of every group's structures removed at random.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--keep-weights", is_flag=True,
              help="Check with the model's own weights (default: a copy with random weights and norm statistics).")
@click.option("--round-to", type=click.IntRange(min=1), default=None,
              help="Keep a multiple of N channels in every group (hardware-friendly widths).")
@click.option("--no-onnx", is_flag=True, help="Skip ONNX export and the ONNX Runtime comparison.")
@click.option("--ignore", multiple=True, metavar="LAYER", help="Layer whose outputs are never pruned (repeatable).")
@click.option("--arch", help="Architecture of a state-dict MODEL (bundled name or torchvision:NAME).")
@click.option("--trust-model", is_flag=True, help="Allow unpickling a whole nn.Module (runs code from the file).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def check(model, input_shape, inputs, inputs_file, tracer, ratio, seed, keep_weights, round_to, no_onnx, ignore, arch, trust_model, as_json):
    """Trace, group, gate, prune at random, shrink, prove equivalence and export MODEL.

    Each stage reports ok or its error; exit code 0 only when every stage passes (1 otherwise,
    2 for a usage mistake such as a missing file).
    """
    try:
        net, shape, specs, _ = load_network_inputs(model, input_shape, inputs, inputs_file, arch, trust_model)
        if specs and tracer == "fx":
            raise BmrsError("--tracer fx takes one tensor input; named inputs need --tracer export (or auto)")
        from bmrs_surgery.check import check_model

        res = check_model(net, shape, name=model, ratio=ratio, seed=seed, onnx=not no_onnx,
                          ignore=tuple(ignore), keep_weights=keep_weights, round_to=round_to, specs=specs,
                          tracer=tracer)
    except BmrsError as exc:
        fail(exc)
        return
    if as_json:
        click.echo(json.dumps(res.to_dict(), indent=2))
    else:
        _print(res, no_onnx)
    raise SystemExit(0 if res.ok else 1)


def _print(res, no_onnx: bool) -> None:
    from rich.console import Console

    console = Console()
    stages = ["trace", "groups", "gates", "surgery", "verify"] + ([] if no_onnx else ["onnx"])
    if res.parts:  # partial tracing: the top level did not trace, its parts did
        stages = list(res.stages)
    for stage in stages:
        status = res.stages.get(stage)
        # a failed stage's message names layers of the model: shown as text, never as markup
        mark = "[green]ok[/]" if status == "ok" else "[yellow]skipped[/]" if status is None else f"[red]{markup_safe(status)}[/]"
        console.print(f"{stage:8s} {mark}", highlight=False)
    for part in res.parts:
        after = "n/a" if part["params_after"] is None else f"{part['params_after']:,}"
        diff = "" if part["max_abs_diff"] is None else f", max abs diff {part['max_abs_diff']:.3g}"
        ort = "" if part.get("onnx_max_abs_diff") is None else f", ONNX Runtime {part['onnx_max_abs_diff']:.3g}"
        console.print(f"  part {markup_safe(part['name'])}: {'ok' if part['ok'] else 'FAIL'}; parameters "
                      f"{part['params_before']:,} -> {after}{diff}{ort}; {part['boundary']}", highlight=False)
    if res.parts:
        console.print("partial tracing: the top level does not trace (see --json for why); each part pruned and "
                      "proven on its own, the whole model compared on random images"
                      + (f" in float64 (in float32, rounding reordered ranked boxes: {res.whole_float32_max_abs_diff:.3g})"
                         if res.whole_proof_dtype == "float64" else ""), highlight=False)
    elif res.tracer:
        console.print(f"traced with {res.tracer}" + (f"; inputs {' '.join(res.inputs)}" if res.inputs else ""),
                      highlight=False)
    after = "n/a" if res.params_after is None else f"{res.params_after:,}"
    if res.parts:
        console.print(f"{len(res.parts)} parts; parameters {res.params_before:,} -> {after}", highlight=False)
    else:
        console.print(f"{res.groups} groups, {res.structures_kept}/{res.structures} structures kept; "
                      f"parameters {res.params_before:,} -> {after}", highlight=False)
    if res.reach is not None:
        # what an operation without a rule (or a norm over channels) holds is out of reach, never silently
        console.print(f"reach {100 * res.reach:.1f}% of the parameters (in prunable groups)"
                      + (f"; channels kept at {markup_safe(res.opaque[0])}" + (" and more" if len(res.opaque) > 1 else "")
                         if res.opaque and not res.parts else ""), highlight=False)
    if res.max_abs_diff is not None:
        wide = (f" in float64 (float32 rounding, amplified by the network, gave {res.float32_max_abs_diff:.3g})"
                if res.proof_dtype == "float64" else "")
        console.print(f"max abs diff {res.max_abs_diff:.3g}{wide} (output scale {res.output_scale:.3g})"
                      + (f"; ONNX Runtime {res.onnx_max_abs_diff:.3g}" if res.onnx_max_abs_diff is not None else "")
                      + (f" (held to {res.onnx_tolerance:.3g} x the output scale: twice the float32 rounding the proof "
                         "measured)" if res.onnx_tolerance is not None and res.onnx_max_abs_diff is not None else ""),
                      highlight=False)
    console.print("PASS" if res.ok else "FAIL", style="bold green" if res.ok else "bold red")
