"""``--round-to auto``: each group's width chosen by the latency this machine measures.

For every group, the layers that write it (convolutions and linear layers whose output channels it
owns) and read it (whose input channels it owns) are timed in ONNX Runtime, on this machine, at
candidate widths: the next multiples of 8, 16 and 32 channels at or above the number of structures
BMRS keeps, ``k`` (``k`` itself only when it is a multiple of 8 channels or the group's full size:
see :data:`ALIGN`). Each layer is one ONNX node (``Conv`` or ``Gemm``) built with the layer's own
kernel, stride, padding, groups and input size, the group's dimension at the candidate width and
the layer's other dimensions as in the original network; the group's latency at a width is the sum
over its layers, at every batch size asked for, each relative to the narrowest candidate. The
width with the lowest latency wins; a wider one than the narrowest only when it is measurably
faster (by more than :data:`MARGIN`). Structures are never dropped: a group only gains its
best-scored pruned structures. A group with a layer of another kind keeps width ``k``.

Timings are cached by layer signature in a :class:`LatencyTable` (``latency_table.json`` in
``--out``), tagged with the machine, the ONNX Runtime version and the thread count, and reused by
later runs on the same machine.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

TABLE_NAME = "latency_table.json"
TABLE_FORMAT = "bmrs-surgery/latency-table/1"
MULTIPLES = (8, 16, 32)
# ONNX Runtime's x86 convolutions run in a blocked layout (NCHWc, 8 or 16 channels a block): a layer
# whose channels are not a multiple of the block drops out of it, with layout conversions around it
# that a layer timed alone does not show (benchmarks/results/latency_aware/: exact widths 1.47 and
# 1.50 latency/MACs on ResNet-18 at batch 1 and 32, widths rounded to 8: 1.32 and 1.07). So a width
# that is not a multiple of ALIGN channels is no candidate (unless it is the group's full size).
ALIGN = 8
MARGIN = 0.03  # a wider width must be this much faster than the narrowest (timing noise is about 1-3%)
WARMUP, RUNS, ROUNDS = 1, 3, 3


def machine_tag(threads: int) -> dict:
    import onnxruntime as ort

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "onnxruntime": ort.__version__, "threads": threads}


class LatencyTable:
    """Median milliseconds per layer signature, for one machine, ORT version and thread count."""

    def __init__(self, threads: int = 0, path: Path | None = None):
        self.threads = threads
        self.tag = machine_tag(threads)
        self.entries: dict[str, float] = {}
        self.reused = 0
        self.measured = 0
        if path is not None and Path(path).is_file():
            try:
                doc = json.loads(Path(path).read_text())
            except (OSError, ValueError):
                doc = None
            if isinstance(doc, dict) and doc.get("format") == TABLE_FORMAT and doc.get("machine") == self.tag:
                self.entries = {k: float(v) for k, v in doc.get("entries", {}).items()
                                if isinstance(v, (int, float)) and math.isfinite(v) and v > 0}

    def to_bytes(self) -> bytes:
        doc = {"format": TABLE_FORMAT, "machine": self.tag, "entries": dict(sorted(self.entries.items()))}
        return (json.dumps(doc, indent=1) + "\n").encode()

    def measure(self, layers: list[dict]) -> list[float]:
        """Milliseconds of each layer config (from the table, or timed now, interleaved)."""
        todo = [c for c in dict.fromkeys(signature(c) for c in layers) if c not in self.entries]
        self.reused += len(layers) - len(todo)
        if todo:
            by_sig = {signature(c): c for c in layers}
            for sig, ms in zip(todo, _time_layers([by_sig[s] for s in todo], self.threads)):
                self.entries[sig] = ms
            self.measured += len(todo)
        return [self.entries[signature(c)] for c in layers]


def signature(cfg: dict) -> str:
    return json.dumps(cfg, sort_keys=True, separators=(",", ":"))


# ------------------------------------------------------------------------------------------------
# One layer as one ONNX node, timed in ONNX Runtime
# ------------------------------------------------------------------------------------------------


def _onnx_layer(cfg: dict) -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    b = cfg["batch"]
    if cfg["op"] == "conv":
        cin, cout, g = cfg["in"], cfg["out"], cfg["groups"]
        k = cfg["kernel"]
        w = rng.standard_normal((cout, cin // g, *k)).astype(np.float32) * 0.05
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [b, cin, *cfg["spatial"]])
        node = helper.make_node("Conv", ["x", "w", "b"], ["y"], kernel_shape=list(k), strides=cfg["stride"],
                                pads=list(cfg["padding"]) * 2, dilations=cfg["dilation"], group=g)
        bias = np.zeros(cout, dtype=np.float32)
    else:
        cin, cout = cfg["in"], cfg["out"]
        w = rng.standard_normal((cout, cin)).astype(np.float32) * 0.05
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [b * cfg["rows"], cin])
        node = helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)
        bias = np.zeros(cout, dtype=np.float32)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph([node], "layer", [x], [y], [numpy_helper.from_array(w, "w"),
                                                           numpy_helper.from_array(bias, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, 9)
    return model.SerializeToString()


def _session(data: bytes, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if threads > 0:
        opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def _time_layers(cfgs: list[dict], threads: int) -> list[float]:
    """Median ms of each config: ROUNDS rounds, each timing every config RUNS times in turn."""
    sessions, feeds = [], []
    for cfg in cfgs:
        sessions.append(_session(_onnx_layer(cfg), threads))
        shape = [d if isinstance(d, int) else 1 for d in sessions[-1].get_inputs()[0].shape]
        feeds.append({"x": np.random.default_rng(1).standard_normal(shape).astype(np.float32)})
    for s, f in zip(sessions, feeds):
        for _ in range(WARMUP):
            s.run(None, f)
    samples: list[list[float]] = [[] for _ in cfgs]
    for _ in range(ROUNDS):
        for i, (s, f) in enumerate(zip(sessions, feeds)):
            for _ in range(RUNS):
                t0 = time.perf_counter()
                s.run(None, f)
                samples[i].append((time.perf_counter() - t0) * 1e3)
    return [statistics.median(v) for v in samples]


# ------------------------------------------------------------------------------------------------
# The layers of a group, at a width
# ------------------------------------------------------------------------------------------------


def input_shapes(net: nn.Module, example) -> dict[str, tuple[int, ...]]:
    """The input shape of every convolution and linear layer on ``example`` (a tensor, or a dict of
    named inputs)."""
    from .inputs import call

    shapes: dict[str, tuple[int, ...]] = {}

    def record(name):
        def hook(mod, args):
            shapes.setdefault(name, tuple(args[0].shape))  # returns None: the input is left as it is
        return hook

    hooks = [m.register_forward_pre_hook(record(name))
             for name, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            call(net.eval(), example)
    finally:
        for h in hooks:
            h.remove()
    return shapes


def group_layers(net: nn.Module, group, shapes: dict) -> list[tuple[dict, str, int]] | None:
    """(layer config at the original widths, which side the group owns, its channels there) for
    every weighted layer of ``group``; None when one is not a 2-D convolution or linear layer."""
    sides: dict[str, dict] = {}
    for slot in group.slots:
        if slot.role not in ("out", "in") or not slot.target.endswith(".weight"):
            continue
        try:
            mod = net.get_submodule(slot.module)
        except AttributeError:
            return None
        if not isinstance(mod, (nn.Conv2d, nn.Linear)) or slot.module not in shapes:
            return None
        sides.setdefault(slot.module, {})[slot.role] = int((np.asarray(slot.index) >= 0).sum())
    layers = []
    for name, owned in sides.items():
        mod = net.get_submodule(name)
        shape = shapes[name]
        if isinstance(mod, nn.Conv2d):
            if isinstance(mod.padding, str) or mod.padding_mode != "zeros":
                return None
            cfg = {"op": "conv", "in": mod.in_channels, "out": mod.out_channels, "groups": mod.groups,
                   "kernel": list(mod.kernel_size), "stride": list(mod.stride), "padding": list(mod.padding),
                   "dilation": list(mod.dilation), "spatial": list(shape[2:])}
        else:
            cfg = {"op": "linear", "in": mod.in_features, "out": mod.out_features,
                   "rows": int(math.prod(shape[1:-1])) if len(shape) > 2 else 1}
        layers.append((cfg, owned))
    return layers or None


def at_width(cfg: dict, owned: dict, channels: int, batch: int) -> dict:
    """``cfg`` with the group's dimensions at ``channels`` (a depthwise convolution keeps
    groups = in = out)."""
    c = dict(cfg, batch=batch)
    depthwise = cfg["op"] == "conv" and cfg["groups"] == cfg["in"] == cfg["out"] and cfg["groups"] > 1
    if "out" in owned:
        c["out"] = cfg["out"] - owned["out"] + channels
    if "in" in owned:
        c["in"] = cfg["in"] - owned["in"] + channels
    if depthwise:
        c["in"] = c["out"] = c["groups"] = channels if "out" in owned else c["in"]
    elif c["op"] == "conv" and c["groups"] > 1 and (c["in"] % c["groups"] or c["out"] % c["groups"]):
        return {}  # a grouped convolution's width must stay a multiple of its groups
    return c


def candidates(kept: int, size: int, per_structure: int) -> list[int]:
    """Widths (in structures) to try: the next multiples of :data:`MULTIPLES` channels at or above
    ``kept`` (and ``kept`` itself when it is a multiple of :data:`ALIGN` channels or the full size)."""
    out = {kept} if (kept * per_structure) % ALIGN == 0 or kept == size else set()
    for m in MULTIPLES:
        step = m // math.gcd(per_structure, m)
        out.add(min(size, math.ceil(kept / step) * step))
    return sorted(out)


def choose_widths(net: nn.Module, bank, keep: torch.Tensor, example: torch.Tensor, table: LatencyTable,
                  batches: tuple[int, ...] = (1, 32)) -> dict[str, dict]:
    """Per group: the widths tried, their relative latencies and the width chosen."""
    shapes = input_shapes(net, example)
    result = {}
    for i, group in enumerate(bank.groups):
        k = int(keep[bank.slice_of(i)].sum())
        layers = group_layers(net, group, shapes)
        c = max(1, int(getattr(group, "channels_per_structure", 1) or 1))
        widths = candidates(k, group.size, c)
        if layers is None:
            result[group.name] = {"kept": k, "chosen": k, "why": "no layer to time"}
            continue
        if len(widths) == 1:
            result[group.name] = {"kept": k, "chosen": widths[0], "why": "one width"}
            continue
        cost = {}
        for w in widths:
            cfgs = [at_width(cfg, owned, w * c, b) for cfg, owned in layers for b in batches]
            if any(not x for x in cfgs):
                continue
            ms = table.measure(cfgs)
            per_batch = [sum(ms[j::len(batches)]) for j in range(len(batches))]
            cost[w] = per_batch
        if not cost:
            result[group.name] = {"kept": k, "chosen": k, "why": "no width valid for a grouped layer"}
            continue
        base = min(cost)  # the narrowest candidate: a wider one must be measurably faster
        rel = {w: sum(v / max(b0, 1e-9) for v, b0 in zip(cost[w], cost[base])) / len(batches) for w in cost}
        best = min(rel, key=lambda w: (rel[w], w))
        chosen = best if rel[best] < 1.0 - MARGIN else base
        result[group.name] = {"kept": k, "chosen": chosen, "relative_latency": {str(w): round(r, 4) for w, r in rel.items()},
                              "ms": {str(w): [round(x, 5) for x in v] for w, v in cost.items()}}
    return result


def widen(bank, keep: torch.Tensor, score: torch.Tensor, widths: dict[str, int]) -> torch.Tensor:
    """``keep`` with each group grown to its width by its best-scored (lowest) pruned structures."""
    keep = keep.bool().clone().cpu()
    score = score.double().cpu()
    for i, group in enumerate(bank.groups):
        sl = bank.slice_of(i)
        k = keep[sl]
        missing = widths.get(group.name, int(k.sum())) - int(k.sum())
        if missing > 0:
            pruned = torch.nonzero(~k).flatten()
            k[pruned[torch.argsort(score[sl][pruned], stable=True)[:missing]]] = True
            keep[sl] = k
    return keep


def round_auto(gated, keep: torch.Tensor, score: torch.Tensor, example: torch.Tensor, table: LatencyTable,
               batches: tuple[int, ...] = (1, 32)) -> tuple[torch.Tensor, dict]:
    """The keep-mask with latency-chosen widths (``keep`` must already be valid) and the choices."""
    from .deploy import plain_network
    from .gated import gate_bank

    bank = gate_bank(gated)
    choices = choose_widths(plain_network(gated), bank, keep, example, table, batches)
    return widen(bank, keep, score, {n: c["chosen"] for n, c in choices.items()}), choices
