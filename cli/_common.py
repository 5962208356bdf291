"""Pieces shared by the commands: errors, output folders."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from bmrs_surgery.errors import BmrsError


def fail(message: str) -> None:
    """One line on stderr, exit code 2: how every user mistake ends."""
    click.echo(f"Error: {message.splitlines()[0] if message else 'failed'}", err=True)
    sys.exit(2)


out_dir_option = click.option(
    "--out", "-o", required=True, type=click.Path(file_okay=True, dir_okay=True, path_type=Path),
    help="Output folder (created if missing).",
)


def prepare_out_dir(path: Path, create: bool) -> Path:
    """Check (and with ``create``, make) the output folder; a file there is an error."""
    if path.exists() and not path.is_dir():
        raise BmrsError(f"--out {path} is a file, not a folder")
    if not create:
        parent = path if path.exists() else next((p for p in path.parents if p.exists()), Path("."))
        if not parent.is_dir():
            raise BmrsError(f"--out {path}: {parent} is a file, not a folder")
        if not _writable(parent):
            raise BmrsError(f"--out {path}: folder {parent} is not writable")
        return path
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BmrsError(f"--out {path}: cannot create folder ({exc.strerror})") from None
    return path


def _writable(path: Path) -> bool:
    import os

    return os.access(path, os.W_OK | os.X_OK)


def write_outputs(path: Path, files: dict[str, bytes]) -> Path:
    """Create the output folder and write ``files`` (name -> bytes) into it, each atomically.

    On a write error the files written so far, and the folder if this call created it, are removed.
    """
    import shutil

    from bmrs_surgery.loading import atomic_write

    missing = [p for p in (path, *path.parents) if not p.exists()]
    prepare_out_dir(path, create=True)
    written: list[Path] = []  # new files only: a file replaced from an earlier run stays
    name = ""
    try:
        for name, data in files.items():
            target = path / name
            is_new = not target.exists()
            atomic_write(target, lambda f, data=data: f.write(data))
            if is_new:
                written.append(target)
    except OSError as exc:
        for target in written:
            target.unlink(missing_ok=True)
        if missing:
            shutil.rmtree(missing[-1], ignore_errors=True)
        raise BmrsError(f"--out {path}: cannot write {name} ({exc.strerror or exc})") from None
    return path


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
    return shape


input_shape_option = click.option(
    "--input-shape", metavar="B,C,H,W", help="Shape of one input batch, e.g. 1,3,224,224 [default: the model's own, if known].")


def load_network(spec: str, input_shape: str | None, arch: str | None, trust: bool):
    """(plain network, input shape with batch axis) for the graph commands; a gated file gives its
    network without the gates."""
    from bmrs_surgery import loading
    from bmrs_surgery.deploy import plain_network

    loaded = loading.load_model(spec, arch=arch, trust=trust)
    net = plain_network(loaded.model) if loaded.gated else loaded.model
    shape = parse_shape(input_shape)
    if shape is None:
        if loaded.input_shape is None:
            raise BmrsError(f"{spec}: input shape unknown; give --input-shape, e.g. 1,3,224,224")
        shape = (1,) + tuple(loaded.input_shape)
    return net, shape
