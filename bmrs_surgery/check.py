"""The dry run behind ``bmrs-compress check``: every pipeline stage on random gates and masks.

trace -> groups -> gates -> random posteriors and keep-masks -> surgery -> equivalence proof ->
ONNX export -> ONNX Runtime parity. No data is needed; each stage reports "ok" or its error, and
later stages are skipped once one fails.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from . import defaults
from .errors import BmrsError, first_line
from .gated import attach_gates, detach_gates
from .graph.export_trace import analyse_model as analyse_traced
from .graph.groups import prunable_share
from .inputs import first
from .inputs import outputs as named_outputs
from .limits import check_seed
from .plan import plan_keep
from .surgery import parameter_count, shrink
from .verify import check_weights, compare, failing_group, outputs, random_inputs

NORM_STATISTICS = ("running_mean", "running_var")  # the buffers randomized_copy draws anew

STAGES = ("trace", "groups", "gates", "surgery", "verify", "onnx")


@dataclass
class CheckResult:
    model: str
    input_shape: tuple[int, ...]
    stages: dict[str, str] = field(default_factory=dict)
    groups: int = 0
    structures: int = 0
    structures_kept: int = 0
    params_before: int = 0
    params_after: int | None = None
    max_abs_diff: float | None = None
    onnx_max_abs_diff: float | None = None
    output_scale: float | None = None
    opaque: list = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    tracer: str | None = None  # fx or export: the front end that captured the graph
    inputs: list[str] = field(default_factory=list)  # named inputs (NAME:DTYPE:SHAPE), if any
    reach: float | None = None  # share of the parameters that some group can prune (see prunable_share)
    parts: list = field(default_factory=list)  # partial tracing: one dict per pruned part (see check_parts)
    proof_dtype: str = "float32"  # float64 when float32 rounding alone broke the proof (see proof_in_float64)
    float32_max_abs_diff: float | None = None  # then: the float32 difference that did not pass
    onnx_tolerance: float | None = None  # set when float32 rounding broke the proof: the ONNX check's relative bound
    whole_proof_dtype: str | None = None  # partial tracing: float64 when the whole model was compared so
    whole_float32_max_abs_diff: float | None = None  # (see graph.partial.compare_whole), with float32's

    @property
    def ok(self) -> bool:
        return all(self.stages.get(s) == "ok" for s in self.stages) and bool(self.stages)

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["input_shape"] = list(self.input_shape)
        d["ok"] = self.ok
        return d


def _err(exc: BaseException) -> str:
    return first_line(exc) if isinstance(exc, BmrsError) else f"{type(exc).__name__}: {first_line(exc)}"


def random_masks(bank, ratio: float, generator: torch.Generator) -> torch.Tensor:
    """Prune ``ratio`` of every group's structures at random, keeping at least one per group."""
    keep = torch.ones(bank.num_gates, dtype=torch.bool)
    for i, group in enumerate(bank.groups):
        sl = bank.slice_of(i)
        n_drop = min(int(round(ratio * group.size)), group.size - 1)
        drop = torch.randperm(group.size, generator=generator)[:n_drop]
        k = torch.ones(group.size, dtype=torch.bool)
        k[drop] = False
        keep[sl] = k
    return keep


