"""bmrs-surgery: Bayesian Model Reduction for Structured pruning of PyTorch networks."""

from .api import (
    GatedModel,
    PruneResult,
    apply_decision,
    attach_gates,
    decision,
    detach_gates,
    gate_bank,
    has_gates,
    kl_term,
    prune,
    scores,
    unmask,
)
from .bmrs import delta_f, expected_theta, kl_divergence, snr, variance_theta
from .errors import BmrsError
from .gates import GateBank, GateSite
from .surgery import pruned_network
from .verify import prove

__version__ = "0.1.0"

__all__ = [
    "BmrsError", "GateBank", "GatedModel", "GateSite", "PruneResult", "apply_decision", "attach_gates", "decision",
    "delta_f", "detach_gates", "expected_theta", "gate_bank", "has_gates", "kl_divergence", "kl_term",
    "prune", "pruned_network", "prove", "scores", "snr", "unmask", "variance_theta",
]
