"""Bounds on what a user's input may make the toolkit allocate or run, checked before the work.

A few bytes of input can ask for a lot: an ``--input-shape`` of 1,3,100000,100000 (120 GB of
float32), a state dict whose last weight has shape (10**9, 0) (a billion classes from a 250 KB
file), an ``.npz`` of 2 MB that expands to gigabytes, a seed torch cannot take, more threads than
the machine has. Each check here raises a one-line :class:`~.errors.BmrsError` naming the input
and the limit, before anything large is allocated.
"""

from __future__ import annotations

import math
import os
import zipfile
from collections.abc import Mapping, Sequence

from .errors import BmrsError, JobError, ModelLoadError

GIB = 1 << 30

MAX_INPUT_BYTES = 2 * GIB
"""An example input (the whole batch, float32) or the first layer's output on it may take at most this."""

MAX_NUM_CLASSES = 100_000
"""A state dict may not ask for an output layer with more classes than this."""

MAX_TENSOR_DIM = 1 << 28
"""No dimension of a tensor in a model file may be larger than this (268 million)."""

MAX_DATA_BYTES = 4 * GIB
"""An ``.npz`` dataset may take at most this much memory once loaded and converted (the default;
the environment variable below raises or lowers it)."""
DATA_LIMIT_ENV = "BMRS_MAX_DATA_GIB"

SEED_MAX = 2**32 - 1
"""Seeds go to torch, numpy and scikit-learn; the range all of them take is 0 .. 2**32 - 1."""


def _gib(n: float) -> str:
    return f"{n / GIB:,.1f} GiB" if n >= GIB / 10 else f"{n / (1 << 20):,.1f} MiB"


# ------------------------------------------------------------------------------------------------
# Seeds
# ------------------------------------------------------------------------------------------------


def check_seed(seed, *, error: type[BmrsError] = JobError) -> int:
    """``seed`` as an int in 0 .. 2**32 - 1, or ``error(param="seed")`` with one line."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
        shown = repr(seed) if not isinstance(seed, int) or abs(seed) < 10**12 else f"{seed:.3e}"
        raise error(f"must be an integer from 0 to {SEED_MAX} (2**32 - 1), got {shown}", param="seed")
    return int(seed)


# ------------------------------------------------------------------------------------------------
# Threads
# ------------------------------------------------------------------------------------------------


def machine_cores() -> int:
    """The machine's logical cores (1 when unknown)."""
    return os.cpu_count() or 1


def check_threads(threads, *, param: str = "threads") -> int:
    """An ONNX Runtime thread count: 0 (its default, all cores) up to the machine's cores.
    More threads than cores only slow it down (10**5 of them never finish starting): refused."""
    cores = machine_cores()
    if isinstance(threads, bool) or not isinstance(threads, int) or not 0 <= threads <= cores:
        raise JobError(f"must be 0 (all cores) to {cores} (this machine's cores), got {threads!r}", param=param)
    return threads


# ------------------------------------------------------------------------------------------------
# Input shapes
# ------------------------------------------------------------------------------------------------


def check_input_bytes(shape: Sequence[int], *, what: str = "--input-shape", limit: int = MAX_INPUT_BYTES) -> None:
    """One float32 input of ``shape`` (batch axis included) must fit in ``limit`` bytes."""
    nbytes = math.prod(int(d) for d in shape) * 4
    if nbytes > limit:
        raise BmrsError(f"{what} {','.join(str(d) for d in shape)}: one input takes {_gib(nbytes)} "
                        f"of float32, above the {_gib(limit)} limit")


