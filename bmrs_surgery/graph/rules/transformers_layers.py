"""Layers of Hugging Face transformers: GPT-2's ``Conv1D`` (a linear layer whose weight is stored
transposed, ``(in, out)``, with ``out`` bias entries), and the families' own RMSNorm/LayerNorm
classes (``LlamaRMSNorm``, ``Qwen3RMSNorm``, ``T5LayerNorm``...: statistics over the last axis, one
weight per last-axis entry). Registered by :func:`register` when a model from transformers is
traced (importing transformers here would slow every start).

Hidden-size (residual stream) pruning under RMSNorm: ``y = w * x / sqrt(mean_C(x^2) + eps)``. When
``C - C'`` channels of ``x`` are exactly zero, ``mean_C(x^2) = (C'/C) mean_C'(x^2)``, so on the kept
channels ``y = (w sqrt(C/C')) * x / sqrt(mean_C'(x^2) + eps C/C')``: the norm of the narrower stream
with its weight times ``sqrt(C/C')`` and its eps times ``C/C'`` (Gemma's ``(1 + w)`` form: ``1 + w'
= (1 + w) sqrt(C/C')``). The rule passes such a norm's last-axis channels through and tags them
``stream``; gates then sit on the outputs of the layers that write the stream, so a pruned channel
is zero in the stream itself (see ``export_trace.stream_groups``), and :func:`rescale_stream_norms`
rescales the norms at surgery. Whether a class computes one of these two forms is not assumed from
its name: :func:`stream_form` checks it on the module (float64, random weight, eps 0.5, a third of
the channels zeroed) before any channel passes.
"""

from __future__ import annotations

import copy
import math
import sys

import torch
from torch import nn

from ..propagate import _shape
from ..registry import ModuleRule, module_rule, module_rules, register_module


class Conv1DRule(ModuleRule):
    needs_input = False

    def propagate(self, ctx, node, module, x):
        out = ctx.dense(node, x, module.nx, module.nf, in_params=("weight",), out_params=("weight",),
                        in_dim=0, out_dim=1)
        out_ids, _ = ctx.module_ids(node.target, "out", module.nf)
        ctx.slot(node.target, ("bias",), 0, out_ids, "out")
        return out

    def resize(self, module):
        module.nx, module.nf = module.weight.shape

    def fold(self, module, factor):
        module.weight.mul_(factor.to(module.weight.dtype).reshape(-1, 1))


EPS_NAMES = ("variance_epsilon", "eps", "epsilon")
FORMS = ("scale", "offset")  # w * x / rms(x), and Gemma's (1 + w) * x / rms(x)
_FORM: dict[type, str | None] = {}


def _eps_name(mod: nn.Module) -> str | None:
    return next((n for n in EPS_NAMES if isinstance(getattr(mod, n, None), float)), None)


def rescale(mod: nn.Module, width: int, kept: int, form: str) -> None:
    """In place: the norm of a stream cut from ``width`` to ``kept`` channels (weight already
    sliced): weight times ``sqrt(width/kept)`` (``1 + w`` for the offset form), eps times ``width/kept``."""
    s = math.sqrt(width / kept)
    name = _eps_name(mod)
    with torch.no_grad():
        if form == "scale":
            mod.weight.mul_(s)
        else:
            mod.weight.add_(1.0).mul_(s).sub_(1.0)
    setattr(mod, name, getattr(mod, name) * width / kept)


def divide(mod: nn.Module, expected) -> None:
    """In place: an RMSNorm's output divided by ``expected`` per channel (E[theta] of a stream
    whose gates the tied output layer it feeds has taken in); channels with 0 (removed) untouched.
    ``w / e`` for the scale form, ``(1 + w) / e - 1`` for Gemma's offset form."""
    e = torch.as_tensor(expected, dtype=mod.weight.dtype, device=mod.weight.device)
    e = torch.where(e > 0, e, torch.ones_like(e))
    with torch.no_grad():
        if stream_form(mod) == "scale":
            mod.weight.div_(e)
        else:
            mod.weight.add_(1.0).div_(e).sub_(1.0)


