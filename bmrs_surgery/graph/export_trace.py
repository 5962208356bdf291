"""The torch.export front end: capture a model with ``torch.export.export(..., strict=False)`` and
give the channel analysis a graph it reads like an fx trace.

Hugging Face transformers no longer traces with torch.fx; torch.export captures it (and any model
whose forward takes token ids, masks or several keyword inputs). The captured graph is used for
*analysis only*; the model itself stays as it is:

1. **capture**: ``torch.export.export(model, (), example, strict=False)`` in eval mode; the graph
   of its ``module()`` names every parameter by its qualified name in the model;
2. **normalize** (graph in, graph out): shape assertions are dropped, ``aten.sym_size`` becomes
   ``size``, and every ATen overload (``aten.view.default``) is named by its packet
   (``aten.view``), whose arguments are those of the torch function with that name, so the rules
   of :mod:`.rules` apply; :mod:`.rules.aten` covers what only ATen graphs hold;
3. **outline**: every call of a module with a registered rule (``nn.Linear``, transformers'
   ``Conv1D``, ``nn.Embedding``, ``nn.LayerNorm``...) that reads one tensor and writes one becomes
   one ``call_module`` node of that very module (found through ``nn_module_stack``), so gates sit
   on the model's own layers as forward pre-hooks and parameters are sliced by their names.

Surgery (:func:`shrink_module`) then works on a copy of the eager model: gates folded, parameters
sliced by qualified name, size attributes updated (layer rules' ``resize``, then the attention and
MLP attributes of :func:`bmrs_surgery.hf.update_size_attributes`). The residual stream of an
RMSNorm model is one group whose gates sit on the outputs of its writers (:func:`stream_groups`);
its norms are rescaled at surgery and ``hidden_size`` follows. The pruned model keeps its own
class and forward, which is what a recipe replays (:mod:`bmrs_surgery.recipe`).
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from ..errors import GatePlacementError, GraphError
from ..errors import first_line as _first_line
from . import registry
from .groups import Analysis, solve_groups
from .propagate import propagate

TRACERS = ("auto", "fx", "export")
_SAME_VALUE = {"to", "_to_copy", "alias", "clone", "contiguous"}
_DROP = {"_assert_tensor_metadata", "_assert_scalar", "_assert_async", "sym_constrain_range_for_size",
         "sym_constrain_range", "_assert_tensor_metadata.default"}


@dataclass
class ExportAnalysis(Analysis):
    """An :class:`Analysis` of a graph captured with torch.export: ``gm`` is for analysis only,
    gates go on ``model`` and surgery works on a copy of ``model``."""

    tracer: str = "export"
    example: Any = None


@contextlib.contextmanager
def _quiet():
    loggers = [logging.getLogger(n) for n in ("torch.export", "torch._dynamo", "torch._export",
                                              "torch.fx.experimental.symbolic_shapes", "transformers")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()), \
                contextlib.redirect_stdout(io.StringIO()):  # export prints the graph it gave up on
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)


@contextlib.contextmanager
def _no_cache(model: nn.Module):
    """A transformers model without its key/value cache output (``use_cache=False``) for the capture."""
    config = getattr(model, "config", None)
    had = getattr(config, "use_cache", None)
    if had:
        config.use_cache = False
    try:
        yield
    finally:
        if had:
            config.use_cache = had


def _construct(exc: BaseException) -> str:
    """The construct that stopped torch.export, from the innermost frame of the model's own code."""
    tb = exc.__traceback__
    where = ""
    while tb is not None:
        f = tb.tb_frame.f_code
        if "site-packages/torch" not in f.co_filename and "/torch/" not in f.co_filename:
            where = f"{f.co_filename.rsplit('/', 1)[-1]}:{tb.tb_lineno} in {f.co_name}"
        tb = tb.tb_next
    return where


