"""After the decision: surgery, proof, ONNX export, ONNX Runtime parity, counting, benchmark.

``deploy(gated, keep, input_shape)`` turns a gated model and its keep-mask into a
:class:`Deployment`: the pruned plain network, its ONNX file, the proof that both compute what the
gated model computes, parameter and MAC counts (Torch-Pruning's ``count_ops_and_params``, which
counts multiply-accumulates of convolutions, linear layers and attention matmuls), and an ONNX
Runtime comparison of original and pruned network. Nothing here writes files.
"""

from __future__ import annotations

import contextlib
import copy
import io
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import defaults
from .errors import SurgeryError, first_line
from .export import onnx_bytes, verified_onnx
from .gated import analysis_of, gate_bank, network, remove_gate_hooks
from .surgery import parameter_count, shrink
from .verify import Proof, failing_group, nonfinite_tensor, outputs, prove, random_inputs

_FIRST = object()  # deploy(bench_example=...): the first real input (an example-inputs file)


@dataclass
class Deployment:
    pruned: nn.Module
    original: nn.Module
    proof: Proof
    onnx: bytes
    onnx_original: bytes
    exporter: str
    onnx_max_abs_diff: float
    counts: dict
    bench: dict | None


def failure_cause(proof: Proof) -> str:
    """Why ``proof`` failed, in words (its problem, or the difference against the tolerance)."""
    return proof.problem or (f"max abs diff {proof.max_abs_diff:.3g} > {proof.tolerance:g} x output scale "
                             f"{proof.scale:.3g}")


def plain_network(gated: nn.Module) -> nn.Module:
    """A copy of the gated network without its gates (the network before pruning)."""
    net = copy.deepcopy(network(gated))
    remove_gate_hooks(net)
    return net.eval()


def count(model: nn.Module, example) -> tuple[int, int]:
    """(MACs, parameters) for one example (a tensor, or a dict of named inputs), by Torch-Pruning's counter."""
    import torch_pruning as tp

    # Torch-Pruning prints a warning for keyword (named) inputs: kept off stdout (--json prints there)
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
        macs, params = tp.utils.count_ops_and_params(model.eval(), example)
    return int(macs), int(params)


def check_finite_outputs(reference: list[list[torch.Tensor]], randoms: int) -> None:
    """The gated network's outputs on the proof's inputs (the first ``randoms`` random, the rest
    test data) are finite: a NaN or an infinity there would make any proof meaningless (a
    SurgeryError naming the input, before surgery)."""
    for i, outs in enumerate(reference):
        for t in outs:
            bad = nonfinite_tensor(t)
            if bad:
                which = f"random input {i}" if i < randoms else "the test data"
                raise SurgeryError(f"the gated network's output on {which} holds {bad}: the network "
                                   "overflows or its weights are broken; nothing written")


def deploy(gated: nn.Module, keep: torch.Tensor, input_shape: tuple[int, ...],
           real_inputs: list[torch.Tensor] | None = None,
           bench_batch_sizes: tuple[int, ...] | None = defaults.BENCH_BATCH_SIZES,
           bench_runs: int = defaults.BENCH_RUNS, threads: int = defaults.THREADS,
           tolerance: float = defaults.TOLERANCE, specs: list | None = None, bench_example=_FIRST) -> Deployment:
    """``specs``: named inputs (:class:`~bmrs_surgery.inputs.InputSpec`) given to the model as
    keyword arguments, instead of one float tensor of ``input_shape``; ``real_inputs`` are then
    dicts of named tensors (an example-inputs file). The proof, the ONNX export (one input per name,
    dynamic batch and sequence axes), the counts and the benchmark all use them. ``bench_example``:
    the named tensors whose rows the benchmark feeds (default: the first of ``real_inputs``; None:
    random inputs by :func:`~bmrs_surgery.inputs.fill_for`)."""
    if specs:
        return _deploy_named(gated, keep, specs, real_inputs, bench_batch_sizes, bench_runs, threads, tolerance,
                             bench_example)
    bank = gate_bank(gated)
    example = torch.randn((1,) + tuple(input_shape[1:]))
    analysis = analysis_of(gated, example)
    with torch.no_grad():
        bank.mask.copy_(keep.to(bank.mask))
    gated.eval()
    randoms = random_inputs(input_shape)
    inputs = randoms + [x for x in (real_inputs or []) if x.numel()]
    reference = outputs(gated, inputs)
    check_finite_outputs(reference, len(randoms))
    pruned = shrink(analysis, bank, keep)
    try:
        proof = prove(gated, pruned, inputs, tolerance, reference=reference)
    except Exception as exc:  # noqa: BLE001 - the pruned network does not even run
        proof = Proof(float("inf"), 1.0, tolerance, len(inputs))
        cause = first_line(exc)
    else:
        cause = failure_cause(proof)
    if not proof.ok:
        group = failing_group(analysis, bank, keep, gated, inputs, tolerance)
        where = f" in group {group.name} ({group.kind}; layers {', '.join(group.consumers[:3])})" if group else ""
        raise SurgeryError(f"surgery changed the network's output{where}: {cause}; nothing written")
    original = plain_network(gated)
    batch2 = torch.randn((2,) + tuple(input_shape[1:]))
    return _finish(pruned, original, proof, batch2, example, inputs, bench_batch_sizes, bench_runs, threads, tolerance)


