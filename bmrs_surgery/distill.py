"""Fine-tuning that suits a pretrained network: distillation from its own logits, a cosine schedule.

``--distill``: the loss on each batch is ``(1 - w) * cross-entropy(labels) + w * T^2 *
KL(softmax(teacher / T) || softmax(student / T))`` (Hinton et al.'s soft targets), where the teacher
is the original network before any gate or pruning, frozen in eval mode, ``T`` =
``defaults.DISTILL_TEMPERATURE`` and ``w`` = ``defaults.DISTILL_WEIGHT``. The teacher's logits are
computed in float32 without gradients on the same batch the student sees.

``--lr-schedule cosine``: within each phase (fitting, then fine-tuning) the learning rates fall from
their set values to 0 along half a cosine, step by step; a function of (epoch, step) only, so a
resumed fit continues on the same curve.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from . import defaults

SCHEDULES = ("constant", "cosine")


class Distiller:
    """The distillation loss against a frozen copy of the original network."""

    def __init__(self, teacher: nn.Module, device, temperature: float = defaults.DISTILL_TEMPERATURE,
                 weight: float = defaults.DISTILL_WEIGHT):
        self.teacher = copy.deepcopy(teacher).to(device).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.temperature = float(temperature)
        self.weight = float(weight)

    def loss(self, out: torch.Tensor, y: torch.Tensor, x) -> torch.Tensor:
        """Summed over the batch (the caller scales it, as it does the plain cross-entropy); ``x`` is
        the batch the student saw: a tensor, or a dict of named inputs (token data)."""
        from .fit import scores

        student = out.float()
        with torch.no_grad():
            target = scores(self.teacher, x).float()
        t = self.temperature
        ce = F.cross_entropy(student, y, reduction="sum")
        kd = F.kl_div(F.log_softmax(student / t, dim=1), F.log_softmax(target / t, dim=1), reduction="sum",
                      log_target=True) * (t * t)
        return (1.0 - self.weight) * ce + self.weight * kd


def cosine_factor(epoch: int, step: int, steps: int, phase_start: int, phase_epochs: int) -> float:
    """The learning-rate factor at ``step`` of ``epoch``: 1 at the phase's start, 0 at its end."""
    if phase_epochs <= 0:
        return 1.0
    progress = (epoch - phase_start + step / max(steps, 1)) / phase_epochs
    return 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
