"""Fine-tuning that suits a pretrained network: distillation from its own outputs, a cosine schedule.

``--distill``: the loss on each batch is ``(1 - w) * cross-entropy(labels) + w * T^2 *
KL(softmax(teacher / T) || softmax(student / T))`` (Hinton et al.'s soft targets), where the teacher
is the original network before any gate or pruning, frozen in eval mode, ``T`` =
``defaults.DISTILL_TEMPERATURE`` and ``w`` = ``defaults.DISTILL_WEIGHT``. The teacher's logits are
computed in float32 without gradients on the same batch the student sees.

Token data without labels (:class:`OutputDistiller`, made by the pipeline without ``--distill``):
the likelihood is the original network's outputs alone, the teacher as above. What "the outputs"
are (:func:`model_output`), in this order:

1. a tensor the model returns: an embedding, (batch, features) as it is, or (batch, sequence,
   hidden) mean-pooled over the ``attention_mask`` input (over every position without one);
2. else the output's ``logits``, (batch, classes): class scores;
3. else its ``last_hidden_state``, mean-pooled as in 1: a sentence embedding as sentence-transformers
   makes it for all-MiniLM-L6-v2 and its kind (a ``BertModel`` without a head). ``pooler_output``
   is not used: BERT's pooler was trained for next-sentence prediction, not as an embedding.

Class scores are matched per example by the soft-target term above (w = 1): they define a
categorical distribution, whose negative log-likelihood under the teacher's probabilities is that
KL plus a constant, in nats per example like the labelled cross entropy it replaces; a cosine of
logits would see their scale and shift, which softmax does not. Embeddings are matched per example
by ``kappa * (1 - cos(student, teacher))``, the negative log-likelihood (up to a constant) of a von
Mises-Fisher density ``exp(kappa * cos)`` around the teacher's direction, ``kappa`` =
``defaults.DISTILL_KAPPA`` (as ``benchmarks/minilm.py`` fits MiniLM). Cosines are computed in float64,
the vectors normalised with an eps, so a zero vector has cosine 0 (loss kappa), never NaN. Like the
cross entropy, the loss is summed over the batch and divided by its size in fit.py: the data term
is the mean per-example NLL, next to the KL term as the ELBO (per example) has it.

The quality reported without labels is :func:`mean_cosine`: the mean cosine of a model's outputs to
the original's on the test split (class scores compared as the logit vectors).

``--lr-schedule cosine``: within each phase (fitting, then fine-tuning) the learning rates fall from
their set values to 0 along half a cosine, step by step; a function of (epoch, step) only, so a
resumed fit continues on the same curve.
"""

from __future__ import annotations

import copy
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from . import defaults
from .errors import DataError

SCHEDULES = ("constant", "cosine")
LOGITS, EMBEDDING = "logits", "embedding"  # the two kinds of output model_output finds
ATTENTION_MASK = "attention_mask"  # the named input mean pooling weights the positions by
NORM_EPS = 1e-12  # a vector is divided by max(|v|, NORM_EPS): a zero vector stays zero
EVAL_BATCH = 256  # examples per forward pass when measuring outputs on a split


class Distiller:
    """The distillation loss against a frozen copy of the original network."""

    def __init__(self, teacher: nn.Module, device, temperature: float = defaults.DISTILL_TEMPERATURE,
                 weight: float = defaults.DISTILL_WEIGHT):
        self.teacher = frozen_copy(teacher, device)
        self.temperature = float(temperature)
        self.weight = float(weight)

    def loss(self, out: torch.Tensor, y: torch.Tensor, x) -> torch.Tensor:
        """Summed over the batch (the caller scales it, as it does the plain cross-entropy); ``x`` is
        the batch the student saw: a tensor, or a dict of named inputs (token data)."""
        from .fit import scores

        student = out.float()
        with torch.no_grad():
            target = scores(self.teacher, x).float()
        ce = F.cross_entropy(student, y, reduction="sum")
        kd = soft_target_nll(student, target, self.temperature).sum()
        return (1.0 - self.weight) * ce + self.weight * kd


def frozen_copy(model: nn.Module, device) -> nn.Module:
    """A copy of ``model`` on ``device``, in eval mode, no parameter requiring gradients."""
    copied = copy.deepcopy(model).to(device).eval()
    for p in copied.parameters():
        p.requires_grad_(False)
    return copied