def export_program(model: nn.Module, example) -> torch.export.ExportedProgram:
    """``torch.export.export(model, ..., strict=False)`` in eval mode, errors as one line."""
    args, kwargs = ((), dict(example)) if isinstance(example, dict) else ((example,), {})
    if kwargs and getattr(getattr(model, "config", None), "use_cache", None) is not None:
        import inspect

        if "use_cache" in inspect.signature(model.forward).parameters:
            kwargs["use_cache"] = False  # no key/value cache object among the outputs (T5 makes one regardless)
    was = model.training
    model.eval()
    try:
        with _quiet(), _no_cache(model), torch.no_grad():
            return torch.export.export(model, args, kwargs, strict=False)
    except Exception as exc:  # noqa: BLE001 - export raises many kinds
        where = _construct(exc)
        raise GraphError(f"torch.export cannot capture {type(model).__name__}"
                         + (f" ({where})" if where else "") + f": {_first_line(exc)}") from None
    finally:
        model.train(was)


def _op_name(target) -> str:
    return getattr(target, "__name__", str(target))


def normalize(gm: fx.GraphModule) -> None:
    """Drop assertions, ``sym_size`` -> ``size``, ATen overloads -> their packets (see the module doc)."""
    g = gm.graph
    for node in list(g.nodes):
        if node.op != "call_function":
            continue
        t = node.target
        if not isinstance(t, torch._ops.OpOverload):
            continue
        packet = t.overloadpacket
        name = _op_name(packet)
        if name in _DROP or (name.startswith("_assert") and not node.users):
            if not node.users:
                g.erase_node(node)
            continue
        if name == "sym_size":
            node.op, node.target = "call_method", "size"
            continue
        if name == "scaled_dot_product_attention" and node.kwargs.get("enable_gqa", False):
            continue  # keeps its overload name: rules.aten handles grouped key/value heads
        if registry.function_rule(_op_name(t)) is not None:
            continue
        node.target = packet


def buffer_value(x):
    """Identity: marks a buffer or constant read in the analysis graph (rotary frequencies, masks):
    its values are fixed, never channels (see :func:`mark_constants`)."""
    return x


def unmarked(node: fx.Node) -> fx.Node:
    """The read behind a :func:`buffer_value` mark; any other node as it is."""
    if node.op == "call_function" and node.target is buffer_value and node.args and isinstance(node.args[0], fx.Node):
        return node.args[0]
    return node


def mark_constants(gm: fx.GraphModule, model: nn.Module) -> None:
    """Reads of buffers and lifted constants go through :func:`buffer_value`, so the analysis never
    takes a non-trainable tensor (RoPE's ``inv_freq``) for a parameter with channels; export's
    ``_guards_fn`` call is dropped."""
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and str(node.target).startswith("_guards") and not node.users:
            gm.graph.erase_node(node)
        elif node.op == "get_attr" and node.target not in params and node.users:
            with gm.graph.inserting_after(node):
                new = gm.graph.create_node("call_function", buffer_value, (node,))
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new, delete_user_cb=lambda u, new=new: u is not new)


