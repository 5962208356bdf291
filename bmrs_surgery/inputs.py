"""Model inputs that are not one float image: token ids, attention masks, several named inputs.

An *input spec* is ``name:dtype:shape`` (``input_ids:int64:1x128``); several specs make one
example, a ``dict`` of named tensors that the model receives as keyword arguments
(``model(**example)``). An *example-inputs file* is a safetensors file of named tensors (no
pickle): its names, dtypes and shapes become the specs, and its values are the first example.

Random examples follow the names: ``*mask*`` inputs are all ones (nothing masked),
``token_type_ids`` zeros, ``position_ids`` ``0..L-1``, other integer inputs uniform token ids below
the model's vocabulary size (``config.vocab_size``, or the smallest ``nn.Embedding``), float
inputs standard normal.

When nothing says what a model takes (no ``--input``, no ``--input-shape``, no input shape saved
with the model), the named inputs are *inferred*: from a token ``.npz`` given as data (its arrays'
names, dtypes and sizes; see :func:`token_file_specs`), else from ``forward``'s signature and the
model's config (see :func:`inferred_specs`): ``input_ids`` (with ``attention_mask`` when forward takes
one) of ``DEFAULT_SEQUENCE_LENGTH`` tokens, or ``pixel_values`` of the config's image size.
"""

from __future__ import annotations

import inspect
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import JobError

DTYPES = {"int64": torch.int64, "int32": torch.int32, "float32": torch.float32, "float16": torch.float16,
          "bfloat16": torch.bfloat16, "float64": torch.float64, "bool": torch.bool}
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
MAX_INPUT_ELEMENTS = 2**28  # one named input; a float32 tensor of this size is 1 GiB
DEFAULT_SEQUENCE_LENGTH = 128  # inferred token inputs: the length issue 16's benchmarks use, capped by the model's
# position table
# arrays that make an .npz token data (not x/y tabular data) when no --input names the inputs
TOKEN_FILE_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "pixel_values",
                     "input_values", "inputs_embeds")


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    def __str__(self) -> str:
        dt = next(k for k, v in DTYPES.items() if v == self.dtype)
        return f"{self.name}:{dt}:{'x'.join(map(str, self.shape))}"


def parse_input(text: str, option: str = "--input") -> InputSpec:
    """``"input_ids:int64:1x128"`` -> InputSpec; one clear line for anything else."""
    parts = text.split(":")
    if len(parts) != 3:
        raise JobError(f"{text!r}: expected NAME:DTYPE:SHAPE, e.g. input_ids:int64:1x128", param=option.lstrip("-"))
    name, dtype, shape_text = (p.strip() for p in parts)
    if not _NAME.match(name):
        raise JobError(f"{text!r}: input name {name!r} is not an identifier", param=option.lstrip("-"))
    if dtype not in DTYPES:
        raise JobError(f"{text!r}: dtype {dtype!r} is not one of {', '.join(DTYPES)}", param=option.lstrip("-"))
    try:
        shape = tuple(int(p) for p in re.split(r"[x,]", shape_text) if p.strip())
    except ValueError:
        raise JobError(f"{text!r}: shape {shape_text!r} is not sizes joined by x, e.g. 1x128",
                       param=option.lstrip("-")) from None
    if not shape or any(d <= 0 for d in shape):
        raise JobError(f"{text!r}: every size must be a positive integer", param=option.lstrip("-"))
    if math.prod(shape) > MAX_INPUT_ELEMENTS:
        raise JobError(f"{text!r}: {math.prod(shape):,} elements is more than the limit of {MAX_INPUT_ELEMENTS:,}",
                       param=option.lstrip("-"))
    return InputSpec(name, DTYPES[dtype], shape)


def parse_inputs(texts) -> list[InputSpec]:
    specs = [parse_input(t) for t in texts]
    names = [s.name for s in specs]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise JobError(f"input {dup!r} is given twice", param="input")
    batches = {s.shape[0] for s in specs}
    if len(batches) > 1:
        raise JobError(f"the inputs disagree on the batch size (first sizes {sorted(batches)})", param="input")
    return specs


