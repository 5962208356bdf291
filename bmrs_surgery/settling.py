"""Whether the gates have settled: a record of how the decisions move while fitting.

A fit is checked every few hundred optimiser steps (:data:`~.defaults.SETTLE_CHECK_STEPS`). Each
check sees every structure's score (dF, or the configured criterion's score), its keep decision,
the KL term and the mean objective since the previous check, and computes:

* ``flipped``: the share of structures whose decision changed since the previous check;
* ``projected``: the share of kept structures whose decision would change within a horizon of
  :data:`~.defaults.SETTLE_HORIZON` times the steps done so far, if their score kept moving as it did
  over the last :data:`~.defaults.SETTLE_PATIENCE` intervals (a linear extrapolation: a structure
  whose dF climbs towards 0 is about to be pruned even though no decision flipped yet, which is
  exactly the state of a fit whose gates have not moved yet; the slope over several intervals
  averages out the step-to-step noise of the posteriors);
* ``objective_change``: the relative change of the mean objective over the same window.

Both decision measures count in points of parameter compression when the fit gives ``measure`` (it
does: what moves matters by the parameters it holds, not by the number of structures). A check is
*stable* when no more than :data:`~.defaults.SETTLE_FLIP_TOLERANCE` flipped or is projected to flip, and the objective changed by less than
:data:`~.defaults.SETTLE_OBJECTIVE_TOLERANCE`. The fit has *settled* after
:data:`~.defaults.SETTLE_PATIENCE` stable checks in a row, and not before
:data:`~.defaults.SETTLE_MIN_STEPS` steps. The functions here are pure: tensors
and numbers in, records out; the fitting loop owns the schedule.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from . import defaults


@dataclass
class SettleCheck:
    """One check of the settling signal."""

    step: int  # optimiser steps done when the check ran
    epoch: float  # epochs done (fractional within an epoch)
    kept: float  # share of structures kept by the decision
    # share of structures whose decision changed since the previous check (with ``measure``: the
    # change in parameter compression those changes make)
    flipped: float
    projected: float  # the same for the changes projected within the horizon (see the module doc)
    objective: float  # mean objective (loss + KL term) since the previous check
    objective_change: float  # relative change against the previous interval (inf at the first check)
    kl: float
    stable: bool
    compression: float | None = None  # parameter compression of the decision now (with ``measure``)


@dataclass
class SettleState:
    """What the previous checks left for the next one (saved with a resumable fit)."""

    checks: list[SettleCheck] = field(default_factory=list)
    last_keep: torch.Tensor | None = None
    last_score: torch.Tensor | None = None
    scores: list[torch.Tensor] = field(default_factory=list)  # the window's earlier scores, oldest first
    streak: int = 0  # stable checks in a row
    settled_at: int | None = None  # the step of the check that completed the streak

    @property
    def settled(self) -> bool:
        return self.settled_at is not None

    def to_state(self) -> dict:
        return {"checks": [asdict(c) for c in self.checks], "last_keep": self.last_keep,
                "last_score": self.last_score, "scores": list(self.scores), "streak": self.streak,
                "settled_at": self.settled_at}

    @classmethod
    def from_state(cls, state: dict | None) -> SettleState:
        if not state:
            return cls()
        return cls([SettleCheck(**c) for c in state["checks"]], state["last_keep"], state["last_score"],
                   list(state.get("scores", [])), int(state["streak"]), state["settled_at"])


def flipped_share(keep: torch.Tensor, last_keep: torch.Tensor | None) -> float:
    """Share of structures whose decision differs from ``last_keep`` (1.0 without a previous check:
    nothing is known to be stable yet)."""
    if last_keep is None:
        return 1.0
    return float((keep.bool() != last_keep.bool()).double().mean()) if keep.numel() else 0.0


def projected_keep(score: torch.Tensor, last_score: torch.Tensor | None, keep: torch.Tensor,
                   interval: int, horizon: int, boundary: float | None = 0.0, lower_is_better: bool = True) -> torch.Tensor:
    """The keep decisions ``horizon`` steps ahead if every kept structure's score kept its slope over
    the last ``interval`` steps (see :func:`projected_share`); pruned structures stay pruned."""
    keep = keep.bool()
    if boundary is None or last_score is None or interval <= 0 or score.numel() == 0:
        return keep.clone()
    now = score.double()
    ahead = now + (now - last_score.double()) / interval * max(horizon, 0)
    stays = (ahead < boundary) if lower_is_better else (ahead > boundary)
    return keep & (stays | ~torch.isfinite(ahead))


def projected_share(score: torch.Tensor, last_score: torch.Tensor | None, keep: torch.Tensor,
                    interval: int, horizon: int, boundary: float | None = 0.0, lower_is_better: bool = True) -> float:
    """Share of structures whose decision would flip within ``horizon`` steps if each score kept
    its slope over the last ``interval`` steps: the score crossing ``boundary`` (0 for dF; None for a
    criterion whose cut is not a fixed score, which projects nothing). Scores are compared in
    float64; a non-finite score or slope counts as not projected (the criteria refuse non-finite
    posteriors before this)."""
    if boundary is None:
        return 0.0
    if last_score is None or interval <= 0 or score.numel() == 0:
        return 1.0 if last_score is None else 0.0
    now = score.double()
    slope = (now - last_score.double()) / interval
    ahead = now + slope * max(horizon, 0)
    finite = torch.isfinite(now) & torch.isfinite(ahead)
    # the decision keeps a structure when its score is below 0 (dF < 0), or above for scores where
    # higher is better; a flip is the extrapolated score crossing to the other side
    keep_ahead = (ahead < boundary) if lower_is_better else (ahead > boundary)
    # only kept structures are projected: a pruned gate's posterior drifts towards the prior with a
    # slope that flattens (linear extrapolation overshoots it), and a real return is seen as a flip
    return float((keep.bool() & ~keep_ahead & finite).double().mean())


def relative_change(now: float, before: float | None) -> float:
    """|now - before| / max(|before|, tiny); inf when there is nothing to compare with."""
    if before is None or not (math.isfinite(now) and math.isfinite(before)):
        return math.inf
    return abs(now - before) / max(abs(before), 1e-12)


def observe(state: SettleState, *, step: int, epoch: float, score: torch.Tensor, keep: torch.Tensor,
            objective: float, kl: float, boundary: float | None = 0.0, lower_is_better: bool = True,
            patience: int = defaults.SETTLE_PATIENCE, flip_tolerance: float = defaults.SETTLE_FLIP_TOLERANCE,
            objective_tolerance: float = defaults.SETTLE_OBJECTIVE_TOLERANCE,
            horizon: float = defaults.SETTLE_HORIZON, min_steps: int = defaults.SETTLE_MIN_STEPS,
            measure=None) -> SettleCheck:
    """Record one check in ``state`` (updated in place) and return it.

    The decision side of the test is "the decisions did not change, and are not about to"; the
    objective side is "the loss has flattened". Keeping the first check unstable means a fit is never
    called settled before its scores have been seen to move (or not) over one interval.
    """
    window = state.checks[-patience:]  # the checks the slope and the objective are compared over
    oldest = window[0] if window else None
    interval = step - oldest.step if oldest else step
    flipped = flipped_share(keep, state.last_keep)
    projected = projected_share(score, state.scores[0] if state.scores else None, keep, interval,
                                horizon=int(horizon * step), boundary=boundary, lower_is_better=lower_is_better)
    now = None
    if measure is not None:  # in what the user asked for: points of parameter compression, not structures
        now = measure(keep)
        if state.last_keep is not None:
            flipped = abs(now - measure(state.last_keep))
        if state.scores and projected > 0:
            ahead = projected_keep(score, state.scores[0], keep, interval, int(horizon * step), boundary, lower_is_better)
            projected = abs(measure(ahead) - now)
    before = sum(c.objective for c in window) / len(window) if window else None
    change = relative_change(objective, before)
    stable = flipped <= flip_tolerance and projected <= flip_tolerance and change <= objective_tolerance
    state.streak = state.streak + 1 if stable else 0
    if state.settled_at is None and state.streak >= patience and step >= min_steps:
        state.settled_at = step
    check = SettleCheck(step=step, epoch=epoch, kept=float(keep.double().mean()) if keep.numel() else 1.0,
                        flipped=flipped, projected=projected, objective=objective, objective_change=change,
                        kl=kl, stable=stable, compression=now)
    state.checks.append(check)
    state.last_keep = keep.detach().bool().cpu().clone()
    state.last_score = score.detach().double().cpu().clone()
    state.scores = (state.scores + [state.last_score])[-patience:]
    return check


def summary(state: SettleState, max_steps: int | None = None) -> dict:
    """The report's ``settling`` entry: whether and when the fit settled, and the last check."""
    last = state.checks[-1] if state.checks else None
    return {
        "settled": state.settled,
        "settled_at_step": state.settled_at,
        "steps": last.step if last else 0,
        "max_steps": max_steps,
        "checks": len(state.checks),
        "last_check": asdict(last) if last else None,
        "patience": defaults.SETTLE_PATIENCE,
    }


def unsettled_message(info: dict) -> str:
    """One line for a fit that stopped before its gates settled (what happened, what to run)."""
    last = info.get("last_check") or {}
    # values come from report.json too, where a non-finite number is null
    moving = max(last.get("flipped") if last.get("flipped") is not None else 1.0,
                 last.get("projected") if last.get("projected") is not None else 1.0)
    change = last.get("objective_change")
    change_text = f"{change:.1%}" if change is not None and math.isfinite(change) else "unknown (one check)"
    return (f"the gates had not settled after {info.get('steps') or 0} optimiser steps "
            f"({moving:.1%} of the decisions still moving, objective change {change_text}): "
            "the result reflects an unfinished fit; run again with --epochs auto (or a larger --max-steps)")