def randomized_copy(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """A copy with random weights and norm statistics, so that a freshly built network (zero-initialised
    heads, unit statistics, tiny layer scales) gives outputs large enough to prove anything. Other
    buffers are constants of the computation (CSATv2's DCT bases and coefficient variances, masks,
    fixed position tables) and stay as built: random ones can make the output non-finite."""
    model = copy.deepcopy(model)
    stats = [(n, b) for n, b in model.named_buffers() if n.rpartition(".")[2] in NORM_STATISTICS]
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + stats:
            if not t.is_floating_point():
                continue
            leaf = name.rpartition(".")[2]
            if t.ndim >= 2:  # weights (Linear, Conv, attention projections) and embeddings
                fan_in = t[0].numel()
                t.copy_(torch.randn(t.shape, generator=generator) / fan_in ** 0.5)
            elif leaf == "running_var" or (leaf == "weight" and t.ndim == 1) or "scale" in leaf:
                t.copy_(torch.empty(t.shape).uniform_(0.5, 1.5, generator=generator))
            else:
                t.copy_(0.1 * torch.randn(t.shape, generator=generator))
    return model


def proof_in_float64(analysis, gated: nn.Module, keep: torch.Tensor, inputs: list, tolerance: float):
    """The equivalence proof again in float64: a copy of the gated network, the surgery redone on
    it (E[theta] folded in float64) and the inputs, all in float64; None when the network cannot
    run in float64. A network with random weights can amplify float32 rounding past the tolerance
    (its outputs grow block by block); in float64 rounding is about 1e-9 times smaller, so what is
    left is a difference that surgery made. One example only: float64 convolutions run on a slow
    path on CPU (about 15 times float32's time)."""
    def wide(x):
        if isinstance(x, dict):
            return {k: wide(v) for k, v in x.items()}
        return x.double() if torch.is_tensor(x) and x.is_floating_point() else x

    try:
        a64, g64 = copy.deepcopy((analysis, gated))  # together: the copies share what the originals share
        g64.double()
        p64 = shrink(a64, g64.bmrs_gates, keep)
        xs = [wide(first(inputs[0], 1))]  # one example: float64 convolutions are slow on CPU
        reference, candidate = named_outputs(g64, xs, cast=False), named_outputs(p64, xs, cast=False)
        return compare(reference, candidate, tolerance)
    except Exception:  # noqa: BLE001 - a network that cannot run in float64 keeps its float32 verdict
        return None


def _fold_only_diff(analysis, bank, gated: nn.Module, inputs, run) -> float | None:
    """Max abs output difference between the gated network and its surgery with every structure
    kept (only E[theta] folded into the weights): a network whose outputs change that much from
    rounding alone cannot prove anything at the tolerance. None when it cannot be computed."""
    saved = bank.mask.clone()
    every = torch.ones(bank.num_gates, dtype=torch.bool)
    try:
        with torch.no_grad():
            bank.mask.fill_(1.0)
        return compare(run(gated, inputs), run(shrink(analysis, bank, every), inputs)).max_abs_diff
    except Exception:  # noqa: BLE001 - a diagnosis only
        return None
    finally:
        with torch.no_grad():
            bank.mask.copy_(saved)


def check_model(model: nn.Module, input_shape: tuple[int, ...], *, name: str = "model", ratio: float = defaults.CHECK_RATIO,
                seed: int = 0, onnx: bool = True, real_inputs: list[torch.Tensor] | None = None,
                ignore: tuple[str, ...] = (), tolerance: float = defaults.TOLERANCE, keep_weights: bool = False,
                round_to: int | None = defaults.ROUND_TO, specs: list | None = None,
                tracer: str = "auto") -> CheckResult:
    """Run every stage on ``model`` (never modified: it works on a copy). With ``keep_weights``, a
    model with a non-finite, integer or complex weight is refused (a :class:`ModelLoadError`).
    ``specs``: named inputs (:class:`~bmrs_surgery.inputs.InputSpec`, e.g. token ids and a mask),
    given to the model as keyword arguments instead of one float tensor of ``input_shape``;
    ``tracer``: ``auto``, ``fx`` or ``export`` (see :mod:`bmrs_surgery.graph.export_trace`)."""
    if keep_weights:
        check_weights(model, name)
    res = CheckResult(name, tuple(input_shape))
    res.params_before = parameter_count(model)
    gen = torch.Generator().manual_seed(check_seed(seed))
    model = copy.deepcopy(model) if keep_weights else randomized_copy(model, gen)
    if specs:
        from .inputs import make_inputs

        res.inputs = [str(s) for s in specs]
        example = make_inputs(specs, model, batch=1, seed=seed)
    else:
        example = torch.randn((1,) + tuple(input_shape[1:]), generator=gen)
    model.eval()
    t = time.perf_counter()
    try:
        analysis = analyse_traced(model, example, ignore, tracer)
    except BmrsError as exc:
        msg = _err(exc)
        if exc.stage == "groups":  # traced, but nothing to prune
            res.stages["trace"] = "ok"
            res.stages["groups"] = msg
            return res
        res.stages["trace"] = msg
    except Exception as exc:  # noqa: BLE001 - report, never crash
        res.stages["trace"] = _err(exc)
    if res.stages.get("trace"):  # not traced: a detector's top level; its traceable parts instead
        if specs:
            return res
        return check_parts(model, res, ratio=ratio, seed=seed, onnx=onnx, tolerance=tolerance,
                           keep_weights=keep_weights)
    res.seconds["analysis"] = time.perf_counter() - t
    res.tracer = getattr(analysis, "tracer", "fx")
    res.stages["trace"] = "ok"
    res.stages["groups"] = "ok"
    res.groups = len(analysis.groups)
    res.structures = sum(g.size for g in analysis.groups)
    res.reach = prunable_share(analysis)
    res.opaque = [f"{n}: {why}" for n, why in analysis.propagation.opaque][:20]
    try:
        gated = attach_gates(model, analysis=analysis)
    except Exception as exc:  # noqa: BLE001
        res.stages["gates"] = _err(exc)
        return res
    try:
        bank = gated.bmrs_gates
        with torch.no_grad():
            # E[theta] between about 0.5 and 1: every kept structure is scaled, none is silenced
            bank.posterior[0].copy_(torch.empty(bank.num_gates).uniform_(-0.7, 0.0, generator=gen))
            bank.posterior[1].copy_(torch.empty(bank.num_gates).uniform_(-3.0, -1.0, generator=gen))
            keep = plan_keep(bank, random_masks(bank, ratio, gen), round_to=round_to)
            bank.mask.copy_(keep.float())
        res.structures_kept = int(keep.sum())
        gated.eval()
        if specs:
            from .inputs import make_inputs

            inputs = [make_inputs(specs, model, batch=2, seed=seed + 1 + i) for i in range(2)]
        else:
            inputs = random_inputs(input_shape, seed=seed) + list(real_inputs or [])
        run = named_outputs if specs else outputs
        res.stages["gates"] = "ok"
        t = time.perf_counter()
        try:
            pruned = shrink(analysis, bank, keep)
        except Exception as exc:  # noqa: BLE001
            res.stages["surgery"] = _err(exc)
            return res
        res.seconds["surgery"] = time.perf_counter() - t
        res.stages["surgery"] = "ok"
        res.params_after = parameter_count(pruned)
        t = time.perf_counter()
        reference = run(gated, inputs)
        if not all(bool(torch.isfinite(v).all()) for ref in reference for v in ref):
            # nothing to prove against (inf - inf is no difference a group made); say so
            res.stages["verify"] = ("the gated model's outputs are not finite on these inputs"
                                    + ("" if keep_weights else " with random weights") + ": nothing to compare")
            return res
        try:
            proof = compare(reference, run(pruned, inputs), tolerance)
        except Exception as exc:  # noqa: BLE001
            proof = None
            res.stages["verify"] = f"pruned model fails to run: {_err(exc)}"
        if proof is not None:
            res.max_abs_diff = proof.max_abs_diff
            res.output_scale = proof.scale
            if proof.ok:
                res.stages["verify"] = "ok"
            else:
                res.stages["verify"] = f"max abs diff {proof.max_abs_diff:.3g} > {tolerance:g} x output scale {proof.scale:.3g}"
        if res.stages["verify"] != "ok" and proof is not None:  # float32 rounding, or a real difference?
            wide = proof_in_float64(analysis, gated, keep, inputs, tolerance)
            if wide is not None and wide.ok:
                res.float32_max_abs_diff = proof.max_abs_diff
                res.proof_dtype = "float64"
                res.max_abs_diff, res.output_scale = wide.max_abs_diff, wide.scale
                res.stages["verify"] = "ok"
        if res.stages["verify"] != "ok":
            if proof is not None:
                folded = _fold_only_diff(analysis, bank, gated, inputs, run)
                if folded is not None and folded > tolerance * proof.scale:
                    res.stages["verify"] += (
                        f"; removing nothing (the gates folded in only) already differs by {folded:.3g}: the"
                        + ("" if keep_weights else " random-weight") + " network amplifies rounding; no group is"
                        " to blame" + ("" if keep_weights else " (--keep-weights checks the model's own weights)"))
                    return res
            group = None if specs else failing_group(analysis, bank, keep, gated, inputs, tolerance)
            if group is not None:
                res.stages["verify"] += f" (group {group.name}, {group.kind}, layers {', '.join(group.consumers[:3])})"
            return res
        res.seconds["verify"] = time.perf_counter() - t
    finally:
        detach_gates(gated)
    if onnx:
        from .export import onnx_parity

        t = time.perf_counter()
        onnx_tolerance = tolerance
        if res.proof_dtype == "float64":
            # the network amplifies float32 rounding (the float32 proof measured how far): ONNX
            # Runtime and torch run the same float32 network with other operation orders, so their
            # difference is held to twice that measured level, and the result says so
            onnx_tolerance = max(tolerance, 2.0 * res.float32_max_abs_diff / max(res.output_scale, 1e-30))
            res.onnx_tolerance = onnx_tolerance
        try:
            res.onnx_max_abs_diff = onnx_parity(pruned, input_shape, inputs[:1], onnx_tolerance)
            res.stages["onnx"] = "ok"
        except Exception as exc:  # noqa: BLE001
            res.stages["onnx"] = _err(exc)
        res.seconds["onnx"] = time.perf_counter() - t
    return res


def check_parts(model: nn.Module, res: CheckResult, *, ratio: float, seed: int, onnx: bool, tolerance: float,
                keep_weights: bool) -> CheckResult:
    """``check`` for a model whose top level does not trace (a detector's Python control flow over
    image lists and boxes): its largest traceable parts are pruned at random and proven one by one
    (:func:`~bmrs_surgery.graph.partial.prune_parts`), each exported to ONNX; then the whole model,
    its own control flow around the pruned parts, is run on two random images and its outputs
    (boxes, scores, labels) compared with the gated model's. ``res`` holds the top level's trace
    error; without a traceable part it is returned as it is."""
    from .graph.partial import compare_whole, confident_detector, positional_inputs, prune_parts

    top_error = res.stages["trace"]
    t = time.perf_counter()
    if not keep_weights:
        model = confident_detector(model)
    gen = torch.Generator().manual_seed(check_seed(seed) + 1)
    frames = positional_inputs(model)  # RAFT takes two frames

    def image():
        return torch.rand((1,) + tuple(res.input_shape[1:]), generator=gen)

    images = [image() if frames == 1 else tuple(image() for _ in range(frames)) for _ in range(2)]
    try:
        pruned, reference, parts = prune_parts(model, images[0], ratio=ratio, seed=check_seed(seed),
                                               tolerance=tolerance, onnx=onnx)
    except Exception:  # noqa: BLE001 - the model does not run on an image batch either: the trace error stands
        return res
    if not parts:
        return res
    res.tracer = "partial"
    res.stages = {"trace": "ok"}
    res.opaque = [f"top level: {top_error if len(top_error) <= 120 else top_error[:117] + '...'}"]
    res.parts = [p.__dict__ for p in parts]
    res.groups = len(parts)
    res.params_after = parameter_count(pruned)
    res.reach = sum((p.reach or 0.0) * p.params_before for p in parts) / max(res.params_before, 1)
    failed = [p for p in parts if not p.ok]
    res.stages["parts"] = "ok" if not failed else "; ".join(
        f"{p.name}: {next((v for v in p.stages.values() if v != 'ok'), 'failed')}" for p in failed)[:300]
    res.max_abs_diff = max((p.max_abs_diff or 0.0 for p in parts), default=None)
    if onnx:
        res.onnx_max_abs_diff = max((p.onnx_max_abs_diff or 0.0 for p in parts), default=None)
    try:
        proof, float32_diff = compare_whole(reference, pruned, images, tolerance)
        res.output_scale = proof.scale
        if float32_diff is not None:  # float32 rounding reordered ranked boxes: compared again in float64
            res.whole_proof_dtype, res.whole_float32_max_abs_diff = "float64", float32_diff
        res.stages["whole"] = "ok" if proof.ok else (
            f"outputs differ by {proof.max_abs_diff:.3g} (scale {proof.scale:.3g}) with the pruned parts in place")
    except Exception as exc:  # noqa: BLE001
        res.stages["whole"] = f"the model with its pruned parts fails to run: {_err(exc)}"
    res.seconds["parts"] = time.perf_counter() - t
    return res
