"""Model files in and out: names, checkpoints, state dicts, pickled modules; atomic writes.

A MODEL spec is one of
  * a bundled name (``lenet5``, ``mlp``): a fresh reference network,
  * ``torchvision:NAME``: a torchvision architecture with ``weights=None`` and ``weights_backbone=None``
    (nothing is downloaded; classification, segmentation, video, detection), ``timm:NAME``: a timm
    architecture (random weights; see :mod:`bmrs_surgery.zoo`),
  * ``hf:DIR``: a local Hugging Face model folder; ``hf:LlamaConfig`` (``hf:BertConfig:num_hidden_layers=4``):
    a randomly initialised transformers architecture with small sizes (see :mod:`bmrs_surgery.hf`),
  * a path to a file saved by :func:`save_checkpoint` (architecture name + state dict + gate
    groups: loads with ``weights_only=True``, runs no code from the file),
  * a path to a plain state dict, given with an architecture (``arch=``),
  * a path to a whole pickled ``nn.Module`` (``torch.save(model)``): unpickling can run code from
    the file, so it needs ``trust=True``.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import math
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import limits
from .errors import GatePlacementError, ModelLoadError, file_problem
from .errors import first_line as _first_line
from .gated import attach_gates, gate_bank, has_gate_hooks, has_gates, network
from .gates import GateBank
from .graph.group import Group
from .limits import check_state_shapes
from .outputs import atomic_write

CHECKPOINT_FORMAT = "bmrs-surgery/checkpoint/3"
READABLE_FORMATS = (CHECKPOINT_FORMAT, "bmrs-surgery/checkpoint/2")  # 2: the groups were called "sites"


@dataclass
class LoadedModel:
    model: nn.Module  # a GatedModel when the file carried gates
    arch: str | None  # architecture spec that rebuilds it, when known
    input_shape: tuple[int, ...] | None  # one example, when known

    @property
    def gated(self) -> bool:
        return has_gates(self.model)


MAX_NUM_CLASSES = limits.MAX_NUM_CLASSES  # a file may not ask for a larger output layer (it would choose our memory use)
MAX_INPUT_ELEMENTS = 1 << 26  # nor for an example input larger than this (64 Mi values, 256 MiB of float32)
MODEL_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".onnx")


def is_factory_spec(arch: str) -> bool:
    """``module:factory``: the user's own code (not a bundled name, not ``torchvision:NAME``/``timm:NAME``)."""
    return ":" in arch and not arch.startswith(("torchvision:", "timm:"))


def build_arch(arch: str, num_classes: int | None = None, *, allow_code: bool = True,
               source: str | None = None) -> tuple[nn.Module, tuple[int, ...] | None]:
    """A fresh network for a bundled name, ``torchvision:NAME`` or (only with ``allow_code``, for
    an architecture the user named) ``module:factory``, and its example input shape. ``source``
    names where ``arch`` came from in messages (default ``--arch NAME``; a checkpoint's own
    architecture must not be blamed on an option the user did not give)."""
    label = source or f"--arch {arch}"
    import models

    if num_classes is not None and not 1 <= num_classes <= MAX_NUM_CLASSES:
        raise ModelLoadError(f"{arch}: num_classes {num_classes} is out of range (1 to {MAX_NUM_CLASSES:,})")
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    if arch.startswith(("torchvision:", "timm:")):  # built without downloading anything (see zoo.py)
        from . import zoo

        source_name, _, name = arch.partition(":")
        build = zoo.torchvision_model if source_name == "torchvision" else zoo.timm_model
        return build(name, num_classes)
    if arch in models.list_models():
        return models.get_model(arch, **kwargs), models.input_shape(arch)
    if is_factory_spec(arch):  # module:factory, the user's own code, named explicitly
        if not allow_code:
            raise ModelLoadError(f"architecture {arch!r} is code outside the toolkit")
        return _from_factory(arch, kwargs, label), None
    if source:
        raise ModelLoadError(f"{source} is not one this toolkit knows (bundled names: "
                             f"{', '.join(models.list_models())}; or torchvision:NAME)")
    raise ModelLoadError(
        f"unknown model {arch!r}: give a file path, torchvision:NAME, or a bundled name "
        f"({', '.join(models.list_models())})"
    )


