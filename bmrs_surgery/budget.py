"""Budgets: prune until the pruned network's MACs, parameters or latency meet a target.

BMRS's own stop (dF >= 0) stays the default. With ``--target-macs R`` (pruned/original MACs),
``--target-params R`` (pruned/original parameters) or ``--target-latency MS`` (ONNX Runtime CPU
milliseconds at ``--target-batch B``), structures BMRS keeps are removed further in dF order (the
highest dF, the least evidence for keeping, first) until the target holds. A group's best structure
is never a candidate, so no group is emptied. The number removed is found by bisection on the
measured quantity of the final network (widths rounded as the job asks, surgery done, MACs and
parameters counted by Torch-Pruning's counter, latency timed in ONNX Runtime). When BMRS's own
stop already meets the target, its keep-mask is kept and the result says so.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import JobError

TARGETS = ("target_macs", "target_params", "target_latency")


@dataclass(frozen=True)
class Budget:
    kind: str  # "macs", "params" or "latency"
    value: float  # a ratio for macs/params, milliseconds for latency
    batch: int = 1  # latency only

    @property
    def option(self) -> str:
        return f"--target-{self.kind}"


def budget_of(job) -> Budget | None:
    """The job's budget, or None for BMRS's own stop."""
    for name in TARGETS:
        v = getattr(job, name, None)
        if v is not None:
            return Budget(name.split("_", 1)[1], float(v), int(job.target_batch))
    return None


def validate_job(job) -> None:
    """At most one target; ratios in (0, 1], latency finite and positive, batch >= 1."""
    given = [n for n in TARGETS if getattr(job, n, None) is not None]
    if len(given) > 1:
        raise JobError(f"give one target, not {len(given)} (" + ", ".join("--" + n.replace("_", "-") for n in given)
                       + ")", param=given[1])
    for name in given:
        v = getattr(job, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise JobError(f"must be a finite number > 0, got {v!r}", param=name)
        if name != "target_latency" and v > 1:
            raise JobError(f"is a ratio pruned/original in (0, 1], got {v!r}", param=name)
    b = job.target_batch
    if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= 4096:
        raise JobError(f"must be an integer 1..4096, got {b!r}", param="target_batch")


def removal_order(bank, keep: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """Indices of the structures a budget may still remove, least evidence for keeping first:
    kept by ``keep``, not the best (lowest score) structure of their group; highest score first."""
    keep = keep.bool().cpu()
    score = score.double().cpu()
    allowed = keep.clone()
    for i in range(len(bank.groups)):
        sl = bank.slice_of(i)
        kept = torch.nonzero(keep[sl]).flatten()
        if len(kept):
            best = kept[torch.argmin(score[sl][kept])]
            allowed[sl.start + int(best)] = False
    idx = torch.nonzero(allowed).flatten()
    return idx[torch.argsort(score[idx], descending=True, stable=True)]


class Meter:
    """The measured quantity of the pruned network for a keep-mask (MACs or parameter ratio,
    or milliseconds in ONNX Runtime)."""

    def __init__(self, gated, example, budget: Budget, threads: int = 0):
        from .deploy import count, plain_network
        from .gated import analysis_of, gate_bank

        self.gated, self.example, self.budget, self.threads = gated, example, budget, threads
        self.bank = gate_bank(gated)
        self.analysis = analysis_of(gated, example)
        self.macs0, self.params0 = count(plain_network(gated), example)
        self.cache: dict[bytes, dict] = {}

    def point(self, keep: torch.Tensor) -> dict:
        """MACs and parameter ratios (and latency for a latency budget) of the network for ``keep``."""
        key = keep.bool().numpy().tobytes()
        if key in self.cache:
            return self.cache[key]
        from .deploy import count
        from .surgery import shrink

        pruned = shrink(self.analysis, self.bank, keep)
        macs, params = count(pruned, self.example)
        p = {"structures_kept": int(keep.sum()), "structures": int(keep.numel()), "macs": macs, "params": params,
             "macs_ratio": macs / self.macs0 if self.macs0 else 1.0,
             "params_ratio": params / self.params0 if self.params0 else 1.0}
        if self.budget.kind == "latency":
            p["latency_ms"] = latency_ms(pruned, self.example, self.budget.batch, self.threads)
            p["latency_batch"] = self.budget.batch
        self.cache[key] = p
        return p

    def value(self, keep: torch.Tensor) -> float:
        p = self.point(keep)
        return p[{"macs": "macs_ratio", "params": "params_ratio", "latency": "latency_ms"}[self.budget.kind]]


def latency_ms(net, example, batch: int, threads: int = 0, runs: int = 15) -> float:
    """Median ONNX Runtime CPU latency of ``net`` at ``batch`` (one worker process, no torch there).
    ``example``: a tensor, or a dict of named inputs (token ids fed below the model's vocabulary)."""
    from .bench import benchmark
    from .export import onnx_bytes
    from .inputs import InputSpec, bench_feeds

    if isinstance(example, dict):
        data, _ = onnx_bytes(net.eval(), example)
        feeds = bench_feeds([InputSpec(k, v.dtype, tuple(v.shape)) for k, v in example.items()], net)
    else:
        data, _ = onnx_bytes(net.eval(), torch.randn((2,) + tuple(example.shape[1:])))
        feeds = None
    with tempfile.TemporaryDirectory(prefix="bmrs-budget-") as tmp:
        path = Path(tmp) / "candidate.onnx"
        path.write_bytes(data)
        res = benchmark([path], (batch,), threads=threads, warmup=3, runs=runs, rounds=3, feeds=feeds)
    return float(res["models"][0]["batches"][0]["median_ms"])


def meet(gated, keep: torch.Tensor, score: torch.Tensor, budget: Budget, example,
         finalise: Callable[[torch.Tensor], torch.Tensor], threads: int = 0,
         refine: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[torch.Tensor, dict]:
    """The keep-mask that meets ``budget`` (see the module doc) and what happened, for the report.

    ``keep`` is BMRS's own (valid) keep-mask, ``score`` the per-structure score where lower means
    keep (dF), ``finalise`` turns a raw keep-mask into the deployed one (no group emptied, widths
    rounded). ``refine``, if given, is a costly last step (widths by measured latency): the
    bisection runs on ``finalise`` alone, then ``refine`` is applied and, while the refined network
    misses the target, more structures are removed in the same order."""
    meter = Meter(gated, example, budget, threads)
    last = refine or (lambda k: k)
    bmrs_keep = last(finalise(keep))
    bmrs_point = meter.point(bmrs_keep)
    info = {"kind": budget.kind, "option": budget.option, "target": budget.value, "bmrs": bmrs_point}
    if budget.kind == "latency":
        info["batch"] = budget.batch
    if meter.value(bmrs_keep) <= budget.value:
        info.update(met=True, kept="bmrs", removed_beyond_bmrs=0, budget=bmrs_point,
                    note=f"BMRS's own stop already meets {budget.option} {budget.value:g}: its keep-mask is kept")
        return bmrs_keep, info
    order = removal_order(meter.bank, keep, score)

    def keep_without(k: int) -> torch.Tensor:
        k_mask = keep.bool().clone()
        k_mask[order[:k]] = False
        return finalise(k_mask)

    lo, hi = 1, len(order)  # smallest k that meets the target (the quantity falls as k grows)
    if hi == 0 or meter.value(keep_without(hi)) > budget.value:
        final = last(keep_without(hi))
        info.update(met=False, kept="budget", removed_beyond_bmrs=hi, budget=meter.point(final),
                    note=f"{budget.option} {budget.value:g} cannot be met: every group already keeps only its "
                         "best structure")
        return final, info
    while lo < hi:
        mid = (lo + hi) // 2
        if meter.value(keep_without(mid)) <= budget.value:
            hi = mid
        else:
            lo = mid + 1
    exact = lo
    final = last(keep_without(lo))
    while refine is not None and meter.value(final) > budget.value and lo < len(order):
        lo = min(len(order), lo + max(1, (len(order) - lo) // 32))  # refined widths grew: remove a little more
        final = last(keep_without(lo))
    note = f"{lo} structure(s) BMRS keeps removed in dF order to meet {budget.option} {budget.value:g}"
    if meter.value(final) > budget.value:  # the refined widths cannot meet it: the target comes first
        lo, final = exact, keep_without(exact)
        note += " (widths chosen by latency could not meet it: exact widths kept)"
    info.update(met=True, kept="budget", removed_beyond_bmrs=lo, budget=meter.point(final), note=note)
    return final, info


@contextlib.contextmanager
def on_cpu(module: torch.nn.Module):
    """``module`` on the CPU inside the block, back on its own device after it (parameters keep
    their identity, so an optimiser holding them is unaffected)."""
    tensors = list(module.parameters()) + list(module.buffers())
    device = tensors[0].device if tensors else torch.device("cpu")
    if device.type == "cpu":
        yield module
        return
    module.to("cpu")
    try:
        yield module
    finally:
        module.to(device)


class Planner:
    """From a decision to the deployed keep-mask, as the job asks: no group emptied, widths rounded
    (``round_to`` an integer, or ``"auto"``: :mod:`latency_table`), then the budget met. Called by
    the fit (before fine-tuning) and by the pipeline (the final decision); the same decision gives
    the same plan, computed once."""

    def __init__(self, job, gated, example, table_path=None):
        """``example``: one example the network is measured on (a tensor of batch 1, or a dict of
        named inputs)."""
        from .gated import gate_bank

        self.gated = gated
        self.bank = gate_bank(gated)
        self.round_to = job.round_to
        self.budget = budget_of(job)
        self.threads = job.threads
        self.example = example
        self.table = None
        if self.round_to == "auto":
            from .latency_table import LatencyTable

            self.table = LatencyTable(job.threads, table_path)
        bench = tuple(job.bench_batch_sizes)  # widths are timed at the smallest and largest batch benchmarked
        self.latency_batches = tuple(sorted({min(bench), max(bench)})) if bench else (1, 32)
        self._widths: dict[bytes, dict] = {}  # auto: the widths chosen, by the keep-mask they made
        self.keep: torch.Tensor | None = None  # the last plan made
        self.info: dict | None = None
        self.bmrs_keep: torch.Tensor | None = None
        self._plans: dict[bytes, torch.Tensor] = {}
        self._final: dict[bytes, torch.Tensor] = {}

    @property
    def active(self) -> bool:
        return self.round_to is not None or self.budget is not None

    def valid(self, keep: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        """``keep`` with no group emptied and, for an integer ``round_to``, rounded widths."""
        from .plan import plan_keep

        return plan_keep(self.bank, keep, score, self.round_to if isinstance(self.round_to, int) else None)

    def widths_by_latency(self, keep: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        """``--round-to auto``: ``keep`` (valid) with each group's width chosen by measured latency."""
        key = keep.bool().numpy().tobytes()
        if key not in self._final:
            from .latency_table import round_auto

            k, widths = round_auto(self.gated, keep, score, self.example, self.table, self.latency_batches)
            self._widths[k.numpy().tobytes()] = widths
            self._final[key] = k
        return self._final[key]

    def finalise(self, keep: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        """``keep`` valid and rounded as the job asks."""
        k = self.valid(keep, score)
        return self.widths_by_latency(k, score) if self.table is not None else k

    def __call__(self, dec):
        """The decision ``dec`` with its keep-mask planned (a new Decision). Planning measures the
        network on the CPU (MACs, parameters, ONNX Runtime): a network fitted on another device
        (``--device cuda``) is moved to the CPU for it and back afterwards."""
        from .criteria import Decision

        score = (dec.score if dec.lower_is_better else -dec.score).cpu()
        key = dec.keep.bool().cpu().numpy().tobytes()
        if key not in self._plans:
            with on_cpu(self.gated):
                self._plan(dec, score, key)
        self.keep = self._plans[key]
        return Decision(dec.criterion, dec.score, self.keep.to(dec.keep.device), dec.lower_is_better)

    def _plan(self, dec, score: torch.Tensor, key: bytes) -> None:
        self.bmrs_keep = self.finalise(dec.keep.cpu(), score)
        if self.budget is None:
            self._plans[key] = self.bmrs_keep
        else:
            refine = (lambda k: self.widths_by_latency(k, score)) if self.table is not None else None
            keep, self.info = meet(self.gated, dec.keep.cpu(), score, self.budget, self.example,
                                   lambda k: self.valid(k, score), self.threads, refine=refine)
            self._plans[key] = keep

    def report(self) -> dict:
        """What the plan did, for report.json."""
        doc: dict = {"round_to": self.round_to}
        if self.table is not None and self.keep is not None:
            doc["widths"] = self._widths.get(self.keep.numpy().tobytes())
            doc["latency_table"] = {"machine": self.table.tag, "entries_reused": self.table.reused,
                                    "entries_measured": self.table.measured, "batches": list(self.latency_batches)}
        if self.info is not None:
            doc["budget"] = self.info
        return doc


def unmet_warning(plan: dict | None) -> str | None:
    """One line for a budget the run could not meet (None when it was met, or when there was none):
    a run that did not do what was asked says so."""
    b = (plan or {}).get("budget")
    if not b or b.get("met", True):
        return None
    point = b.get("budget") or {}
    got = {"macs": f"MACs ratio {point.get('macs_ratio', float('nan')):.3f}",
           "params": f"parameter ratio {point.get('params_ratio', float('nan')):.3f}",
           "latency": f"{point.get('latency_ms', float('nan')):.3g} ms at batch {b.get('batch')}"}[b["kind"]]
    return f"Warning: {b['note']}; the outputs hold the closest network found ({got})"