def _probe(mod: nn.Module) -> str | None:
    w = getattr(mod, "weight", None)
    name = _eps_name(mod)
    if name is None or not isinstance(w, torch.Tensor) or w.ndim != 1 or w.shape[0] < 4:
        return None
    if any(p is not w for p in mod.parameters()) or list(mod.buffers()):
        return None  # a bias or running statistics: not an RMSNorm
    c = w.shape[0]
    g = torch.Generator().manual_seed(0)
    ref = copy.deepcopy(mod).double()
    ref._forward_pre_hooks.clear()
    ref._forward_hooks.clear()
    with torch.no_grad():
        ref.weight.copy_(torch.empty(c, dtype=torch.float64).uniform_(0.5, 1.5, generator=g))
    setattr(ref, name, 0.5)  # large, so that an eps left unscaled shows
    keep = torch.ones(c, dtype=torch.bool)
    keep[torch.randperm(c, generator=g)[: c // 3]] = False
    x = torch.randn(3, 5, c, generator=g, dtype=torch.float64) * keep
    try:
        with torch.no_grad():
            y = ref(x)
            if not isinstance(y, torch.Tensor) or y.shape != x.shape:
                return None
            y = y[..., keep].double()
            for form in FORMS:
                cand = copy.deepcopy(ref)
                cand.weight = nn.Parameter(ref.weight[keep].clone())
                rescale(cand, c, int(keep.sum()), form)
                if torch.allclose(cand(x[..., keep]).double(), y, rtol=1e-4, atol=1e-5):
                    return form
    except Exception:  # noqa: BLE001 - a norm that does not run on this probe is not rescaled
        return None
    return None


def stream_form(mod: nn.Module) -> str | None:
    """``"scale"`` or ``"offset"`` when ``mod`` computes ``w * x / sqrt(mean(x^2) + eps)`` (or with
    ``1 + w``) over its last axis, checked once per class; None otherwise (LayerNorm's mean, a bias,
    no eps attribute...): then the stream through it is kept."""
    t = type(mod)
    if t not in _FORM:
        _FORM[t] = _probe(mod)
    return _FORM[t]


def is_stream_norm(mod: nn.Module) -> bool:
    return isinstance(module_rule(mod), LastAxisNormRule) and stream_form(mod) is not None


def stream_norm_widths(model: nn.Module) -> dict[str, int]:
    """The width of every norm whose stream can be pruned (before surgery), by module path."""
    register_norms(model)
    return {n: int(m.weight.shape[0]) for n, m in model.named_modules() if is_stream_norm(m)}


def rescale_stream_norms(model: nn.Module, widths: dict[str, int]) -> tuple[int, int] | None:
    """After surgery sliced the stream: each norm of ``widths`` whose weight got narrower is rescaled
    (:func:`rescale`); returns (old, new) stream width, or None when no norm changed."""
    changed = None
    for name, width in widths.items():
        mod = model.get_submodule(name)
        kept = int(mod.weight.shape[0])
        if kept != width:
            rescale(mod, width, kept, stream_form(mod))
            changed = (width, kept)
    return changed


class LastAxisNormRule(ModuleRule):
    """A norm over the last axis with a per-entry weight (RMSNorm, T5's LayerNorm). Channels on the
    last axis (the residual stream) pass when the norm is an RMSNorm that a rescale keeps exact
    (:func:`stream_form`): its weight follows them and the ids are tagged ``stream``; otherwise they
    are kept (removing one would change every statistic). Channels on another axis (heads, for
    Qwen3's per-head q/k norms) pass with the weight untouched."""

    def propagate(self, ctx, node, module, x):
        shape = _shape(node)
        if shape is None or module.weight.shape[0] != shape[-1]:
            return ctx.opaque(node, f"{type(module).__name__} with an unexpected weight")
        if x.labelled and x.axis == x.ndim - 1 and stream_form(module) is not None:
            out = ctx.channelwise(node, x, ("weight",), axis=x.ndim - 1)
            ctx.rec.tag(x.ids, "stream")
            return out
        return ctx.normalize(node, x, [x.ndim - 1], f"{type(module).__name__} normalises over channels and is "
                             "not an RMSNorm that a rescale keeps exact: the stream is kept")


def _last_axis_norm(mod: nn.Module) -> bool:
    w = getattr(mod, "weight", None)
    return (type(mod).__name__.endswith(("RMSNorm", "LayerNorm")) and isinstance(w, torch.Tensor) and w.ndim == 1
            and getattr(mod, "data_format", "channels_last") == "channels_last" and not list(mod.children()))


def _scaled_embedding(mod: nn.Module) -> bool:
    """Gemma's ``...ScaledWordEmbedding``: an ``nn.Embedding`` whose forward multiplies the rows it
    looks up by a constant ``embed_scale``. Its output is still linear in each embedding column, so
    the embedding rule (a gate on its output folds into its columns) holds for it."""
    scale = getattr(mod, "embed_scale", None)
    return (isinstance(mod, nn.Embedding) and type(mod).__name__.endswith("ScaledWordEmbedding")
            and (isinstance(scale, (int, float)) or (isinstance(scale, torch.Tensor) and scale.numel() == 1)))


def retie_and_rescale_embeddings(model: nn.Module, old: int, new: int, divided: list[str]) -> None:
    """After the stream was cut from ``old`` to ``new`` channels: tied embeddings share one tensor
    again (surgery slices the two names apart, with equal values), and Gemma's scaled embedding,
    whose scale its config derives as ``sqrt(hidden_size)``, gets ``sqrt(new)`` with its weight times
    ``sqrt(old/new)``, so that the model computes the same and a reload from its config does too;
    when the output layer shares that weight, the norms in ``divided`` (the ``side="divide"`` taps)
    are divided by the same factor."""
    cfg = getattr(model, "config", None)
    out, inp = getattr(model, "get_output_embeddings", lambda: None)(), getattr(model, "get_input_embeddings", lambda: None)()
    tied = bool(getattr(cfg, "tie_word_embeddings", False)) and out is not None and inp is not None
    if tied and out.weight.shape == inp.weight.shape and torch.equal(out.weight, inp.weight):
        out.weight = inp.weight
    tied = tied and out.weight is inp.weight
    for mod in model.modules():
        if not _scaled_embedding(mod):
            continue
        scale = float(mod.embed_scale)
        if not math.isclose(scale, math.sqrt(old), rel_tol=1e-6):
            continue
        f = math.sqrt(old / new)
        with torch.no_grad():
            mod.weight.mul_(f)
            if isinstance(mod.embed_scale, torch.Tensor):
                mod.embed_scale.fill_(math.sqrt(new))
            else:
                mod.embed_scale = math.sqrt(new)
        if hasattr(mod, "scalar_embed_scale"):
            mod.scalar_embed_scale = math.sqrt(new)
        if tied and mod is inp:
            for name in divided:
                norm = model.get_submodule(name)
                divide(norm, torch.full_like(norm.weight, f))


def register_norms(model: nn.Module) -> None:
    """Give the model's own transformers classes a rule: its norms (see :class:`LastAxisNormRule`)
    and Gemma's scaled word embedding (the embedding rule, see :func:`_scaled_embedding`)."""
    if "transformers" not in sys.modules:
        return
    from .layers import EmbeddingRule

    registered = module_rules()
    for mod in model.modules():
        if not type(mod).__module__.startswith("transformers.") or type(mod) in registered:
            continue
        if module_rule(mod) is None and _last_axis_norm(mod):
            register_module(type(mod))(LastAxisNormRule)
        elif _scaled_embedding(mod):  # an nn.Embedding with a forward of its own: registered by its own type
            register_module(type(mod))(EmbeddingRule)


def register() -> None:
    """Register the rules of transformers' layers (once; nothing when transformers is not loaded)."""
    if "transformers" not in sys.modules:
        return
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - an unusual transformers build
        return
    if Conv1D not in module_rules():
        register_module(Conv1D)(Conv1DRule)