def load_example_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Named example tensors from a safetensors file (never pickle)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path)
    if not p.is_file():
        raise JobError(f"{p}: no such file (an example-inputs file is a .safetensors of named tensors)",
                       param="inputs_file")
    try:
        tensors = load_file(str(p))
    except (SafetensorError, OSError, ValueError) as exc:
        raise JobError(f"{p}: not a safetensors file of named tensors ({exc})", param="inputs_file") from None
    if not tensors:
        raise JobError(f"{p}: holds no tensors", param="inputs_file")
    bad = next((n for n in tensors if not _NAME.match(n)), None)
    if bad is not None:
        raise JobError(f"{p}: tensor name {bad!r} is not an identifier (names are the model's keyword arguments)",
                       param="inputs_file")
    if len({t.shape[0] if t.ndim else None for t in tensors.values()}) != 1 or any(t.ndim == 0 for t in tensors.values()):
        raise JobError(f"{p}: every tensor needs the same first (batch) size", param="inputs_file")
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise JobError(f"{p}: tensor {name} holds NaN or an infinity", param="inputs_file")
    return dict(tensors)


def specs_of(example: dict[str, torch.Tensor]) -> list[InputSpec]:
    return [InputSpec(n, t.dtype, tuple(t.shape)) for n, t in example.items()]


def vocab_size(model: nn.Module) -> int | None:
    """Token ids must stay below this: ``config.vocab_size`` or the smallest embedding table."""
    v = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(v, int) and v > 0:
        return v
    sizes = [m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)]
    return min(sizes) if sizes else None


def make_inputs(specs: list[InputSpec], model: nn.Module | None = None, *, batch: int | None = None,
                seed: int = 0) -> dict[str, torch.Tensor]:
    """One random example of ``specs`` (``batch`` replaces the specs' first size)."""
    gen = torch.Generator().manual_seed(seed)
    high = (vocab_size(model) if model is not None else None) or 2
    out = {}
    for s in specs:
        shape = ((batch,) + s.shape[1:]) if batch else s.shape
        fill = fill_for(s.name, _dtype_name(s.dtype))
        if fill == "normal":
            t = torch.randn(shape, generator=gen).to(s.dtype)
        elif fill == "ones":
            t = torch.ones(shape, dtype=s.dtype)
        elif fill == "zeros":
            t = torch.zeros(shape, dtype=s.dtype)
        elif fill == "positions":
            t = torch.arange(shape[-1], dtype=s.dtype).expand(shape).clone()
        else:
            t = torch.randint(0, high, shape, generator=gen, dtype=s.dtype)
        out[s.name] = t
    return out


def _forward_parameters(model: nn.Module) -> dict[str, inspect.Parameter]:
    try:
        return dict(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):  # a builtin or C forward
        return {}


def _config_int(config, *names: str) -> int | None:
    for name in names:
        v = getattr(config, name, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def inferred_specs(model: nn.Module) -> list[InputSpec] | None:
    """Named inputs read off ``model.forward``'s signature and ``model.config``, or None when its
    arguments say nothing (one positional tensor ``x``: the caller asks for a shape).

    - ``input_ids``: int64, ``1 x L`` with L = ``DEFAULT_SEQUENCE_LENGTH``, or fewer when the
      config's position table (``max_position_embeddings``, ``n_positions``) is shorter; plus an
      ``attention_mask`` of the same size when forward takes one;
    - ``pixel_values``: float32, ``1 x C x H x W`` from the config's ``num_channels`` (3) and
      ``image_size`` (an int, or (H, W)); none is inferred without an image size.
    Other arguments keep forward's own defaults (``token_type_ids`` zeros, positions ``0..L-1``)."""
    params = _forward_parameters(model)
    config = getattr(model, "config", None)
    specs: list[InputSpec] = []
    if "input_ids" in params:
        length = min(DEFAULT_SEQUENCE_LENGTH, _config_int(config, "max_position_embeddings", "n_positions",
                                                          "max_sequence_length") or DEFAULT_SEQUENCE_LENGTH)
        specs.append(InputSpec("input_ids", torch.int64, (1, length)))
        if "attention_mask" in params:
            specs.append(InputSpec("attention_mask", torch.int64, (1, length)))
    if "pixel_values" in params:
        size = getattr(config, "image_size", None)
        if isinstance(size, int) and size > 0:
            size = (size, size)
        if isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(d, int) and d > 0 for d in size):
            channels = _config_int(config, "num_channels") or 3
            specs.append(InputSpec("pixel_values", torch.float32, (1, channels) + tuple(size)))
    return specs or None


