"""Whether the gates have settled: a record of how the decisions move while fitting.

A fit is checked every few hundred optimiser steps (:data:`~.defaults.SETTLE_CHECK_STEPS`). Each
check sees every structure's score (dF, or the configured criterion's score), its keep decision,
the KL term and the mean objective since the previous check, and computes:

* ``flipped``: the share of structures whose decision changed since the previous check;
* ``projected``: the share of kept structures whose decision would change within a horizon of
  :data:`~.defaults.SETTLE_HORIZON` times the steps done so far (9: by the end of a fit ten times as
  long), if each score kept the trend it had over the second half of the fit so far (a least-squares
  slope over the checks since half the steps done). A structure whose dF climbs towards 0 is about to
  be pruned even though no decision flipped yet, which is exactly the state of a fit whose gates have
  not moved yet. The slope's window grows with the fit, in proportion to the horizon, so the noise
  of the extrapolation does not grow with the number of steps (a fixed window would extrapolate
  step-to-step noise ever further);
* ``objective_change``: the change of the mean objective against the last
  :data:`~.defaults.SETTLE_PATIENCE` checks, as a share of the larger of how far the objective has
  fallen since the first check and its size now (a nearly converged objective close to 0, where a
  relative change is all noise, is judged against how far it came).

Both decision measures count in points of parameter compression when the fit gives ``measure`` (it
does: what moves matters by the parameters it holds, not by the number of structures). A check is
*stable* when no more than :data:`~.defaults.SETTLE_FLIP_TOLERANCE` flipped, no more than
:data:`~.defaults.SETTLE_PROJECTED_TOLERANCE` is projected to, and the objective changed by less than
:data:`~.defaults.SETTLE_OBJECTIVE_TOLERANCE`. The fit has *settled* after
:data:`~.defaults.SETTLE_PATIENCE` stable checks in a row, and not before
:data:`~.defaults.SETTLE_MIN_STEPS` steps. The functions here are pure: tensors
and numbers in, records out; the fitting loop owns the schedule. Why these choices:
``docs/settling.md``.
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
    # (step, scores) of the checks the slope may still need (those at or after half the steps), oldest first
    history: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    streak: int = 0  # stable checks in a row
    settled_at: int | None = None  # the step of the check that completed the streak
    first_objective: float | None = None  # the mean objective at the first check

    @property
    def settled(self) -> bool:
        return self.settled_at is not None

    def to_state(self) -> dict:
        return {"checks": [asdict(c) for c in self.checks], "last_keep": self.last_keep,
                "history_steps": [s for s, _ in self.history],
                "history": [h for _, h in self.history], "streak": self.streak, "settled_at": self.settled_at,
                "first_objective": self.first_objective}

    @classmethod
    def from_state(cls, state: dict | None) -> SettleState:
        if not state:
            return cls()
        # a state saved before the history was kept resumes without it (the slope starts afresh)
        history = list(zip(state.get("history_steps", []), state.get("history", [])))
        checks = [SettleCheck(**c) for c in state["checks"]]
        first = state.get("first_objective", checks[0].objective if checks else None)
        return cls(checks, state["last_keep"], history, int(state["streak"]), state["settled_at"], first)


def flipped_share(keep: torch.Tensor, last_keep: torch.Tensor | None) -> float:
    """Share of structures whose decision differs from ``last_keep`` (1.0 without a previous check:
    nothing is known to be stable yet)."""
    if last_keep is None:
        return 1.0
    return float((keep.bool() != last_keep.bool()).double().mean()) if keep.numel() else 0.0


def score_slope(history: list[tuple[int, torch.Tensor]]) -> torch.Tensor | None:
    """Least-squares slope per step of each structure's score over the checks in ``history`` ((step,
    scores) pairs), in float64; None with fewer than two distinct steps."""
    if len({s for s, _ in history}) < 2:
        return None
    t = torch.tensor([s for s, _ in history], dtype=torch.float64)
    y = torch.stack([h.double() for _, h in history])
    tc = t - t.mean()
    return (tc[:, None] * (y - y.mean(0))).sum(0) / (tc * tc).sum()


def projected_keep(score: torch.Tensor, slope: torch.Tensor | None, keep: torch.Tensor, horizon: float,
                   boundary: float | None = 0.0, lower_is_better: bool = True) -> torch.Tensor:
    """The keep decisions ``horizon`` steps ahead if every kept structure's score kept its ``slope``
    (per step); pruned structures stay pruned: a pruned gate's posterior drifts towards the prior with
    a slope that flattens (a linear extrapolation overshoots it), and a real return is seen as a flip.
    A non-finite score or slope counts as staying (the criteria refuse non-finite posteriors before
    this)."""
    keep = keep.bool()
    if boundary is None or slope is None or score.numel() == 0:
        return keep.clone()
    ahead = score.double() + slope.double() * max(horizon, 0.0)
    # the decision keeps a structure when its score is below 0 (dF < 0), or above for scores where
    # higher is better; a flip is the extrapolated score crossing to the other side
    stays = (ahead < boundary) if lower_is_better else (ahead > boundary)
    return keep & (stays | ~torch.isfinite(ahead))


def projected_share(score: torch.Tensor, slope: torch.Tensor | None, keep: torch.Tensor, horizon: float,
                    boundary: float | None = 0.0, lower_is_better: bool = True,
                    ahead: torch.Tensor | None = None) -> float:
    """Share of structures whose decision would flip within ``horizon`` steps if each score kept its
    ``slope``: the score crossing ``boundary`` (0 for dF; None for a criterion whose cut is not a
    fixed score, which projects nothing). 1.0 when no slope is known yet (nothing has been seen to
    move or stay). ``ahead``: :func:`projected_keep` of the same arguments, when already computed."""
    if boundary is None or score.numel() == 0:
        return 0.0
    if slope is None:
        return 1.0
    if ahead is None:
        ahead = projected_keep(score, slope, keep, horizon, boundary, lower_is_better)
    return float((keep.bool() & ~ahead).double().mean())


def relative_change(now: float, before: float | None, fallen: float = 0.0) -> float:
    """|now - before| / max(|before|, ``fallen``, tiny): the change as a share of the larger of the
    value's size and how far it has fallen so far; inf when there is nothing to compare with."""
    if before is None or not (math.isfinite(now) and math.isfinite(before)):
        return math.inf
    return abs(now - before) / max(abs(before), fallen if math.isfinite(fallen) else 0.0, 1e-12)