def _module_of(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[str, str] | None:
    """(stack key, module path) of the outermost module with a rule that this node runs inside."""
    stack = node.meta.get("nn_module_stack") or {}
    for key, entry in stack.items():
        path = entry[0] if isinstance(entry, tuple) else entry
        mod = modules.get(path)
        if mod is not None and path and registry.module_rule(mod) is not None:
            return key, path
    return None


def _own_attribute(node: fx.Node, own: str, aliases: set[str]) -> bool:
    """A read of the module's own parameter or buffer (directly, or marked by :func:`buffer_value`:
    Gemma's embedding scale), which the module's call reads by itself. ``aliases``: other names of
    the module's own tensors (a tied ``lm_head.weight`` is read as ``model.embed_tokens.weight``)."""
    node = unmarked(node)
    return node.op == "get_attr" and (str(node.target).startswith(own) or str(node.target) in aliases)


def tensor_aliases(model: nn.Module) -> dict[str, list[str]]:
    """Every parameter name of ``model`` -> the other names of the same tensor (tied embeddings:
    ``model.embed_tokens.weight`` <-> ``lm_head.weight``); empty lists for the rest."""
    names: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(n)
    return {n: [m for m in same if m != n] for same in names.values() for n in same}



def outline(gm: fx.GraphModule, model: nn.Module) -> list[str]:
    """Replace each call of a module with a rule by one ``call_module`` node (see the module doc);
    returns the outlined module paths."""
    modules = dict(model.named_modules())
    tied = {n: others for n, others in tensor_aliases(model).items() if others}  # usually none, or one pair
    regions: dict[str, list[fx.Node]] = {}
    paths: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method"):
            continue
        hit = _module_of(node, modules)
        if hit is not None:
            regions.setdefault(hit[0], []).append(node)
            paths[hit[0]] = hit[1]
    done = []
    for key, nodes in regions.items():
        path = paths[key]
        inside = set(nodes)
        own = path + "."
        aliases = {m for n, others in tied.items() if n.startswith(own) for m in others}
        for n in nodes:  # a same-dtype cast of the input that export also hands out as the input
            # itself (an RMSNorm's ``x.to(float32)`` doubling as the decoder's residual): its outside
            # users read the input, so the call still has one input and one output
            src = n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None
            if src is None or src in inside or _op_name(n.target) not in _SAME_VALUE:
                continue
            a, b = n.meta.get("val"), src.meta.get("val")
            if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype \
                    and tuple(a.shape) == tuple(b.shape):
                for u in list(n.users):
                    if u not in inside:
                        u.replace_input_with(n, src)
        ext: list[fx.Node] = []
        for n in nodes:
            for a in n.all_input_nodes:
                if a in inside or a in ext or _own_attribute(a, own, aliases):
                    continue
                ext.append(a)
        outs = [n for n in nodes if any(u not in inside for u in n.users)]
        if len(ext) != 1 or len(outs) != 1 or not isinstance(ext[0].meta.get("val"), torch.Tensor):
            continue
        out = outs[0]
        with gm.graph.inserting_before(out):
            new = gm.graph.create_node("call_module", path, (ext[0],))  # the model's module, not gm's
        new.meta = dict(out.meta)
        out.replace_all_uses_with(new)
        for n in reversed(nodes):
            if not n.users:
                gm.graph.erase_node(n)
        done.append(path)
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)
    return done


def _fetch(root: nn.Module, target: str):
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _rebuild(gm: fx.GraphModule, model: nn.Module) -> fx.GraphModule:
    """A GraphModule over ``gm``'s graph whose modules and parameters are the model's own objects
    (constants export lifted come from ``gm``)."""
    root: dict[str, Any] = {}
    for node in gm.graph.nodes:
        if node.op in ("get_attr", "call_module"):
            try:
                root[node.target] = _fetch(model, node.target)
            except AttributeError:
                root[node.target] = _fetch(gm, node.target)
    # GraphModule registers a buffer it is handed as a persistent one, also on the model's own module
    # that holds it (Gemma's non-persistent embedding scale would then be saved): restore them
    non_persistent = {id(m): set(m._non_persistent_buffers_set) for m in model.modules()}
    try:
        return fx.GraphModule(root, gm.graph, type(model).__name__)
    finally:
        for m in model.modules():
            m._non_persistent_buffers_set.clear()
            m._non_persistent_buffers_set.update(non_persistent.get(id(m), ()))


def _shape_meta(gm: fx.GraphModule) -> None:
    """``tensor_meta`` from export's fake values, where export left none."""
    from torch.fx.passes.shape_prop import _extract_tensor_metadata

    for node in gm.graph.nodes:
        if node.meta.get("tensor_meta") is not None:
            continue
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            node.meta["tensor_meta"] = _extract_tensor_metadata(val)
        elif isinstance(val, (list, tuple)) and val and all(isinstance(v, torch.Tensor) for v in val):
            node.meta["tensor_meta"] = [_extract_tensor_metadata(v) for v in val]


def capture(model: nn.Module, example) -> tuple[fx.GraphModule, list[str]]:
    """The analysis graph of ``model`` on ``example`` (a tensor or a dict of named tensors) and
    the modules outlined as calls."""
    registry._load_builtin()
    from .rules import transformers_layers

    transformers_layers.register()
    transformers_layers.register_norms(model)
    ep = export_program(model, example)
    with _quiet():
        gm = ep.module()
    normalize(gm)
    mark_constants(gm, model)
    outlined = outline(gm, model)
    new = _rebuild(gm, model)
    new.graph.eliminate_dead_code()
    _shape_meta(new)
    return new, outlined


