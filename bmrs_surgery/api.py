"""The API for one's own training loop, in one place (a facade: nothing inside the package
imports it; each name lives in the module that owns it).

    gated = bmrs_surgery.attach_gates(model, example_input)
    loss = task_loss + bmrs_surgery.kl_term(gated, num_train)   # every step
    result = bmrs_surgery.prune(gated)                          # BMRS_U-8; once, or every few epochs
    small = bmrs_surgery.pruned_network(gated)                  # the plain smaller network

``attach_gates`` returns a :class:`GatedModel` wrapping ``model``: ``gated.model`` is the network
(with forward pre-hooks that scale the inputs of the layers reading each group's channels, so
``model`` itself is gated too) and ``gated.bmrs_gates`` holds every gate's posterior parameters.
``gated.parameters()`` has both, so one optimizer trains weights and gates.

Without labels (text for an encoder without a head), the task loss is distillation to the original
model's outputs (:mod:`distill`: the rule for which outputs, the vMF or soft-target loss):

    teacher = bmrs_surgery.api.OutputDistiller(model, device)    # before attach_gates
    loss = teacher.loss(gated(**batch), batch) / batch_size + bmrs_surgery.kl_term(gated, num_train)
"""

from .criteria import PruneResult, apply_decision, criterion_for, decision, prune, scores
from .distill import OutputDistiller, mean_cosine, model_output, outputs_on, vmf_nll
from .gated import (
    KL_WEIGHTINGS,
    GatedModel,
    analysis_of,
    attach_gates,
    detach_gates,
    gate_bank,
    gates_removed,
    has_gate_hooks,
    has_gates,
    kl_term,
    network,
    remove_gate_hooks,
    unmask,
)
from .surgery import pruned_network
from .verify import prove

__all__ = [
    "KL_WEIGHTINGS", "GatedModel", "OutputDistiller", "PruneResult", "analysis_of", "apply_decision", "attach_gates",
    "criterion_for", "decision", "detach_gates", "gate_bank", "gates_removed", "has_gate_hooks", "has_gates", "kl_term",
    "mean_cosine", "model_output", "network", "outputs_on", "prove", "prune", "pruned_network", "remove_gate_hooks",
    "scores", "unmask", "vmf_nll",
]