def _conv_out(size: int, k: int, s: int, p, d: int) -> int:
    if p == "same":
        return size
    if p == "valid":
        p = 0
    return max(0, (size + 2 * int(p) - d * (k - 1) - 1) // s + 1)


def first_layer_output_bytes(net, shape: Sequence[int]) -> tuple[str, int] | None:
    """(layer name, bytes of its float32 output) for the first convolution or linear layer of
    ``net`` on an input of ``shape``, when that layer plainly reads the input (its input channels
    or features match); None when that cannot be told cheaply."""
    from torch import nn

    shape = tuple(int(d) for d in shape)
    for name, m in net.named_modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            nd = len(m.kernel_size)
            if len(shape) != nd + 2 or shape[1] != m.in_channels:
                return None
            pad = m.padding if isinstance(m.padding, str) else tuple(m.padding)
            spatial = [_conv_out(shape[2 + i], m.kernel_size[i], m.stride[i],
                                 pad if isinstance(pad, str) else pad[i], m.dilation[i]) for i in range(nd)]
            return name, shape[0] * m.out_channels * math.prod(spatial) * 4
        if isinstance(m, nn.Linear):
            if shape[-1] != m.in_features:
                return None
            return name, math.prod(shape[:-1]) * m.out_features * 4
    return None


def check_first_layer(net, shape: Sequence[int], *, limit: int = MAX_INPUT_BYTES) -> None:
    """The first layer's output on ``shape`` (when it can be told cheaply) must fit in ``limit``."""
    found = first_layer_output_bytes(net, shape)
    if found is not None and found[1] > limit:
        name, nbytes = found
        raise BmrsError(f"--input-shape {','.join(str(d) for d in shape)}: the first layer ({name}) would output "
                        f"{_gib(nbytes)} of float32, above the {_gib(limit)} limit")


# ------------------------------------------------------------------------------------------------
# Model files: declared shapes and class counts
# ------------------------------------------------------------------------------------------------


def check_num_classes(n: int | None, where: str, *, limit: int = MAX_NUM_CLASSES) -> int | None:
    """A class count read from a file (None passes): 1 .. ``limit``, else a ModelLoadError."""
    if n is not None and not 1 <= n <= limit:
        raise ModelLoadError(f"{where}: its last layer declares {n:,} classes, outside 1 to {limit:,}")
    return n


def check_state_shapes(state: Mapping, where: str, *, max_dim: int = MAX_TENSOR_DIM) -> None:
    """Every tensor of a state dict: no dimension above ``max_dim``, and no empty weight matrix
    whose other dimension is what a network would be built for (shape (10**9, 0))."""
    for key, t in state.items():
        shape = tuple(int(d) for d in getattr(t, "shape", ()))
        if any(d > max_dim for d in shape):
            raise ModelLoadError(f"{where}: tensor {key!r} declares shape {shape}, a dimension over {max_dim:,}")
        if len(shape) >= 2 and 0 in shape and any(d > 0 for d in shape):
            raise ModelLoadError(f"{where}: tensor {key!r} has shape {shape}, an empty weight")


# ------------------------------------------------------------------------------------------------
# .npz datasets: sizes read from the .npy headers, before anything is loaded
# ------------------------------------------------------------------------------------------------


def data_limit() -> int:
    """Bytes a dataset may take once loaded: ``BMRS_MAX_DATA_GIB`` if set, else 4 GiB; never more
    than half the physical memory."""
    limit = MAX_DATA_BYTES
    raw = os.environ.get(DATA_LIMIT_ENV, "").strip()
    if raw:
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value <= 0:
            raise BmrsError(f"{DATA_LIMIT_ENV}={raw!r}: expected a positive number of GiB")
        limit = int(value * GIB)
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        physical = 0
    return min(limit, physical // 2) if physical > 0 else limit


def npz_members(path) -> dict[str, tuple[tuple[int, ...], object]]:
    """{array name: (shape, numpy dtype)} of an ``.npz`` file, read from each member's .npy header
    (a few hundred bytes each; no array is decompressed). A member that is not an .npy file gets
    shape (size,) and dtype uint8 (np.load would return its bytes). Raises ValueError/OSError/
    zipfile.BadZipFile on a damaged file."""
    import numpy as np
    from numpy.lib import format as npformat

    out = {}
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            name = info.filename
            if not name.endswith(".npy"):
                out[name] = ((info.file_size,), np.dtype(np.uint8))
                continue
            with zf.open(info) as fh:
                version = npformat.read_magic(fh)
                if version == (1, 0):
                    shape, _, dtype = npformat.read_array_header_1_0(fh)
                elif version == (2, 0):
                    shape, _, dtype = npformat.read_array_header_2_0(fh)
                else:  # (3, 0): utf-8 field names, same layout
                    shape, _, dtype = npformat._read_array_header(fh, version)
            out[name[: -len(".npy")]] = (tuple(int(d) for d in shape), dtype)
    return out


def npz_memory_estimate(members: Mapping[str, tuple[tuple[int, ...], object]]) -> int:
    """Bytes loading an .npz takes at its peak: each array as stored, plus its float32 conversion,
    the finiteness mask and the copies made by the splits (about three float32 copies)."""
    total = 0
    for shape, dtype in members.values():
        n = math.prod(shape)
        itemsize = getattr(dtype, "itemsize", 8) or 8
        total += n * itemsize + 3 * n * 4
    return total


def check_npz(path, *, error: type[BmrsError] = BmrsError) -> dict[str, tuple[tuple[int, ...], object]]:
    """The members of the .npz at ``path`` (see :func:`npz_members`) after checking, from their
    headers only, that loading them stays within :func:`data_limit`; ``error`` with one line if not."""
    members = npz_members(path)
    need, limit = npz_memory_estimate(members), data_limit()
    if need > limit:
        big = max(members.items(), key=lambda kv: math.prod(kv[1][0]) * (getattr(kv[1][1], "itemsize", 8) or 8))
        raise error(f"{path}: loading it would take about {_gib(need)} of memory ('{big[0]}' declares shape "
                    f"{big[1][0]}, {big[1][1]}), above the {_gib(limit)} limit (set {DATA_LIMIT_ENV} to change it)")
    return members