def _npz_headers(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]] | None:
    """Each array's (shape, dtype) of the .npz ``path`` from its .npy headers (nothing decompressed
    beyond them), or None when the file cannot be read that way (the data loader says why later)."""
    import zipfile

    out = {}
    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if not info.filename.endswith(".npy"):
                    return None
                with z.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    if version not in ((1, 0), (2, 0)):
                        return None
                    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                        np.lib.format.read_array_header_2_0
                    shape, _, dtype = read(f)
                out[info.filename[:-4]] = (tuple(shape), dtype)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError):
        return None
    return out


def token_file_specs(data) -> list[InputSpec] | None:
    """The named inputs of a token ``.npz`` given as data without ``--input``: every array but
    ``labels`` and the ``*_test`` ones, one example's size, int64 for integers (float32 for floats,
    bool for masks stored as bool). Only a file without ``x`` holding one of ``TOKEN_FILE_INPUTS``
    is read so (an ``x``/``y`` file stays tabular data); None otherwise."""
    if not isinstance(data, str) or not data.strip().lower().endswith(".npz"):
        return None
    path = Path(data.strip()).expanduser()
    if not path.is_file():
        return None
    headers = _npz_headers(path)
    if not headers or "x" in headers or not any(n in headers for n in TOKEN_FILE_INPUTS):
        return None
    specs = []
    for name, (shape, dtype) in headers.items():
        if name == "labels" or name.endswith("_test") or not _NAME.match(name) or len(shape) < 2:
            continue
        kind = "bool" if dtype.kind == "b" else "int64" if dtype.kind in "iu" else "float32"
        specs.append(InputSpec(name, DTYPES[kind], (1,) + tuple(int(d) for d in shape[1:])))
    order = {n: i for i, n in enumerate(TOKEN_FILE_INPUTS)}  # input_ids first: it names the batch's length
    specs.sort(key=lambda s: order.get(s.name, len(order)))
    return specs or None


def fill_for(name: str, dtype: str) -> str:
    """How a random example of input ``name`` (``dtype``: ``int64``, ``float32``, ...) is filled:
    ``normal`` (floats), ``ones`` (``*mask*`` and bool inputs), ``zeros`` (``token_type_ids``),
    ``positions`` (``position_ids``: ``0..L-1``) or ``ids`` (token ids below the vocabulary).
    The same rules for :func:`make_inputs` and for the ONNX Runtime benchmark's inputs."""
    lname = name.lower()
    if dtype.startswith(("float", "bfloat")):
        return "normal"
    if "mask" in lname or dtype == "bool":
        return "ones"
    if "token_type" in lname:
        return "zeros"
    if "position" in lname:
        return "positions"
    return "ids"


def _dtype_name(dtype: torch.dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == dtype)


def bench_feeds(specs: list[InputSpec], model: nn.Module | None = None,
                example: dict[str, torch.Tensor] | None = None, folder: str | Path | None = None) -> list[dict]:
    """The ONNX Runtime benchmark's description of named inputs (see :mod:`bmrs_surgery._ort_worker`):
    each input's numpy dtype and sizes after the batch axis, filled by :func:`fill_for` with token
    ids below ``model``'s vocabulary; with ``example`` (an example-inputs file) and ``folder``, the
    file's own values, written there as ``.npy`` files and repeated row by row to each batch size."""
    high = vocab_size(model) if model is not None else None
    feeds = []
    for s in specs:
        dtype = _dtype_name(s.dtype)
        if dtype == "bfloat16":
            raise JobError(f"{s}: ONNX Runtime's Python API cannot be fed bfloat16 inputs; give float32 or float16",
                           param="input")
        feed = {"name": s.name, "dtype": dtype, "shape": list(s.shape[1:]), "fill": fill_for(s.name, dtype),
                "high": high}
        if example is not None and folder is not None:
            path = Path(folder) / f"input-{len(feeds)}.npy"
            import numpy as np

            np.save(path, example[s.name].detach().cpu().numpy(), allow_pickle=False)
            feed.update(fill="file", path=str(path))
        feeds.append(feed)
    return feeds