def _stream_problem(model: nn.Module, gm: fx.GraphModule, group) -> str | None:
    """Why a residual stream group (tagged ``stream`` by an RMSNorm rule) cannot be pruned exactly,
    or None. Its gates must make a pruned channel zero in the stream itself, so every writer must be
    a layer whose output is linear in its output rows (``nn.Linear``, ``nn.Embedding``, ``Conv1D``),
    called as one layer, whose weight no other layer shares (tied embeddings would fold the writer's
    gate into the reader too)."""
    from .rules.layers import EmbeddingRule, LinearRule
    from .rules.transformers_layers import Conv1DRule

    modules = dict(model.named_modules())
    calls = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    aliases = tensor_aliases(model)
    writers = [s for s in group.slots if s.role in ("out", "param")]
    for s in writers:
        shared = aliases.get(s.target, [])
        if shared and tied_reader_norm(model, gm, group, s, shared) is None:
            return (f"{s.target} and {shared[0]} are one tensor (tied embeddings): a gate folded into the writer "
                    "would scale the reader too, and the reader's input is not an RMSNorm that could divide it out")
    for s in writers:
        if s.role == "param":
            return f"parameter {s.target} is added to the residual stream with no layer whose output a gate could scale"
        mod = modules.get(s.module)
        if not isinstance(registry.module_rule(mod), (LinearRule, EmbeddingRule, Conv1DRule)) or s.module not in calls:
            return f"{s.module} ({type(mod).__name__}) writes the residual stream and its output cannot be gated"
    return None


_PASS_THROUGH = ("alias", "slice", "select", "clone", "contiguous", "detach")  # the same entries on the last axis


def tied_reader_norm(model: nn.Module, gm: fx.GraphModule, group, writer, shared: list[str]) -> str | None:
    """Tied embeddings: the writer's weight is also the weight of the output layer (``lm_head``),
    so E[theta] folded into the embedding's columns also scales the output layer's input columns.
    That is undone exactly when the output layer reads the stream's last RMSNorm (through slices
    only) and nothing else reads that norm: its weight divided by E[theta] (see
    ``transformers_layers.divide``). Returns that norm's path, or None."""
    from .rules.transformers_layers import stream_form

    if len(shared) != 1 or writer.role != "out":
        return None
    reader = shared[0].rpartition(".")[0]
    modules = dict(model.named_modules())
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == reader]
    if len(calls) != 1 or not isinstance(modules.get(reader), nn.Linear):
        return None
    x = calls[0].args[0]
    while isinstance(x, fx.Node) and x.op == "call_function" and _op_name(x.target) in _PASS_THROUGH \
            and len(x.users) == 1:
        x = x.args[0]
    if not (isinstance(x, fx.Node) and x.op == "call_module" and len(x.users) == 1 and x.target in group.norms):
        return None
    return x.target if stream_form(modules[x.target]) is not None else None


def _writer_taps(model: nn.Module, gm: fx.GraphModule, group) -> None:
    """The stream's gates: one on the output of each writer (``side="out"``), replacing the
    readers' input gates, so that a pruned channel is zero everywhere in the stream. A writer whose
    weight an output layer shares (tied embeddings) also gets a ``side="divide"`` tap on the norm
    that output layer reads (:func:`tied_reader_norm`): no gate runs there, surgery divides it."""
    from .group import Tap

    calls: dict[str, str] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            calls.setdefault(n.target, n.name)
    aliases = tensor_aliases(model)
    taps = []
    for module in dict.fromkeys(s.module for s in group.slots if s.role == "out"):
        out = next(s for s in group.slots if s.module == module and s.role == "out" and s.target.endswith(".weight"))
        taps.append(Tap(module, -1, out.index.copy(), calls[module], side="out"))
        shared = aliases.get(out.target, [])
        norm = tied_reader_norm(model, gm, group, out, shared) if shared else None
        if norm is not None:
            taps.append(Tap(norm, -1, out.index.copy(), calls[norm], side="divide"))
    group.taps = taps
    group.kind = "stream"


