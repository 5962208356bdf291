"""ONNX export (opset 18, dynamic batch axis) and ONNX Runtime parity with torch."""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import warnings

import torch
from torch import nn

from .errors import ExportError, JobError
from .errors import first_line as _first_line
from .verify import max_abs, max_abs_diff

OPSET = 18
EXPORTERS = ("auto", "dynamo", "torchscript")
# auto's order: TorchScript first. On check's pruned models it exports 4.7 to 31 times faster than dynamo
# (median of interleaved runs, benchmarks/results/onnx_export/cpu.md) and ONNX Runtime gives the same
# outputs from both graphs; dynamo (it needs onnxscript) stays the fallback, for a model TorchScript
# cannot export or whose TorchScript graph fails the ONNX Runtime comparison (see verified_onnx).
AUTO_ORDER = ("torchscript", "dynamo")


@contextlib.contextmanager
def _quiet_logs():
    """torch.export and the ONNX exporter log failures and progress at ERROR/INFO: keep them quiet."""
    loggers = [logging.getLogger(n) for n in ("torch.export", "torch._dynamo", "torch.onnx", "torch._export",
                                              "onnxscript", "torch.fx.experimental.symbolic_shapes")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)


def _named_axes(example: dict) -> tuple[dict, dict]:
    """dynamic_shapes (dynamo) and dynamic_axes (TorchScript) for named inputs: batch on axis 0,
    sequence on axis 1 of every integer input with two axes (token ids, masks); float inputs
    (pixel values) keep their other sizes."""
    batch = torch.export.Dim("batch")
    lengths = [int(t.shape[1]) for t in example.values() if _is_sequence(t)]
    seq_names = {}  # inputs of the first input's length share "sequence" (ids and mask); others their own
    for n, t in example.items():
        if _is_sequence(t):
            seq_names[n] = "sequence" if int(t.shape[1]) == lengths[0] else f"sequence_{n}"
    dims = {name: torch.export.Dim(name) for name in set(seq_names.values())}
    shapes = {n: ({0: batch, 1: dims[seq_names[n]]} if n in seq_names else {0: batch}) for n in example}
    axes = {n: ({0: "batch", 1: seq_names[n]} if n in seq_names else {0: "batch"}) for n in example}
    return shapes, axes


def _is_sequence(t: torch.Tensor) -> bool:
    return t.ndim == 2 and not t.is_floating_point()


def _onnx_named(model: nn.Module, example: dict, kind: str) -> bytes:
    """Export a model that takes named (keyword) inputs: one ONNX input per name, dtypes kept
    (token ids stay int64), dynamic batch and sequence axes. The example needs a batch and a
    sequence of at least 2 (torch.export fixes a size of 1)."""
    shapes, axes = _named_axes(example)
    names = list(example)
    wrapped, args = _Positional(model, names).eval(), tuple(example.values())
    if kind == "dynamo":
        # forward(*tensors) is one parameter: its shapes are one tuple inside the tuple
        return _dynamo_proto(wrapped, args, input_names=names, output_names=["output"],
                             dynamic_shapes=(tuple(shapes.values()),))
    buf = io.BytesIO()
    torch.onnx.export(wrapped, args, buf, dynamo=False, opset_version=OPSET, input_names=names,
                      output_names=["output"], dynamic_axes={**axes, "output": {0: "batch", 1: "sequence"} if any(
                          _is_sequence(t) for t in example.values()) else {0: "batch"}})
    return buf.getvalue()


def _dynamo_proto(model: nn.Module, args: tuple, **kw) -> bytes:
    """torch's dynamo exporter with its graph optimiser; when the optimised graph is not a valid
    ONNX model (a node reading a value no node makes: timm's Gemma4 ViT, whose clipped linears'
    ``Clip`` bounds the optimiser drops), the unoptimised graph, which computes the same."""
    import onnx

    prog = torch.onnx.export(model, args, dynamo=True, external_data=False, verbose=False, opset_version=OPSET,
                             optimize=True, **kw)
    try:
        onnx.checker.check_model(prog.model_proto)
    except onnx.checker.ValidationError:
        prog = torch.onnx.export(model, args, dynamo=True, external_data=False, verbose=False, opset_version=OPSET,
                                 optimize=False, **kw)
    return prog.model_proto.SerializeToString()


