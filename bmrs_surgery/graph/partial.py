"""Partial tracing: prune the traceable parts of a model whose top level cannot be traced.

A detector's forward (torchvision's Faster R-CNN, RetinaNet, FCOS, SSD; RAFT) holds Python control
flow over image lists, anchors and boxes that torch.fx cannot follow. Its parts can: the backbone
with its FPN takes one tensor, a head takes the list of feature maps (one map at a time, the same
layers), a box head takes the pooled features. :func:`find_parts` runs the model once on example
images, records every submodule's inputs, and takes, from the top down, the largest submodules that
trace and hold a prunable group (a head that takes a list is analysed on one feature map, through
:class:`OneOfList`). Each part is analysed, gated, pruned and proven on its own recorded input; a
group never crosses a part's boundary: the channels a part returns are kept whole there (a
backbone's FPN outputs, a head's box and class outputs), and :class:`PartResult` says so. The pruned
parts go back into the untouched model (its own control flow around them), and the whole model's
outputs (boxes, scores, labels) are compared with the gated model's on random images.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn


class OneOfList(nn.Module):
    """A head that takes a list of feature maps, called on a one-element list: traceable, and the
    same layers as for every level."""

    inner = "head"  # the attribute holding the wrapped module

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, x):
        return self.head([x])


class Packed(nn.Module):
    """A submodule called with several tensors that agree on every size but the channels (RAFT's
    update block: hidden state, context, correlation features, flow), given as one tensor, their
    concatenation on dim 1, and split back into its arguments: one input to trace and analyse. The
    inputs are the part's boundary, so the split's channels are kept as they are."""

    inner = "module"

    def __init__(self, module: nn.Module, sizes: list[int]):
        super().__init__()
        self.module = module
        self.sizes = list(sizes)

    def forward(self, x):
        starts = [sum(self.sizes[:i]) for i in range(len(self.sizes))]  # slices fx can trace (a split's
        return self.module(*[x[:, a:a + n] for a, n in zip(starts, self.sizes)])  # result cannot be unpacked)


@dataclass
class Part:
    name: str  # qualified name in the model
    module: nn.Module  # what is analysed: the submodule, or OneOfList(submodule)
    example: torch.Tensor  # its recorded input (batch of one)
    wrapped: bool = False


@dataclass
class PartResult:
    name: str
    ok: bool
    stages: dict = field(default_factory=dict)
    params_before: int = 0
    params_after: int | None = None
    max_abs_diff: float | None = None
    reach: float | None = None  # share of the part's parameters in prunable groups
    boundary: str = "outputs kept whole"
    onnx_max_abs_diff: float | None = None  # the pruned part in ONNX Runtime against torch (with onnx=True)


def call_with(model: nn.Module, inputs):
    """``model`` run on ``inputs``: one image batch, or a tuple of them given as positional
    arguments (RAFT's two frames)."""
    return model(*inputs) if isinstance(inputs, tuple) else model(inputs)


def positional_inputs(model: nn.Module) -> int:
    """How many positional arguments ``model``'s forward requires (RAFT: two frames; 1 at least)."""
    import inspect

    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return 1
    required = [p for p in params if p.default is inspect.Parameter.empty
                and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return max(1, len(required))


def _record_inputs(model: nn.Module, inputs) -> dict[str, tuple]:
    seen: dict[str, tuple] = {}
    hooks = []
    for name, mod in model.named_modules():
        if not name:
            continue

        def hook(m, args, name=name):
            seen.setdefault(name, args)
        hooks.append(mod.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            call_with(model, inputs)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _candidate(name: str, mod: nn.Module, args: tuple) -> Part | None:
    if len(args) > 1:
        if all(isinstance(a, torch.Tensor) and a.is_floating_point() and a.ndim >= 2
               and a.shape[:1] + a.shape[2:] == args[0].shape[:1] + args[0].shape[2:] for a in args):
            return Part(name, Packed(mod, [a.shape[1] for a in args]), torch.cat([a[:1] for a in args], 1),
                        wrapped=True)
        return None
    if len(args) != 1:
        return None
    (a,) = args
    if isinstance(a, torch.Tensor) and a.is_floating_point():
        return Part(name, mod, a[:1])
    if isinstance(a, (list, tuple)) and a and all(isinstance(t, torch.Tensor) for t in a):
        return Part(name, OneOfList(mod), a[0][:1], wrapped=True)
    return None


def find_parts(model: nn.Module, inputs, prefix: str = "", seen: dict | None = None) -> list[Part]:
    """The largest traceable submodules holding a prunable group, from the top down."""
    from ..placement import analyse_model

    if seen is None:
        seen = _record_inputs(model.eval(), inputs)
    parts = []
    for child_name, child in model.named_children():
        name = f"{prefix}{child_name}"
        if not any(True for _ in child.parameters()):
            continue
        part = _candidate(name, child, seen[name]) if name in seen else None
        if part is not None:
            try:
                analyse_model(part.module, part.example)
                parts.append(part)
                continue
            except Exception:  # noqa: BLE001 - not traceable or nothing prunable: look inside
                pass
        parts += find_parts(child, inputs, prefix=f"{name}.", seen=seen)
    return parts


def _install(model: nn.Module, part: Part, pruned: nn.Module, analysis) -> None:
    """Put a pruned part back: the pruned graph replaces the submodule; a wrapped one (a head taking
    a list, a module taking several tensors) keeps its own forward and takes the pruned layers (its
    graph has no sizes to rewrite)."""
    owner_name, _, attr = part.name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    if not part.wrapped:
        setattr(owner, attr, pruned)
        return
    if analysis.propagation.rewrites:
        raise RuntimeError(f"{part.name}: a wrapped part has sizes to rewrite; kept as it is")
    target = owner.get_submodule(attr)
    prefix = part.module.inner + "."
    for name, mod in pruned.named_modules():
        if name.startswith(prefix) and not any(True for _ in mod.children()):
            sub_owner, _, leaf = name[len(prefix):].rpartition(".")
            setattr(target.get_submodule(sub_owner) if sub_owner else target, leaf, mod)


def prune_parts(model: nn.Module, images, *, ratio: float = 0.3, seed: int = 0, tolerance: float = 1e-4,
                onnx: bool = False):
    """Random gates and keep-masks on every part (like ``check``), each proven on its recorded input
    (and, with ``onnx``, exported and compared in ONNX Runtime); returns (pruned model, gated
    reference model, part results). ``model`` is not modified."""
    from ..check import random_masks
    from ..gated import attach_gates
    from ..placement import analyse_model
    from ..plan import plan_keep
    from ..surgery import parameter_count, shrink
    from ..verify import compare, outputs
    from .groups import prunable_share

    gen = torch.Generator().manual_seed(seed)
    reference = copy.deepcopy(model).eval()
    parts = find_parts(reference, images)
    pruned_model = copy.deepcopy(reference)
    results = []
    for part in parts:
        res = PartResult(part.name, False, params_before=parameter_count(part.module))
        try:
            analysis = analyse_model(part.module, part.example)
            res.reach = prunable_share(analysis)
            gated = attach_gates(part.module, analysis=analysis)  # hooks on the reference's own layers
            bank = gated.bmrs_gates
            with torch.no_grad():
                bank.posterior[0].copy_(torch.empty(bank.num_gates).uniform_(-0.7, 0.0, generator=gen))
                bank.posterior[1].copy_(torch.empty(bank.num_gates).uniform_(-3.0, -1.0, generator=gen))
                keep = plan_keep(bank, random_masks(bank, ratio, gen))
                bank.mask.copy_(keep.float())
            gated.eval()
            pruned = shrink(analysis, bank, keep)
            ins = [part.example, torch.randn(part.example.shape, generator=gen) * part.example.std()]
            proof = compare(outputs(gated, ins), outputs(pruned, ins), tolerance)
            res.max_abs_diff = proof.max_abs_diff
            res.stages["verify"] = "ok" if proof.ok else f"max abs diff {proof.max_abs_diff:.3g}"
            _install(pruned_model, part, pruned, analysis)
            res.params_after = parameter_count(pruned)
            if onnx and proof.ok:
                from ..export import onnx_parity

                try:
                    res.onnx_max_abs_diff = onnx_parity(pruned, tuple(part.example.shape), ins[:1], tolerance)
                    res.stages["onnx"] = "ok"
                except Exception as exc:  # noqa: BLE001 - reported per part
                    res.stages["onnx"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
            res.ok = all(v == "ok" for v in res.stages.values())
        except Exception as exc:  # noqa: BLE001 - one part failing leaves it unpruned, said so
            res.stages["part"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
        results.append(res)
    return pruned_model.eval(), reference, results


def confident_detector(model: nn.Module) -> nn.Module:
    """``model`` (changed in place) made comparable at random weights: every box kept (score
    threshold 0) and the class scores spread (classifier weights x 30), since near-equal random
    scores make the top-k boxes noise that no pruning caused."""
    for owner in (model, getattr(model, "roi_heads", None)):
        if owner is not None and hasattr(owner, "score_thresh"):
            owner.score_thresh = 0.0
    with torch.no_grad():
        for name, mod in model.named_modules():
            if name.endswith(("cls_score", "cls_logits")) and "rpn" not in name and hasattr(mod, "weight"):
                mod.weight.mul_(30.0)
    return model


def _canonical_order(item: dict) -> dict:
    """A detector lists detections by score; equal scores (common with random weights) come in
    any order. Sort by score, then label, then box, so that two equal sets compare equal."""
    boxes, scores = item.get("boxes"), item.get("scores")
    if not (isinstance(boxes, torch.Tensor) and isinstance(scores, torch.Tensor)) or len(scores) < 2:
        return item
    order = torch.arange(len(scores))
    keys = [boxes[:, i] for i in reversed(range(boxes.shape[1]))]
    keys += [item["labels"].float()] if isinstance(item.get("labels"), torch.Tensor) else []
    for key in keys + [scores]:  # least significant first; stable sorts keep the earlier keys' order
        order = order[torch.sort(key[order], stable=True).indices]
    return {k: v[order] if isinstance(v, torch.Tensor) and len(v) == len(scores) else v for k, v in item.items()}


def compare_whole(reference: nn.Module, pruned: nn.Module, images: list, tolerance: float | None = None):
    """(proof, float32 difference or None): the whole model's outputs (:func:`detection_outputs`) with its pruned parts in
    place against the gated reference's, on each of ``images``. In float32 first; where that fails,
    again on float64 copies of both models and the images. A detector ranks boxes (top-k proposals,
    NMS): at random weights many scores nearly tie, and float32 rounding, which pruning changes,
    reorders them into other boxes; float64 rounding is about 1e-9 times smaller, so a difference
    left there is one that surgery made. The second item is the float32 difference when the proof
    given is float64's, None when float32 passed. The models passed in are not changed."""
    from ..verify import compare

    def run(model, dtype):
        return [detection_outputs(model, _cast(x, dtype)) for x in images]

    kw = {} if tolerance is None else {"tolerance": tolerance}
    proof = compare(run(reference, None), run(pruned, None), **kw)
    if proof.ok:
        return proof, None
    try:
        r64, p64 = copy.deepcopy(reference).double(), copy.deepcopy(pruned).double()
        wide = compare(run(r64, torch.float64), run(p64, torch.float64), **kw)
    except Exception:  # noqa: BLE001 - a model that cannot run in float64 keeps its float32 verdict
        return proof, None
    return wide, proof.max_abs_diff


def _cast(x, dtype):
    if dtype is None:
        return x
    if isinstance(x, (list, tuple)):
        return type(x)(_cast(v, dtype) for v in x)
    return x.to(dtype) if torch.is_tensor(x) and x.is_floating_point() else x


def detection_outputs(model: nn.Module, images) -> list[torch.Tensor]:
    """Boxes, scores and labels (every tensor of a detector's output list), in a canonical order;
    for another model, every tensor of its output (RAFT's flow after each update)."""
    with torch.no_grad():
        out = call_with(model, images)
    flat = []
    for item in out if isinstance(out, (list, tuple)) else [out]:
        if isinstance(item, dict):
            flat += [v.float() for v in _canonical_order(item).values() if isinstance(v, torch.Tensor)]
        elif isinstance(item, torch.Tensor):
            flat.append(item.float())
    return flat