def _from_factory(arch: str, kwargs: dict, label: str | None = None) -> nn.Module:
    """``package.module:factory`` -> ``factory()`` (with ``num_classes`` when the factory takes it).

    Importing the module and calling the factory run the user's code: anything it raises, exits
    (``SystemExit``) included, is a one-line ModelLoadError; only Ctrl-C goes through."""
    import inspect

    module_name, _, attr = arch.partition(":")
    label = label or f"--arch {arch}"
    searched: list[str] = []
    try:
        with user_code_path() as searched:
            module = importlib.import_module(module_name)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 - any import failure (or exit) is the spec's fault
        where = f"; searched {searched_text(searched)}" if isinstance(exc, ModuleNotFoundError) else ""
        raise ModelLoadError(f"{label}: cannot import {module_name} ({_why(exc)}){where}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ModelLoadError(f"{label}: {module_name} has no callable {attr!r}")
    try:
        try:
            params = inspect.signature(factory).parameters
        except (TypeError, ValueError):
            params = {}
        net = factory(**{k: v for k, v in kwargs.items() if k in params})
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001
        raise ModelLoadError(f"{label}: {attr}() failed ({_why(exc)})") from None
    if not isinstance(net, nn.Module):
        raise ModelLoadError(f"{label}: {attr}() returned a {type(net).__name__}, not an nn.Module")
    return net


@contextlib.contextmanager
def user_code_path(*folders: Path):
    """The user's own modules importable as ``python -m`` would make them: the current folder (and
    ``folders``, e.g. the model file's) go on the front of ``sys.path`` while the user's code is
    imported or unpickled, and come off again. The console script, unlike ``python -m``, does not
    put the working folder on the path, so ``--arch mynet:factory`` from the folder holding
    ``mynet.py`` would not import otherwise. Yields the list of places searched."""
    added = []
    for folder in (Path.cwd(), *folders):
        entry = str(folder.resolve())
        if entry not in sys.path and entry not in added:
            added.append(entry)
    sys.path[:0] = added
    importlib.invalidate_caches()
    try:
        yield [f"the current folder {Path.cwd().resolve()}", *(f"the model file's folder {f.resolve()}" for f in folders)]
    finally:
        for entry in added:
            if entry in sys.path:
                sys.path.remove(entry)


def searched_text(searched: list[str]) -> str:
    """The places :func:`user_code_path` searched, for an import error's message."""
    return ", ".join(searched) + " and the Python path"


def _why(exc: BaseException) -> str:
    """One line for an exception from user code (``SystemExit(0)`` has the message ``0``)."""
    if isinstance(exc, SystemExit):
        return f"it called exit({exc.code!r})"
    return _first_line(exc)


def _looks_like_path(spec: str) -> bool:
    """A MODEL spec is a file only when it looks like one: a folder separator (``./lenet5``) or a
    model-file suffix. A bundled name stays a name even when a file of that name is in the working
    folder (a stray file must not hijack ``bmrs-compress lenet5``)."""
    seps = {"/", os.sep} | ({os.altsep} if os.altsep else set())
    return any(c in spec for c in seps) or spec.lower().endswith(MODEL_FILE_SUFFIXES)


def load_model(spec: str, *, arch: str | None = None, trust: bool = False) -> LoadedModel:
    """Resolve a MODEL spec (see module doc); every failure is a one-line ModelLoadError."""
    if spec.startswith("hf:"):  # a local Hugging Face folder, or a config class with small sizes (bmrs_surgery.hf)
        from .hf import load_spec

        return LoadedModel(load_spec(spec), spec, None)
    if not _looks_like_path(spec):
        try:
            net, shape = build_arch(spec, source=f"model {spec}" if is_factory_spec(spec) else None)
        except ModelLoadError as exc:
            if Path(spec).is_file():  # a file without a suffix: the user says so with ./NAME
                raise ModelLoadError(f"{exc}; for the file {spec} in this folder, write ./{spec}") from None
            raise
        return LoadedModel(net, spec, shape)
    path = Path(spec)
    problem = file_problem(path)  # a FIFO, a symlink loop or an unreadable file is not "missing"
    if problem:
        raise ModelLoadError(f"model file {spec} {problem}")
    if path.stat().st_size == 0:
        raise ModelLoadError(f"model file {spec} is empty")
    if path.suffix == ".safetensors":
        return _from_safetensors(path, spec, arch)
    try:
        with warnings.catch_warnings():  # torch warns about unusual pickle protocols on stderr: the error says it
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except PermissionError:
        raise ModelLoadError(f"model file {spec} cannot be read: permission denied") from None
    except Exception as exc:  # noqa: BLE001 - any failure here is the file's fault
        if "Unsupported global" not in str(exc):
            raise ModelLoadError(f"cannot read {spec}: not a PyTorch model file, or a damaged one") from None
        if not trust:
            raise ModelLoadError(
                f"{spec} is a pickled nn.Module (or other Python objects): loading it runs code from "
                "the file; pass --trust-model if you trust it"
            ) from None
        searched: list[str] = []
        try:
            with user_code_path(path.parent) as searched:
                obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc2:  # noqa: BLE001
            where = f"; searched {searched_text(searched)}" if isinstance(exc2, ModuleNotFoundError) else ""
            raise ModelLoadError(f"cannot unpickle {spec}: {_first_line(exc2)}{where}") from None
    if isinstance(obj, nn.Module):
        if not has_gates(obj) and has_gate_hooks(obj):
            raise ModelLoadError(
                f"{spec} holds a gated network without its gates: save the GatedModel that "
                "attach_gates returned, not its .model"
            )
        return LoadedModel(obj, None, _shape_or_none(getattr(obj, "bmrs_input_shape", None), spec))
    if isinstance(obj, dict) and obj.get("format") in READABLE_FORMATS:
        return _from_checkpoint(obj, spec, user_arch=arch, trust=trust)
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        if arch is None:
            raise ModelLoadError(f"{spec} is a state dict: give its architecture with --arch NAME")
        check_state_shapes(obj, spec)
        net, shape = _arch_for_state(arch, obj)
        _load_state(net, obj, spec)
        return LoadedModel(net, arch, shape)
    raise ModelLoadError(f"{spec} holds no model (a {type(obj).__name__}, not a module, state dict or checkpoint)")


def _from_safetensors(path: Path, spec: str, arch: str | None) -> LoadedModel:
    """Weights in the safetensors format (no code, no pickle) plus an architecture."""
    try:
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"cannot read {spec}: not a safetensors file, or a damaged one ({_first_line(exc)})") from None
    if arch is None:
        raise ModelLoadError(f"{spec} holds weights only: give its architecture with --arch NAME")
    check_state_shapes(state, spec)
    net, shape = _arch_for_state(arch, state)
    _load_state(net, state, spec)
    return LoadedModel(net, arch, shape)