class _Positional(nn.Module):
    """A model that takes named inputs, called with them in order; returns its first output tensor
    (a transformers model's ``last_hidden_state`` or ``logits``)."""

    def __init__(self, model: nn.Module, names: list[str]):
        super().__init__()
        self.model = model
        self.names = list(names)

    def forward(self, *tensors):
        out = self.model(**dict(zip(self.names, tensors)))
        while not isinstance(out, torch.Tensor):
            out = next(iter(out.values())) if isinstance(out, dict) else out[0]
        return out


class _OneInput(nn.Module):
    """A model called with its first input only."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)


def _one_input(model: nn.Module) -> nn.Module:
    """The model, wrapped when its forward takes more parameters than the input: TorchScript's exporter
    passes their defaults as traced values (timm's ViT, traced by torch.fx, has ``is_causal=False``,
    which scaled_dot_product_attention then refuses as a tensor)."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return model
    extra = [p for p in params[1:] if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    return _OneInput(model).eval() if extra else model


def onnx_bytes(model: nn.Module, example, exporter: str = "auto") -> tuple[bytes, str]:
    """The model as an ONNX file in memory, with a dynamic batch axis; returns (bytes, exporter used).
    ``example`` is a tensor, or a dict of named inputs (see :func:`_onnx_named`).

    ``auto`` tries the exporters in :data:`AUTO_ORDER`: torch's TorchScript exporter first (the
    faster one), its dynamo exporter if that fails.
    """
    if exporter not in EXPORTERS:
        raise JobError(f"must be one of {EXPORTERS}, got {exporter!r}", param="exporter")
    model = model.eval()
    errors = []
    order = list(AUTO_ORDER) if exporter == "auto" else [exporter]
    for kind in order:
        try:
            with warnings.catch_warnings(), torch.no_grad(), _quiet_logs():
                warnings.simplefilter("ignore")
                if isinstance(example, dict):
                    return _onnx_named(model, example, kind), kind
                if kind == "dynamo":
                    return _dynamo_proto(model, (example,), input_names=["input"], output_names=["output"],
                                         dynamic_shapes=({0: torch.export.Dim("batch")},)), kind
                buf = io.BytesIO()
                torch.onnx.export(
                    _one_input(model), (example,), buf, dynamo=False, opset_version=OPSET, input_names=["input"],
                    output_names=["output"], dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
                )
                return buf.getvalue(), kind
        except Exception as exc:  # noqa: BLE001 - exporters raise many kinds
            errors.append(f"{kind}: {_first_line(exc)}")
    raise ExportError("ONNX export failed (" + "; ".join(errors) + ")")


PROTOBUF_LIMIT = 2**31 - 2**26  # one ONNX file (protobuf) must stay under 2 GB: leave room for the graph


def needs_external_data(model: nn.Module) -> bool:
    return sum(p.numel() * p.element_size() for p in model.parameters()) > PROTOBUF_LIMIT // 2


def onnx_file(model: nn.Module, example: torch.Tensor, path) -> str:
    """Export to ``path``; weights go to ``path.data`` beside it when the model is too large for
    one protobuf (ONNX's 2 GB limit). Returns the exporter used."""
    if not needs_external_data(model):
        data, kind = onnx_bytes(model, example)
        with open(path, "wb") as f:
            f.write(data)
        return kind
    try:
        with warnings.catch_warnings(), torch.no_grad(), _quiet_logs():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model.eval(), (example,), str(path), dynamo=True, external_data=True, verbose=False,
                opset_version=OPSET, input_names=["input"], output_names=["output"],
                dynamic_shapes=({0: torch.export.Dim("batch")},), optimize=False,
            )
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"ONNX export failed (dynamo, external data: {_first_line(exc)})") from None
    return "dynamo"


