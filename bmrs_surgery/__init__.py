"""bmrs-surgery: Bayesian Model Reduction for Structured pruning of PyTorch networks.

The whole job: ``bmrs_surgery.compress(bmrs_surgery.Job(model=..., data=..., out=...))``.
Your own training loop: ``attach_gates``, ``kl_term``, ``prune``, ``pruned_network`` (see
:mod:`bmrs_surgery.api`). Your own layers: :mod:`bmrs_surgery.rules`.
"""

from . import rules
from .bmrs import delta_f, expected_theta, kl_divergence, snr, variance_theta
from .criteria import PruneResult, apply_decision, decision, prune, scores
from .errors import BmrsError
from .gated import GatedModel, attach_gates, detach_gates, gate_bank, has_gates, kl_term, unmask
from .gates import GateBank
from .graph.group import Group
from .job import Job
from .pipeline import Result, compress
from .recipe import apply_recipe
from .surgery import pruned_network
from .verify import prove

__version__ = "0.1.0"

__all__ = [
    "BmrsError", "GateBank", "GatedModel", "Group", "Job", "PruneResult", "Result", "apply_decision", "apply_recipe",
    "attach_gates", "compress", "decision", "delta_f", "detach_gates", "expected_theta", "gate_bank", "has_gates",
    "kl_divergence", "kl_term", "prune", "pruned_network", "prove", "rules", "scores", "snr", "unmask",
    "variance_theta",
]