def _shape_or_none(shape, spec: str) -> tuple[int, ...] | None:
    """An example input shape from a file: a sequence of positive ints, or None."""
    if shape is None:
        return None
    try:
        out = tuple(shape)
    except TypeError:
        raise ModelLoadError(f"{spec}: damaged input shape {shape!r}") from None
    if not out or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in out):
        raise ModelLoadError(f"{spec}: damaged input shape {shape!r}")
    if math.prod(out) > MAX_INPUT_ELEMENTS:
        raise ModelLoadError(f"{spec}: input shape {out!r} is too large (over {MAX_INPUT_ELEMENTS:,} values)")
    return out


def _num_classes(state: dict, order: list[str] | None = None) -> int | None:
    """Output classes of a state dict: rows of its last 2-D weight (in the network's own key order
    when given: safetensors files sort their keys)."""
    keys = [k for k in (order or state) if k in state]
    last = [state[k] for k in keys if k.endswith("weight") and state[k].ndim == 2]
    return int(last[-1].shape[0]) if last else None


def _arch_for_state(arch: str, state: dict):
    """The architecture built for ``state``'s number of classes."""
    net, shape = build_arch(arch)
    n = _num_classes(state, list(net.state_dict()))
    out = [m for m in net.modules() if isinstance(m, nn.Linear)]
    if n is not None and out and out[-1].out_features != n:
        net, shape = build_arch(arch, n)
    return net, shape


def _load_state(net: nn.Module, state: dict, spec: str) -> None:
    """Load ``state`` into ``net``; a tensor whose kind differs from the network's own (integer or
    complex numbers for floating-point weights) is refused, never cast."""
    own = net.state_dict()
    for key, value in state.items():
        mine = own.get(key)
        if isinstance(value, torch.Tensor) and mine is not None and mine.is_floating_point() and (
                value.is_complex() or not value.is_floating_point()):
            raise ModelLoadError(f"{spec}: {key} holds {value.dtype} numbers where the network has {mine.dtype}; "
                                 "convert the file's weights to floating point yourself")
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelLoadError(f"{spec} does not match its architecture: {_state_dict_problem(exc)}") from None