def session(data: bytes | str, threads: int | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def ort_parity(model: nn.Module, data: bytes | str, inputs: list[torch.Tensor], tolerance: float = 1e-4) -> float:
    """Run ONNX model ``data`` in ONNX Runtime on ``inputs`` (and on one more batch size, to
    exercise the dynamic axis) against torch ``model``; the max abs difference, or ExportError
    beyond ``tolerance`` x the output scale."""
    sess = session(data)
    name = sess.get_inputs()[0].name
    example = inputs[0]
    if isinstance(example, dict):  # named inputs: one more batch row and one token fewer
        batches = list(inputs) + [{k: torch.cat([v, v[:1]]) for k, v in example.items()},
                                  {k: v[:, :-1] if _is_sequence(v) and v.shape[1] > 2 else v for k, v in example.items()}]
    else:
        batches = list(inputs) + [torch.cat([example, example[:1]])]
    diff, scale = 0.0, 0.0
    model = model.eval()
    with torch.no_grad():
        for x in batches:
            ref = model(**x) if isinstance(x, dict) else model(x)
            refs = _flat_outputs(ref)  # a segmentation dict's "out" and "aux", a tuple, a ModelOutput
            feed = ({i.name: x[i.name].numpy() for i in sess.get_inputs()} if isinstance(x, dict)
                    else {name: x.float().numpy()})
            try:
                outs = sess.run(None, feed)
            except Exception as exc:  # noqa: BLE001
                shape = tuple(next(iter(x.values())).shape) if isinstance(x, dict) else tuple(x.shape)
                raise ExportError(f"ONNX Runtime failed on batch {shape}: {_first_line(exc)}") from None
            if len(outs) != len(refs):  # exported through a wrapper that returns the first output only
                refs, outs = refs[:1], outs[:1]
            for ref, got in zip(refs, outs):
                if got.shape != tuple(ref.shape):
                    raise ExportError(f"ONNX Runtime output shape {got.shape} != torch {tuple(ref.shape)}")
                r = ref.float().numpy()
                diff = max(diff, max_abs_diff(torch.from_numpy(r), torch.from_numpy(got)))
                scale = max(scale, max_abs(torch.from_numpy(r)))
    if not diff <= tolerance * (scale or 1.0):
        raise ExportError(f"ONNX Runtime differs from torch by {diff:.3g} (> {tolerance:g} x output scale {scale:.3g})")
    return diff


def _flat_outputs(out) -> list[torch.Tensor]:
    """Every tensor of a model's output, in the order ONNX lists them (dict values in order)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict) or hasattr(out, "values"):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _flat_outputs(o)]
    return []


def verified_onnx(model: nn.Module, example, inputs: list, tolerance: float = 1e-4) -> tuple[bytes, str, float]:
    """Export ``model`` (``auto``) and check ONNX Runtime against torch (see :func:`ort_parity`);
    when the first exporter's graph fails that comparison (say, a size it fixed), the other exporter's
    graph is tried. Returns (bytes, exporter, max abs diff); the first failure if neither passes."""
    data, kind = onnx_bytes(model, example)
    try:
        return data, kind, ort_parity(model, data, inputs, tolerance)
    except ExportError as first:
        other = next((k for k in AUTO_ORDER if k != kind), None)
        try:
            data, kind = onnx_bytes(model, example, other)
            return data, kind, ort_parity(model, data, inputs, tolerance)
        except ExportError:
            raise first from None


def onnx_parity(model: nn.Module, input_shape, inputs: list[torch.Tensor], tolerance: float = 1e-4) -> float:
    """Export ``model`` and check ONNX Runtime against torch (see :func:`verified_onnx`)."""
    if not needs_external_data(model):
        return verified_onnx(model, inputs[0], inputs, tolerance)[2]
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory(prefix="bmrs-onnx-") as tmp:
        path = Path(tmp) / "model.onnx"
        onnx_file(model, inputs[0], path)
        return ort_parity(model, str(path), inputs, tolerance)