def call(model: nn.Module, x: Any):
    """Run ``model`` on one example: named inputs as keyword arguments, a tensor as the argument."""
    if isinstance(x, dict):
        return model(**x)
    return model(x)


def first(x: Any, n: int = 1):
    """The first ``n`` rows of every input of an example."""
    if isinstance(x, dict):
        return {k: v[:n] for k, v in x.items()}
    return x[:n]


def batch_size(x: Any) -> int:
    if isinstance(x, dict):
        return int(next(iter(x.values())).shape[0])
    return int(x.shape[0])


def shape_of(x: Any) -> tuple[int, ...]:
    """The shape of a tensor example, or of the first input of a named one."""
    if isinstance(x, dict):
        return tuple(next(iter(x.values())).shape)
    return tuple(x.shape)


def output_tensors(out) -> list[torch.Tensor]:
    """Every tensor of a model's output (a tensor, or dicts, lists and tuples of them), in order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in output_tensors(o)]
    return []


def outputs(model: nn.Module, examples: list, cast: bool = True) -> list[list[torch.Tensor]]:
    """Every output tensor of ``model`` on each example (tensors or named inputs), in eval mode,
    as float (``cast=False``: in the model's own dtype): what the equivalence proof compares (see
    :func:`bmrs_surgery.verify.compare`)."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            return [[t.detach().float() if cast else t.detach() for t in output_tensors(call(model, x))]
                    for x in examples]
    finally:
        model.train(was)


def validate_job(job) -> None:
    """Named inputs in a compression job (``--input`` / ``--inputs-file``): the specs parse, and the
    job is one they can serve. With ``--data`` it must be a token ``.npz`` (see :mod:`tokens`);
    without it, the model must already carry fitted gates and nothing is fitted. Distillation, a
    sweep, budgets and ``--round-to auto`` work on named inputs as on one tensor."""
    inputs, inputs_file = tuple(getattr(job, "inputs", ()) or ()), getattr(job, "inputs_file", None)
    if not inputs and not inputs_file:
        return
    if inputs and inputs_file:
        raise JobError("--input and --inputs-file exclude each other", param="input")
    if not all(isinstance(t, str) for t in inputs):
        raise JobError(f"must be NAME:DTYPE:SHAPE texts, got {inputs!r}", param="input")
    if inputs:
        parse_inputs(inputs)
    option = "input" if inputs else "inputs_file"
    from .tokens import is_token_file

    if job.data is not None and not is_token_file(job.data):
        raise JobError(f"named inputs fit on token data, an .npz file with one array per input and 'labels', "
                       f"not {job.data!r} (without --data: a model that already carries fitted gates)", param=option)
    if job.data is None and job.epochs:
        raise JobError(f"without --data, named inputs serve a model that already carries fitted gates: nothing is "
                       f"fitted, so --epochs {job.epochs} cannot apply (leave it out, or give --data tokens.npz)",
                       param=option)


def job_inputs(job) -> tuple[list[InputSpec] | None, dict[str, torch.Tensor] | None]:
    """(specs, the example-inputs file's tensors or None) of a job, or (None, None) without named
    inputs; every input's largest benchmark batch is checked against the input size limit."""
    inputs, inputs_file = tuple(getattr(job, "inputs", ()) or ()), getattr(job, "inputs_file", None)
    example = load_example_file(inputs_file) if inputs_file else None
    if example is not None:
        specs = specs_of(example)
    elif inputs:
        specs = parse_inputs(inputs)
    else:
        specs = token_file_specs(getattr(job, "data", None))  # a token .npz names the inputs itself
        if not specs:
            return None, None
    if job.bench_batch_sizes:
        for s in specs:
            n = max(job.bench_batch_sizes) * math.prod(s.shape[1:])
            if n > MAX_INPUT_ELEMENTS:
                raise JobError(f"input {s.name} at batch {max(job.bench_batch_sizes)} has {n:,} elements, more than "
                               f"the limit of {MAX_INPUT_ELEMENTS:,}", param="bench_batch_sizes")
    return specs, example