def forward(model: nn.Module, x):
    """The model's raw output on a batch: one tensor as the argument, or named inputs as keyword arguments."""
    return model(**x) if isinstance(x, dict) else model(x)


def attention_mask(x) -> torch.Tensor | None:
    """The batch's attention mask (named inputs), or None."""
    return x.get(ATTENTION_MASK) if isinstance(x, dict) else None


def _wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float64 (float32 on MPS, which has no float64)."""
    return t.to(torch.float32 if t.device.type == "mps" else torch.float64)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """(batch, sequence, hidden) -> (batch, hidden) in float64: the mean over the positions ``mask``
    (batch, sequence) keeps, over every position without a mask; a row the mask keeps nothing of
    is the zero vector."""
    h = _wide(hidden)
    if mask is None:
        return h.mean(1)
    m = mask.to(h.dtype).unsqueeze(-1)
    return (h * m).sum(1) / m.sum(1).clamp(min=1e-9)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The cosine of each row of ``a`` with the same row of ``b`` (batch, dim), in float64; a zero
    row has cosine 0 with anything (and a finite gradient)."""
    return (F.normalize(_wide(a), dim=-1, eps=NORM_EPS) * F.normalize(_wide(b), dim=-1, eps=NORM_EPS)).sum(-1)


def vmf_nll(student: torch.Tensor, teacher: torch.Tensor, kappa: float = defaults.DISTILL_KAPPA) -> torch.Tensor:
    """``kappa * (1 - cos)`` per example (batch,), float64: the negative log-likelihood of a von
    Mises-Fisher density ``exp(kappa * cos)`` around the teacher's direction, up to a constant."""
    return float(kappa) * (1.0 - cosine(student, teacher))


def soft_target_nll(student: torch.Tensor, teacher: torch.Tensor,
                    temperature: float = defaults.DISTILL_TEMPERATURE) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))`` per example (batch,): the soft
    targets of class scores (batch, classes), in the dtype given."""
    t = float(temperature)
    return F.kl_div(F.log_softmax(student / t, dim=1), F.log_softmax(teacher / t, dim=1), reduction="none",
                    log_target=True).sum(1) * (t * t)


def output_nll(kind: str, student: torch.Tensor, teacher: torch.Tensor, *, kappa: float = defaults.DISTILL_KAPPA,
               temperature: float = defaults.DISTILL_TEMPERATURE) -> torch.Tensor:
    """The per-example loss (batch,) of the student's outputs against the teacher's, for outputs of
    ``kind`` (:func:`model_output`): soft targets for logits, the vMF term for embeddings."""
    if kind == LOGITS:
        return soft_target_nll(_wide(student), _wide(teacher), temperature)
    return vmf_nll(student, teacher, kappa)


def _field(out, name: str):
    got = getattr(out, name, None)
    if got is None and isinstance(out, dict):
        got = out.get(name)
    return got if isinstance(got, torch.Tensor) else None


class Output(NamedTuple):
    """What a model's raw output is compared by without labels: ``kind`` (LOGITS or EMBEDDING),
    ``value`` (batch, dim) and ``source``, in words (for the report)."""

    kind: str
    value: torch.Tensor
    source: str


def _pooled(t: torch.Tensor, mask: torch.Tensor | None, what: str) -> torch.Tensor:
    if t.dim() == 2:
        return t
    if t.dim() != 3:
        raise DataError(f"{what} has shape {tuple(t.shape)}: without labels the model's output must be (batch, "
                        "features) or (batch, sequence, hidden)", param="data")
    if mask is not None and tuple(mask.shape) != tuple(t.shape[:2]):
        raise DataError(f"{what} has shape {tuple(t.shape)} but '{ATTENTION_MASK}' {tuple(mask.shape)}: "
                        "cannot mean-pool it over the attention mask", param="data")
    return mean_pool(t, mask)


def _pooling(t: torch.Tensor, mask: torch.Tensor | None) -> str:
    if t.dim() != 3:
        return ""
    return f", mean-pooled over {ATTENTION_MASK}" if mask is not None else ", mean-pooled over every position"


def model_output(out, mask: torch.Tensor | None = None) -> Output:
    """What a model's raw output ``out`` is compared by without labels (see the module docstring for
    the rule), ``mask`` being the batch's attention mask; a :class:`DataError` with one line when
    the output has nothing usable."""
    if isinstance(out, torch.Tensor):
        return Output(EMBEDDING, _pooled(out, mask, "the model's output"), "the output tensor" + _pooling(out, mask))
    logits = _field(out, "logits")
    if logits is not None:
        if logits.dim() != 2:
            raise DataError(f"the model's logits have shape {tuple(logits.shape)}: without labels, logits must be "
                            "(batch, classes); for a model with a language-model head, give its base model",
                            param="data")
        return Output(LOGITS, logits, "logits")
    hidden = _field(out, "last_hidden_state")
    if hidden is not None:
        if hidden.dim() != 3:
            raise DataError(f"the model's last_hidden_state has shape {tuple(hidden.shape)}, expected (batch, "
                            "sequence, hidden)", param="data")
        return Output(EMBEDDING, _pooled(hidden, mask, "the model's last_hidden_state"),
                      "last_hidden_state" + _pooling(hidden, mask))
    raise DataError(f"the model's output ({type(out).__name__}) has nothing to distil to without labels: it must be "
                    "a tensor, or have logits or last_hidden_state", param="data")


class OutputDistiller:
    """The likelihood of data without labels: the student's outputs against those of a frozen copy
    of the original network on the same batch (see the module docstring)."""

    def __init__(self, teacher: nn.Module, device, kappa: float = defaults.DISTILL_KAPPA,
                 temperature: float = defaults.DISTILL_TEMPERATURE):
        self.teacher = frozen_copy(teacher, device)
        self.kappa = float(kappa)
        self.temperature = float(temperature)

    def loss(self, out, x) -> torch.Tensor:
        """Summed over the batch (the caller scales it, as it does the cross entropy); ``out`` is the
        student's raw output on the batch ``x``."""
        mask = attention_mask(x)
        student = model_output(out, mask)
        with torch.no_grad():
            target = model_output(forward(self.teacher, x), mask).value
        return output_nll(student.kind, student.value, target, kappa=self.kappa, temperature=self.temperature).sum()