def stream_groups(model: nn.Module, gm: fx.GraphModule, prop, ignore: tuple[str, ...] = ()):
    """:func:`solve_groups`, then the residual streams of RMSNorm models (ids tagged ``stream``):
    a stream that can be pruned exactly gets gates on its writers' outputs (:func:`_writer_taps`);
    one that cannot is kept, with the reason among the opaque operations (``inspect`` shows it)."""
    sol, groups = solve_groups(model, prop, ignore)
    said = False
    for _ in range(8):
        bad = False
        for g in groups:
            if "stream" in g.tags:
                why = _stream_problem(model, gm, g)
                if why is not None:
                    prop.recorder.block(g.classes)
                    prop.opaque.append((g.norms[0] if g.norms else g.name, why))
                    bad = said = True
        if not bad:
            break
        sol, groups = solve_groups(model, prop, ignore)
    for g in groups:
        if "stream" in g.tags:
            _writer_taps(model, gm, g)
    if not said and not any(g.kind == "stream" for g in groups):
        tagged = [r for r, t in sol.tags.items() if "stream" in t and sol.blocked[r]]
        if tagged:
            norm = next((s.module for s in prop.slots if s.role == "norm" and sol.root[s.ids[0]] in tagged), "stream")
            prop.opaque.append((norm, "the residual stream reaches the model's output (the hidden states) or an "
                                      "operation that keeps it, so the hidden size stays; with a head "
                                      "(ForCausalLM, ForSequenceClassification) it can be pruned"))
    return sol, groups


def _example_shape(example) -> tuple[int, ...]:
    if isinstance(example, dict):
        return tuple(next(iter(example.values())).shape)
    return tuple(example.shape)


def analyse_exported(model: nn.Module, example, ignore: tuple[str, ...] = ()) -> ExportAnalysis:
    """Capture with torch.export, propagate channels, solve and group."""
    t0 = time.perf_counter()
    gm, _ = capture(model, example)
    t1 = time.perf_counter()
    prop = propagate(gm)
    sol, groups = stream_groups(model, gm, prop, ignore)
    t2 = time.perf_counter()
    return ExportAnalysis(model, gm, _example_shape(example), prop, sol, groups, [],
                          {"trace_s": t1 - t0, "shapes_s": 0.0, "groups_s": t2 - t1}, [], None,
                          tracer="export", example=example)


def tracer_of(analysis) -> str:
    """Which front end made an analysis: ``fx`` or ``export``."""
    return getattr(analysis, "tracer", "fx")


def analyse_model(model: nn.Module, example, ignore: tuple[str, ...] = (), tracer: str = "auto") -> Analysis:
    """The dependency analysis with the chosen front end. ``auto``: torch.fx for a tensor input
    when it traces the model (unless it kept submodules whole and torch.export reaches more of the
    parameters, see :func:`_wider_of`), else torch.export; named (keyword) inputs always use torch.export.
    When both fail, one line names what stopped each."""
    from ..placement import analyse_model as analyse_fx

    if tracer not in TRACERS:
        raise GraphError(f"--tracer must be one of {', '.join(TRACERS)}, got {tracer!r}")
    if not any(True for _ in model.parameters()):
        raise GatePlacementError(f"{type(model).__name__} has no parameters: nothing to prune")
    named = isinstance(example, dict)
    if tracer == "fx" and named:
        raise GraphError("--tracer fx takes one tensor input; named inputs (--input NAME:...) need --tracer export")
    fx_error = None
    one = {k: v[:1] for k, v in example.items()} if named else (example[:1] if example.ndim > 1 else example)
    if tracer == "fx" or (tracer == "auto" and not named and not _is_transformers(model)):
        try:
            analysis = analyse_fx(model, example)
            analysis.tracer = "fx"  # type: ignore[attr-defined]
            if tracer == "auto" and analysis.opaque_modules:
                return _wider_of(analysis, model, one, ignore)
            return analysis
        except GatePlacementError:  # no group: torch.export may still see inside what fx kept whole
            if tracer == "fx":
                raise
            exported = _exported_or_none(model, one, ignore)
            if exported is None or not exported.groups:
                raise  # fx's answer (no prunable structure) stands
            return exported
        except GraphError as exc:
            # a name fx cannot write into generated code is the user's to rename, whatever captures
            # the graph: the pruned network is generated code too
            if tracer == "fx" or "rename it" in exc.message:
                raise
            fx_error = exc
    try:
        analysis = analyse_exported(model, one, ignore)
    except Exception as exc:  # noqa: BLE001 - after fx failed, any failure of the fallback is reported with fx's
        if fx_error is not None:
            why = exc.message if isinstance(exc, GraphError) else _first_line(exc)
            raise GraphError(f"neither tracer could capture {type(model).__name__}: torch.fx: {fx_error.message}; "
                             f"torch.export: {why}") from None
        raise
    if not analysis.groups:
        why = analysis.propagation.opaque
        hint = f" ({why[0][0]}: {why[0][1]})" if why else ""
        raise GatePlacementError(f"{type(model).__name__} has no prunable structure outside its output layer{hint}")
    return analysis