def _finish(pruned, original, proof, batch2, example, inputs, bench_batch_sizes, bench_runs, threads, tolerance,
            feeds=None) -> Deployment:
    """Export, ONNX Runtime parity, counts and the benchmark of a proved pruned network. ``feeds``:
    the benchmark's named inputs (see :func:`~bmrs_surgery.bench.benchmark`), or a function of the
    benchmark's temporary folder that makes them there."""
    data, exporter, onnx_diff = verified_onnx(pruned, batch2, inputs, tolerance)
    data_orig, _ = onnx_bytes(original, batch2, exporter)
    macs_before, params_before = count(original, example)
    macs_after, params_after = count(pruned, example)
    counts = {
        "counter": "torch_pruning.utils.count_ops_and_params",
        "params_before": params_before, "params_after": params_after,
        "macs_before": macs_before, "macs_after": macs_after,
        "params_ratio": params_after / params_before if params_before else None,
        "macs_ratio": macs_after / macs_before if macs_before else None,
        "parameters_counted_by_torch": [parameter_count(original), parameter_count(pruned)],
    }
    bench = None
    if bench_batch_sizes:
        from .bench import benchmark

        with tempfile.TemporaryDirectory(prefix="bmrs-deploy-") as tmp:
            a, b = Path(tmp) / "original.onnx", Path(tmp) / "pruned.onnx"
            a.write_bytes(data_orig)
            b.write_bytes(data)
            bench = benchmark([a, b], bench_batch_sizes, threads=threads, warmup=3, runs=bench_runs, rounds=5,
                              feeds=feeds(tmp) if callable(feeds) else feeds)
        bench["models"][0]["model"], bench["models"][1]["model"] = "original", "pruned"
        for m in bench["models"]:
            m.pop("path", None)
        for r in bench.get("ratios_vs_first", []):
            r.pop("path", None)
    return Deployment(pruned, original, proof, data, data_orig, exporter, onnx_diff, counts, bench)


def named_analysis(gated: nn.Module, example: dict):
    """The analysis behind a gated model whose network takes named inputs: re-captured with
    torch.export after loading (the analysis is not saved), and checked against the gates' groups."""
    from .errors import GatePlacementError
    from .gated import gates_removed
    from .graph.export_trace import analyse_model as analyse_traced

    inner = getattr(gated, "module", gated)
    bank = gate_bank(inner)
    if inner.analysis is None:
        with gates_removed(inner.model) as net:
            analysis = analyse_traced(net, example, tracer="export")
        if len(analysis.groups) != len(bank.groups) or not all(
                a.same_structure(b) for a, b in zip(analysis.groups, bank.groups)):
            raise GatePlacementError("the model's gates do not match its dependency graph for these inputs "
                                     "(was it edited, or gated with other inputs?)")
        bank.groups = list(analysis.groups)
        object.__setattr__(inner, "analysis", analysis)
    return inner.analysis


def _deploy_named(gated, keep, specs, real_inputs, bench_batch_sizes, bench_runs, threads, tolerance,
                  bench_example=_FIRST) -> Deployment:
    from .inputs import bench_feeds, make_inputs
    from .inputs import outputs as named_outputs
    from .verify import compare, emptied_layers

    bank = gate_bank(gated)
    net = network(gated)
    example = make_inputs(specs, net, batch=1)
    analysis = named_analysis(gated, example)
    with torch.no_grad():
        bank.mask.copy_(keep.to(bank.mask))
    gated.eval()
    randoms = [make_inputs(specs, net, batch=2, seed=1 + i) for i in range(2)]
    inputs = randoms + [x for x in (real_inputs or []) if x]
    reference = named_outputs(gated, inputs)
    check_finite_outputs(reference, len(randoms))
    pruned = shrink(analysis, bank, keep)
    try:
        proof = compare(reference, named_outputs(pruned, inputs), tolerance)
        empty = emptied_layers(pruned)
        if empty:
            proof.problem = f"layer parameter {empty[0]} was pruned to size 0"
    except Exception as exc:  # noqa: BLE001 - the pruned network does not even run
        proof = Proof(float("inf"), 1.0, tolerance, len(inputs))
        cause = first_line(exc)
    else:
        cause = failure_cause(proof)
    if not proof.ok:
        raise SurgeryError(f"surgery changed the network's output: {cause}; nothing written")
    original = plain_network(gated)
    batch2 = make_inputs(specs, net, batch=2)  # torch.export fixes a size of 1: export at batch 2
    file_example = next((x for x in real_inputs or [] if x), None) if bench_example is _FIRST else bench_example

    def feeds(folder):
        return bench_feeds(specs, net, file_example, folder)

    return _finish(pruned, original, proof, batch2, example, inputs, bench_batch_sizes, bench_runs, threads,
                   tolerance, feeds=feeds)