def observe(state: SettleState, *, step: int, epoch: float, score: torch.Tensor, keep: torch.Tensor,
            objective: float, kl: float, boundary: float | None = 0.0, lower_is_better: bool = True,
            patience: int = defaults.SETTLE_PATIENCE, flip_tolerance: float = defaults.SETTLE_FLIP_TOLERANCE,
            projected_tolerance: float = defaults.SETTLE_PROJECTED_TOLERANCE,
            objective_tolerance: float = defaults.SETTLE_OBJECTIVE_TOLERANCE,
            horizon: float = defaults.SETTLE_HORIZON, min_steps: int = defaults.SETTLE_MIN_STEPS,
            measure=None) -> SettleCheck:
    """Record one check in ``state`` (updated in place) and return it.

    The decision side of the test is "the decisions did not change, and a fit ``horizon + 1`` times as
    long is not projected to change them by more than the tolerance"; the objective side is "the
    objective has flattened". Keeping the first check unstable means a fit is never called settled
    before its scores have been seen to move (or not) over one interval.
    """
    window = state.checks[-patience:]  # the checks the objective is compared over
    score = score.detach().double().cpu()
    keep = keep.detach().bool().cpu()
    # the slope over the second half of the fit so far (and at least the previous check)
    since = min(step // 2, state.history[-1][0]) if state.history else step
    history = [(s, h) for s, h in state.history if s >= since] + [(step, score)]
    slope = score_slope(history)
    flipped = flipped_share(keep, state.last_keep)
    ahead = projected_keep(score, slope, keep, horizon * step, boundary, lower_is_better)
    projected = projected_share(score, slope, keep, horizon * step, boundary, lower_is_better, ahead=ahead)
    now = None
    if measure is not None:  # in what the user asked for: points of parameter compression, not structures
        now = measure(keep)
        if state.last_keep is not None:
            flipped = abs(now - measure(state.last_keep))
        if slope is not None and projected > 0:
            projected = abs(measure(ahead) - now)
    before = sum(c.objective for c in window) / len(window) if window else None
    first = state.first_objective if state.first_objective is not None else objective
    change = relative_change(objective, before, fallen=first - objective)
    stable = flipped <= flip_tolerance and projected <= projected_tolerance and change <= objective_tolerance
    state.streak = state.streak + 1 if stable else 0
    if state.settled_at is None and state.streak >= patience and step >= min_steps:
        state.settled_at = step
    check = SettleCheck(step=step, epoch=epoch, kept=float(keep.double().mean()) if keep.numel() else 1.0,
                        flipped=flipped, projected=projected, objective=objective, objective_change=change,
                        kl=kl, stable=stable, compression=now)
    state.checks.append(check)
    state.first_objective = first
    state.last_keep = keep.clone()
    state.history = history  # older checks are never needed again: the window's start only moves on
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
        "horizon": defaults.SETTLE_HORIZON,
        "tolerances": {"flipped": defaults.SETTLE_FLIP_TOLERANCE, "projected": defaults.SETTLE_PROJECTED_TOLERANCE,
                       "objective_change": defaults.SETTLE_OBJECTIVE_TOLERANCE},
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