def _exported_or_none(model: nn.Module, one, ignore: tuple[str, ...]) -> ExportAnalysis | None:
    """The torch.export analysis of ``model`` on the one-row example ``one``, or None when it fails
    (used after fx has given an answer of its own, which then stands)."""
    try:
        return analyse_exported(model, one, ignore)
    except Exception:  # noqa: BLE001 - any failure leaves fx's answer
        return None


def _wider_of(fx_analysis: Analysis, model: nn.Module, one, ignore: tuple[str, ...]) -> Analysis:
    """``auto`` after fx kept submodules whole (control flow on shapes, as in timm's ``ConvMlp``):
    torch.export specialises on the example's shapes and may see inside them. The capture whose
    groups reach the larger share of the parameters is kept (fx on a tie); the other is dropped.
    A failure of torch.export here is not an error: fx's analysis stands."""
    from .groups import prunable_share

    exported = _exported_or_none(model, one, ignore)
    if exported is None:
        return fx_analysis
    if exported.groups and prunable_share(exported) > prunable_share(fx_analysis) + 1e-9:
        exported.fx_opaque_modules = list(fx_analysis.opaque_modules)  # type: ignore[attr-defined]
        return exported
    return fx_analysis


def _is_transformers(model: nn.Module) -> bool:
    """A transformers model: torch.fx cannot trace it (transformers removed its fx tracer)."""
    return type(model).__module__.startswith("transformers.") and "transformers" in sys.modules


def shrink_module(analysis: ExportAnalysis, expected: dict[int, np.ndarray], keep: dict[int, np.ndarray]) -> nn.Module:
    """The pruned eager model (a copy; the analysed model is untouched): each tap's E[theta] folded
    into the layer it scales, every owned parameter dimension sliced to the kept indices by
    qualified name, size attributes updated. Its class and forward are the model's own."""
    from ..gated import gates_removed
    from ..hf import update_hidden_size, update_size_attributes
    from ..surgery import (
        fold_expected,
        freeze_layers,
        rescale_after_slicing,
        slice_parameters,
        update_sizes,
        widths_before,
    )
    from .rules.transformers_layers import rescale_stream_norms, retie_and_rescale_embeddings, stream_norm_widths

    widths = stream_norm_widths(analysis.model)
    with gates_removed(analysis.model):
        model = copy.deepcopy(analysis.model)
    model.eval()
    freeze_layers(model)
    fold_expected(model, analysis, expected)
    rule_widths = widths_before(model)
    touched = slice_parameters(model, analysis, keep)
    update_sizes(model, touched)
    rescale_after_slicing(model, rule_widths)
    hidden = rescale_stream_norms(model, widths)  # RMSNorm: weight * sqrt(C/C'), eps * C/C'
    if hidden is not None:
        update_hidden_size(model, *hidden)
        divided = [t.module for g in analysis.groups for t in g.taps if t.side == "divide"]
        retie_and_rescale_embeddings(model, *hidden, divided)
    update_size_attributes(model)
    return model
