"""``bmrs-compress bench A [B]``: ONNX Runtime latency, throughput, size and memory; B/A ratios."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import click

from bmrs_surgery.bench import DEFAULT_TIMEOUT_S, Interrupted, signals_raise
from bmrs_surgery.errors import BmrsError
from bmrs_surgery.limits import machine_cores

from ._common import (
    fail,
    inferred_specs_said,
    input_option,
    input_shape_option,
    inputs_file_option,
    markup_safe,
    named_inputs,
    parse_batch_sizes,
    parse_shape,
)


def _as_onnx(spec: str, input_shape, arch, trust, tmp: Path, tag: str, specs=None, loaded=None):
    """(an .onnx path for ``spec``: itself, or a model exported on the fly; the torch model or None;
    ``loaded``: the model already loaded from ``spec``).
    With named inputs (``specs``) the export has one ONNX input per name, with its dtype, and dynamic
    batch and sequence axes."""
    if spec.endswith(".onnx"):
        return Path(spec), None
    import torch

    from bmrs_surgery.errors import ExportError
    from bmrs_surgery.export import onnx_bytes
    from bmrs_surgery.gated import has_gates, network

    from ._common import load_network

    if specs:
        from bmrs_surgery import loading
        from bmrs_surgery.deploy import plain_network
        from bmrs_surgery.inputs import make_inputs

        loaded = loaded or loading.load_model(spec, arch=arch, trust=trust)
        net = plain_network(loaded.model) if loaded.gated else loaded.model
        example = make_inputs(specs, net, batch=2)  # torch.export fixes a size of 1: export at batch 2
    else:
        net, shape = load_network(spec, input_shape, arch, trust, loaded=loaded)
        example = torch.randn((2,) + tuple(shape[1:]))
    if has_gates(net):
        net = network(net)
    try:
        data, _ = onnx_bytes(net.eval(), example)
    except ExportError as exc:
        raise BmrsError(f"{spec}: {exc}") from None
    path = tmp / f"{tag}.onnx"
    path.write_bytes(data)
    return path, net


@click.command()
@click.argument("model_a")
@click.argument("model_b", required=False)
@click.option("--batch-sizes", default="1,8,32", show_default=True, help="Comma-separated batch sizes.")
@click.option("--threads", type=int, default=0, show_default=True,
              help=f"ONNX Runtime intra-op threads, 0 to the machine's cores ({machine_cores()} here; more are "
                   "refused); 0: ONNX Runtime's default, all cores.")
@click.option("--warmup", type=click.IntRange(min=0), default=5, show_default=True, help="Untimed runs per batch size.")
@click.option("--runs", type=click.IntRange(min=1), default=30, show_default=True, help="Timed runs per batch size.")
@input_shape_option
@input_option
@inputs_file_option
@click.option("--arch", help="Architecture of a state-dict MODEL (bundled name or torchvision:NAME).")
@click.option("--trust-model", is_flag=True, help="Allow unpickling a whole nn.Module (runs code from the file).")
@click.option("--timeout", type=float, default=DEFAULT_TIMEOUT_S, show_default=True, metavar="SECONDS",
              help="Time limit for each answer of an ONNX Runtime worker (loading a model, a batch size's "
                   "warm-up, one round of timed runs); a worker past it is stopped and bench ends with exit code 2.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def bench(model_a, model_b, batch_sizes, threads, warmup, runs, input_shape, inputs, inputs_file, arch, trust_model,
          timeout, as_json):
    """Benchmark MODEL_A (and MODEL_B, interleaved) in ONNX Runtime on the CPU.

    Models are .onnx files, or .pt models / bundled names / hf:DIR exported on the fly. Reports per
    batch size the median, p90 and min latency, throughput, file size and peak memory, and with B
    the ratio B/A.

    Every input of a model is fed with its own dtype and shape, the batch size on axis 0: named
    inputs from --input or --inputs-file (token ids below the vocabulary, masks all ones), else
    those of the .onnx file's graph (a symbolic size besides the batch needs --input).

    SIGINT (Ctrl-C) and SIGTERM stop the workers, remove the temporary files and end with exit
    code 130 or 143.
    """
    try:
        with signals_raise():
            result = _run(model_a, model_b, batch_sizes, threads, warmup, runs, input_shape, arch, trust_model,
                          timeout, inputs, inputs_file)
    except BmrsError as exc:
        fail(exc)
        return
    except (Interrupted, KeyboardInterrupt) as exc:
        code = exc.code if isinstance(exc, Interrupted) else 130
        name = "SIGINT" if code == 130 else str(exc)
        click.echo(f"Interrupted ({name}): bench stopped, its workers ended and temporary files removed", err=True)
        sys.exit(code)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    _print(result)


def _run(model_a, model_b, batch_sizes, threads, warmup, runs, input_shape, arch, trust_model, timeout,
         inputs=(), inputs_file=None) -> dict:
    from bmrs_surgery.bench import benchmark, check_timeout
    from bmrs_surgery.limits import check_threads

    sizes = parse_batch_sizes(batch_sizes)
    specs, example = named_inputs(inputs, inputs_file, input_shape)
    shape = parse_shape(input_shape)
    check_threads(threads)  # before any export: a mistake ends at once
    check_timeout(timeout)
    first = None  # model A, when loaded here to infer its inputs
    if not specs and shape is None and not model_a.endswith(".onnx"):
        from bmrs_surgery import loading
        from bmrs_surgery.deploy import plain_network

        first = loading.load_model(model_a, arch=arch, trust=trust_model)
        if first.input_shape is None:  # nothing says what it takes: its forward's arguments
            specs = inferred_specs_said(plain_network(first.model) if first.gated else first.model, model_a)
    if specs:
        from bmrs_surgery.inputs import bench_feeds
        from bmrs_surgery.limits import check_input_bytes

        for s in specs:  # the largest batch of every input, before anything is exported
            check_input_bytes((max(sizes),) + tuple(s.shape[1:]), what=f"input {s.name} of shape")
    with tempfile.TemporaryDirectory(prefix="bmrs-bench-") as tmp:
        made = [_as_onnx(m, input_shape, arch, trust_model, Path(tmp), f"model{i}", specs, loaded=first if i == 0 else None)
                for i, m in enumerate([model_a] + ([model_b] if model_b else []))]
        paths = [p for p, _ in made]
        feeds = None
        if specs:
            net = next((n for _, n in made if n is not None), None)  # a model's vocabulary bounds its token ids
            feeds = bench_feeds(specs, net, example, tmp)
        result = benchmark(paths, sizes, threads=threads, warmup=warmup, runs=runs,
                           shape=list(shape) if shape else None, timeout=timeout, feeds=feeds)
    for m, spec in zip(result["models"], [model_a, model_b]):
        m["model"] = spec
    return result


def _print(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    s = result["session"]
    table = Table(title=f"ONNX Runtime {s['onnxruntime']} ({s['provider']}, threads {s['intra_op_threads']}, "
                        f"{s['graph_optimization']})")
    for col in ("model", "batch", "median ms", "p90 ms", "min ms", "items/s", "file MB", "peak RSS MB"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for m in result["models"]:
        for b in m["batches"]:
            table.add_row(markup_safe(m["model"]), str(b["batch"]), f"{b['median_ms']:.3f}", f"{b['p90_ms']:.3f}",
                          f"{b['min_ms']:.3f}", f"{b['throughput_per_s']:.1f}", f"{m['file_size_bytes'] / 1e6:.2f}",
                          f"{b['peak_rss_mb']:.0f}")
    console = Console(width=max(120, Console().width))
    console.print(table)
    if s.get("inputs"):
        console.print("inputs: " + "; ".join(markup_safe(i) for i in s["inputs"]), highlight=False)
    for r in result.get("ratios_vs_first", []):
        console.print("B/A median latency: " + ", ".join(
            f"batch {b['batch']}: {b['median_ratio']:.3f}" for b in r["batches"]), highlight=False)