@torch.no_grad()
def outputs_on(model: nn.Module, dataset, device: str = "cpu", batch_size: int = EVAL_BATCH) -> torch.Tensor:
    """The model's outputs (:func:`model_output`) on every example of ``dataset`` (named inputs), in
    order, in eval mode, as one (N, dim) float64 tensor on the CPU; restores the training flags."""
    from .data import split_batches

    if len(dataset) == 0:
        return torch.zeros((0, 0), dtype=torch.float64)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        rows = [_wide(model_output(forward(model, x), attention_mask(x)).value).cpu()
                for x, _ in split_batches(dataset, torch.arange(len(dataset)).split(batch_size), device)]
    finally:
        for m, mode in modes:
            m.training = mode
    return torch.cat(rows)


def mean_cosine(model: nn.Module, dataset, reference: torch.Tensor, device: str = "cpu") -> float:
    """The mean over the examples of ``dataset`` of the cosine of ``model``'s outputs with the rows
    of ``reference`` (the original model's :func:`outputs_on` the same examples); NaN for no examples."""
    if len(dataset) == 0:
        return float("nan")
    return float(cosine(outputs_on(model, dataset, device), reference).mean())


def likelihood_text(kind: str, kappa: float = defaults.DISTILL_KAPPA,
                    temperature: float = defaults.DISTILL_TEMPERATURE) -> str:
    """The likelihood of outputs of ``kind``, in words (for the report)."""
    if kind == LOGITS:
        return f"soft targets: T^2 KL(softmax(original / T) || softmax(model / T)) per example, T = {temperature:g}"
    return f"von Mises-Fisher: kappa * (1 - cos(model, original)) per example, kappa = {kappa:g}"


def cosine_factor(epoch: int, step: int, steps: int, phase_start: int, phase_epochs: int) -> float:
    """The learning-rate factor at ``step`` of ``epoch``: 1 at the phase's start, 0 at its end."""
    if phase_epochs <= 0:
        return 1.0
    progress = (epoch - phase_start + step / max(steps, 1)) / phase_epochs
    return 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