def _state_dict_problem(exc: RuntimeError) -> str:
    """The informative part of load_state_dict's multi-line error, on one line."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    details = [ln for ln in lines if not ln.startswith("Error(s) in loading state_dict")]
    text = "; ".join(details) if details else (lines[0] if lines else type(exc).__name__)
    return text if len(text) <= 300 else text[:297] + "..."


def _from_checkpoint(ck: dict, spec: str, *, user_arch: str | None = None, trust: bool = False) -> LoadedModel:
    """A checkpoint's network. The file names its architecture, but a file chooses no code: it may
    name a bundled network or ``torchvision:NAME``; a ``module:factory`` is built only when the user
    named the same one (``arch=``/--arch) or trusts the file; sizes it asks for are bounded."""
    arch = ck.get("arch")
    if not isinstance(arch, str) or not arch:
        raise ModelLoadError(f"{spec} is a damaged bmrs-surgery checkpoint (architecture {arch!r})")
    if is_factory_spec(arch) and not trust and arch != user_arch:
        raise ModelLoadError(
            f"{spec} names the architecture {arch!r}, code outside the toolkit: to run it, give the same "
            "--arch yourself, or pass --trust-model if you trust the file"
        )
    num_classes = ck.get("num_classes")
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                    or not 1 <= num_classes <= MAX_NUM_CLASSES):
        raise ModelLoadError(f"{spec} is a damaged bmrs-surgery checkpoint (num_classes {num_classes!r}, "
                             f"expected 1 to {MAX_NUM_CLASSES:,})")
    state = ck.get("state_dict")
    if not isinstance(state, dict):
        raise ModelLoadError(f"{spec} is a damaged bmrs-surgery checkpoint (no state dict)")
    shape = _shape_or_none(ck.get("input_shape"), spec)
    try:
        source = None if arch == user_arch else f"{spec}: the checkpoint's architecture {arch!r}"
        net, _ = build_arch(arch, num_classes, allow_code=True, source=source)  # a factory only as checked above
        groups = [Group.from_state(g, i) for i, g in enumerate(ck.get("groups") or ck.get("sites") or [])]
        if any(g.size < 1 for g in groups) or sum(g.size for g in groups) > sum(p.numel() for p in net.parameters()):
            raise ModelLoadError(f"{spec} is a damaged bmrs-surgery checkpoint (gate groups do not fit {arch!r})")
        if groups and ck.get("traced"):
            if shape is None:
                raise ModelLoadError(f"{spec} is a damaged bmrs-surgery checkpoint (traced network, no input shape)")
            from .placement import analyse_model

            analysis = analyse_model(net, torch.zeros((1,) + tuple(shape)))
            gated = attach_gates(net, groups=groups, analysis=analysis, noise=ck.get("noise") or "sample")
            _load_state(gated, state, spec)
            model = gated
        elif groups:
            gated = attach_gates(net, groups=groups, noise=ck.get("noise") or "sample")
            _load_state(gated, state, spec)
            model: nn.Module = gated
        else:
            _load_state(net, state, spec)
            model = net
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError, GatePlacementError) as exc:
        raise ModelLoadError(f"{spec} is a damaged bmrs-surgery checkpoint ({_first_line(exc)})") from None
    return LoadedModel(model, arch, shape)


def save_checkpoint(model: nn.Module, path: str | Path, arch: str | None, input_shape=None) -> None:
    """Save a (gated) model. With a known ``arch``: a weights-only checkpoint (state dict, gate
    groups); without: the whole module pickled (loading it then needs trust)."""
    data = checkpoint_bytes(model, arch, input_shape)
    atomic_write(path, lambda f: f.write(data))


def checkpoint_bytes(model: nn.Module, arch: str | None, input_shape=None) -> bytes:
    """What :func:`save_checkpoint` writes, in memory (so a caller can fail before touching disk)."""
    buf = io.BytesIO()
    if arch is None:
        if input_shape is not None:
            model.bmrs_input_shape = tuple(input_shape)
        torch.save(model, buf)
        return buf.getvalue()
    bank: GateBank | None = gate_bank(model) if has_gates(model) else None
    net = network(model) if bank is not None else model
    last = [m for m in net.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    ck = {
        "format": CHECKPOINT_FORMAT,
        "arch": arch,
        "num_classes": getattr(last[-1], "out_features", None) if last else None,
        "input_shape": list(input_shape) if input_shape else None,
        "groups": [g.state() for g in bank.groups] if bank is not None else [],
        # the gated network is the traced graph (attention written out): rebuild it that way
        "traced": isinstance(net, torch.fx.GraphModule),
        "noise": bank.noise if bank is not None else None,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    torch.save(ck, buf)
    return buf.getvalue()
