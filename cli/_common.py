"""Pieces shared by the commands: one-line errors with flag names, option parsers."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from bmrs_surgery.errors import BmrsError
from bmrs_surgery.report import printable

# library parameter -> command-line name, where it is not "--" + the parameter with dashes
FLAG_NAMES = {"model": "MODEL", "data": "--data", "sweep_levels": "--sweep", "example_input": "--input-shape"}


def flag(param: str) -> str:
    return FLAG_NAMES.get(param, "--" + param.replace("_", "-"))


def markup_safe(text) -> str:
    """``text`` for a rich console: printable (see :func:`printable`) and rich markup escaped, so a
    name like ``[link=...]`` or ``[/x]`` is shown as it is, never interpreted (or crashing).
    Plain click output uses :func:`printable` alone."""
    from rich.markup import escape

    return escape(printable(text))


def fail(error: BaseException | str) -> None:
    """One line on stderr, exit code 2: how every user mistake ends. A library error that names a
    parameter is shown with the option's flag."""
    if isinstance(error, BmrsError) and error.param:
        message = f"{flag(error.param)}: {error.message}"
    else:
        message = str(error)
    first = next((ln for ln in message.splitlines() if ln.strip()), "failed")
    click.echo(f"Error: {printable(first)}", err=True)
    sys.exit(2)


out_dir_option = click.option(
    "--out", "-o", required=True, type=click.Path(file_okay=True, dir_okay=True, path_type=Path),
    help="Output folder (created if missing).",
)


def parse_batch_sizes(text: str, option: str = "--batch-sizes") -> tuple[int, ...]:
    """``"1,8,32"`` -> (1, 8, 32); a one-line error for anything else."""
    try:
        sizes = tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise BmrsError(f"{option} {text!r}: expected comma-separated positive integers") from None
    if not sizes or any(s <= 0 for s in sizes):
        raise BmrsError(f"{option} {text!r}: expected comma-separated positive integers")
    return sizes


def parse_shape(text: str | None) -> tuple[int, ...] | None:
    """``"1,3,224,224"`` -> (1, 3, 224, 224); a one-line error for anything else."""
    if text is None:
        return None
    try:
        shape = tuple(int(p) for p in text.replace("x", ",").split(",") if p.strip())
    except ValueError:
        raise BmrsError(f"--input-shape {text!r}: expected comma-separated positive integers, e.g. 1,3,224,224") from None
    if len(shape) < 2 or any(d <= 0 for d in shape):
        raise BmrsError(f"--input-shape {text!r}: expected at least a batch and one more dimension, all positive")
    from bmrs_surgery.limits import check_input_bytes

    check_input_bytes(shape)  # 1,3,100000,100000 would be 120 GB of float32: refused before any allocation
    return shape


input_shape_option = click.option(
    "--input-shape", metavar="B,C,H,W", help="Shape of one input batch, e.g. 1,3,224,224 [default: the model's own, if known].")


def load_network(spec: str, input_shape: str | None, arch: str | None, trust: bool, loaded=None):
    """(plain network, input shape with batch axis) for the graph commands; a gated file gives its
    network without the gates. ``loaded``: the model already loaded from ``spec``."""
    from bmrs_surgery import loading
    from bmrs_surgery.deploy import plain_network

    loaded = loaded or loading.load_model(spec, arch=arch, trust=trust)
    net = plain_network(loaded.model) if loaded.gated else loaded.model
    shape = parse_shape(input_shape)
    if shape is None:
        if loaded.input_shape is None:
            raise BmrsError(f"{spec}: input shape unknown; give --input-shape, e.g. 1,3,224,224")
        shape = (1,) + tuple(loaded.input_shape)
    from bmrs_surgery.limits import check_first_layer

    check_first_layer(net, shape)  # e.g. 64 channels at full resolution of a large image
    return net, shape


input_option = click.option(
    "--input", "inputs", multiple=True, metavar="NAME:DTYPE:SHAPE",
    help="A named model input, e.g. input_ids:int64:1x128 (repeatable; given as keyword arguments).")
inputs_file_option = click.option(
    "--inputs-file", type=click.Path(dir_okay=False), default=None,
    help="A .safetensors file of named example inputs (their names, dtypes and shapes).")
tracer_option = click.option(
    "--tracer", type=click.Choice(("auto", "fx", "export")), default="auto", show_default=True,
    help="Graph capture: torch.fx, torch.export (strict=False), or auto (what works).")


def named_inputs(inputs, inputs_file, input_shape):
    """(specs, example file tensors) from ``--input`` / ``--inputs-file``, or (None, None) without them."""
    if not inputs and not inputs_file:
        return None, None
    from bmrs_surgery import inputs as named

    if input_shape is not None:
        raise BmrsError("--input-shape and --input/--inputs-file exclude each other: give the shapes in --input")
    if inputs and inputs_file:
        raise BmrsError("--input and --inputs-file exclude each other")
    example = named.load_example_file(inputs_file) if inputs_file else None
    return (named.specs_of(example) if example is not None else named.parse_inputs(inputs)), example


def load_network_inputs(spec: str, input_shape: str | None, inputs, inputs_file, arch: str | None, trust: bool):
    """(network, input shape, named input specs or None, example file tensors or None): named
    inputs from ``--input``/``--inputs-file``; without them and without ``--input-shape``, the
    model's saved input shape, else named inputs inferred from its forward's signature (said on
    stderr); else one float tensor as :func:`load_network`."""
    from bmrs_surgery import loading
    from bmrs_surgery.deploy import plain_network

    if not inputs and not inputs_file:
        loaded = loading.load_model(spec, arch=arch, trust=trust)
        if input_shape is None and loaded.input_shape is None:
            net = plain_network(loaded.model) if loaded.gated else loaded.model
            specs = inferred_specs_said(net, spec)
            if specs:
                return net, specs[0].shape, specs, None
        net, shape = load_network(spec, input_shape, arch, trust, loaded=loaded)
        return net, shape, None, None
    specs, example = named_inputs(inputs, inputs_file, input_shape)
    loaded = loading.load_model(spec, arch=arch, trust=trust)
    net = plain_network(loaded.model) if loaded.gated else loaded.model
    return net, specs[0].shape, specs, example


def inferred_specs_said(net, spec: str):
    """Named inputs inferred from ``net.forward`` (see :func:`bmrs_surgery.inputs.inferred_specs`),
    with one line on stderr naming them, or None."""
    from bmrs_surgery.inputs import inferred_specs

    specs = inferred_specs(net)
    if specs:
        click.echo(f"{spec}: inputs inferred from {type(net).__name__}.forward: "
                   f"{' '.join('--input ' + str(s) for s in specs)} (give --input to change them)", err=True)
    return specs


class EpochsParam(click.ParamType):
    """``--epochs``: a number of epochs (an integer >= 0) or ``auto`` (fit until the gates settle)."""

    name = "N|auto"

    def convert(self, value, param, ctx):
        if isinstance(value, int) and not isinstance(value, bool) or value == "auto":
            return value
        text = str(value).strip().lower()
        if text == "auto":
            return "auto"
        try:
            number = int(text)
        except ValueError:
            self.fail(f"{value!r} is not an integer >= 0 or auto", param, ctx)
        if number < 0:
            self.fail(f"{value!r} is not an integer >= 0 or auto", param, ctx)
        return number


EPOCHS = EpochsParam()
