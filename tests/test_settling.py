"""The settling signal (issue 14): pure checks on made-up score trajectories, and real fits that
are reported as settled or unsettled."""

from __future__ import annotations

import math

import pytest
import torch

from bmrs_surgery import defaults
from bmrs_surgery.settling import (
    SettleState,
    flipped_share,
    observe,
    projected_share,
    relative_change,
    score_slope,
    summary,
    unsettled_message,
)


def _check(state, step, score, objective=1.0):
    score = torch.as_tensor(score, dtype=torch.float64)
    return observe(state, step=step, epoch=step / 10, score=score, keep=score < 0, objective=objective, kl=0.0)


def test_flipped_share_counts_changed_decisions():
    before = torch.tensor([True, True, False, False])
    assert flipped_share(before, None) == 1.0
    assert flipped_share(before, before) == 0.0
    assert flipped_share(torch.tensor([True, False, False, True]), before) == 0.5


def test_projection_sees_a_score_about_to_cross():
    last = torch.tensor([-100.0, -10.0, -50.0], dtype=torch.float64)
    now = torch.tensor([-100.0, -5.0, -49.0], dtype=torch.float64)
    keep = now < 0
    slope = score_slope([(100, last), (200, now)])
    assert torch.allclose(slope, torch.tensor([0.0, 0.05, 0.01], dtype=torch.float64))
    # structure 1 climbs 5 per 100 steps: crosses 0 within a horizon of 100 steps, not 50
    assert projected_share(now, slope, keep, horizon=100) == pytest.approx(1 / 3)
    assert projected_share(now, slope, keep, horizon=50) == 0.0
    assert projected_share(now, None, keep, horizon=100) == 1.0
    assert projected_share(now, slope, keep, horizon=100, boundary=None) == 0.0


def test_the_slope_is_a_least_squares_fit_that_averages_out_noise():
    steps = [100, 200, 300, 400, 500]
    noise = [3.0, -3.0, 3.0, -3.0, 3.0]  # alternating noise around a line climbing 1 per 100 steps
    history = [(s, torch.tensor([-10.0 + s / 100 + e], dtype=torch.float64)) for s, e in zip(steps, noise)]
    slope = score_slope(history)
    assert slope.item() == pytest.approx(0.01, abs=2e-3)  # the last two checks alone say -0.06
    assert score_slope(history[:1]) is None


def test_the_slope_window_grows_with_the_fit_so_that_old_noise_is_not_extrapolated_ever_further():
    """Scores that wobble but do not trend: a two-check slope extrapolated over a horizon that grows
    with the steps would project flips sooner or later; the slope over the fit's second half does
    not."""
    state = SettleState()
    scores = {}
    for i, step in enumerate(range(100, 4100, 100)):
        wobble = 4.0 if i % 2 else -4.0
        scores[step] = torch.tensor([-60.0 + wobble, -80.0 - wobble, 5.0], dtype=torch.float64)
        _check(state, step, scores[step])
    late = [c for c in state.checks if c.step >= 2000]
    assert all(c.projected == 0.0 for c in late)
    assert state.settled
    # a slope over the last two checks alone, extrapolated as far, would see the first score cross
    keep = scores[4000] < 0
    two_checks = score_slope([(3900, scores[3900]), (4000, scores[4000])])
    assert projected_share(scores[4000], two_checks, keep, horizon=defaults.SETTLE_HORIZON * 4000) > 0
    # the history keeps only what a later slope can use: checks since half the steps
    assert min(s for s, _ in state.history) >= 2000


def test_gates_that_have_not_moved_are_not_settled_while_their_scores_climb():
    state = SettleState()
    for step in range(100, 1100, 100):  # every dF climbs steadily towards 0: nothing flips yet
        _check(state, step, [-2000.0 + 1.5 * step, -3000.0 + step, -1e4])
    assert not state.settled
    assert all(c.flipped == 0.0 for c in state.checks[1:])  # no decision changed ...
    assert all(c.projected > 0 for c in state.checks if c.step >= defaults.SETTLE_MIN_STEPS)  # ... but one is on its way


def test_stable_scores_settle_after_patience_checks():
    state = SettleState()
    for step in range(100, 1100, 100):
        _check(state, step, [-50.0, -80.0, 5.0], objective=2.0)
    # first check: nothing to compare with; then patience stable checks in a row, and the minimum steps
    assert state.settled and state.settled_at == max(100 * (1 + defaults.SETTLE_PATIENCE), defaults.SETTLE_MIN_STEPS)
    assert summary(state)["settled"] is True


def test_a_flip_or_a_moving_objective_resets_the_streak():
    state = SettleState()
    _check(state, 100, [-50.0, 5.0])
    _check(state, 200, [-50.0, 5.0])
    _check(state, 300, [-50.0, 5.0], objective=1.5)  # objective moved 50%
    assert state.streak == 0
    _check(state, 400, [3.0, 5.0], objective=1.5)  # a decision flipped
    assert state.streak == 0 and not state.settled


def test_state_round_trips_for_resume():
    state = SettleState()
    _check(state, 100, [-1.0, 2.0])
    _check(state, 200, [-1.0, 2.0])
    again = SettleState.from_state(state.to_state())
    assert again.checks == state.checks and again.streak == state.streak
    assert torch.equal(again.last_keep, state.last_keep)
    assert [s for s, _ in again.history] == [100, 200] and again.first_objective == state.first_objective
    # the next check sees the same slope whether the fit was resumed or not
    assert _check(again, 300, [-0.5, 2.0]) == _check(state, 300, [-0.5, 2.0])


def test_relative_change_is_finite_or_inf_never_nan():
    assert relative_change(1.0, None) == math.inf
    assert relative_change(float("nan"), 1.0) == math.inf
    assert relative_change(1.02, 1.0) == pytest.approx(0.02)
    assert relative_change(0.0, 0.0) == 0.0
    # judged against how far the objective has fallen when that is larger than its size now
    assert relative_change(0.0412, 0.04, fallen=4.0) == pytest.approx(0.0003)
    assert relative_change(1.02, 1.0, fallen=math.inf) == pytest.approx(0.02)


def test_a_small_objective_that_has_fallen_far_counts_as_flat_despite_its_relative_noise():
    """An objective that fell from 4 to about 0.04 and wobbles by 10% there (batch noise on a nearly
    fitted training set) has flattened; one that is still falling by 10% a check has not."""
    flat, falling = SettleState(), SettleState()
    for i, step in enumerate(range(100, 1100, 100)):
        _check(flat, step, [-50.0, 5.0], objective=4.0 if i == 0 else 0.04 * (1.1 if i % 2 else 0.9))
        _check(falling, step, [-50.0, 5.0], objective=4.0 * 0.9 ** i)
    assert flat.settled and not falling.settled
    assert max(c.objective_change for c in flat.checks[4:]) < defaults.SETTLE_OBJECTIVE_TOLERANCE  # past the 4.0


def test_unsettled_message_says_what_to_run():
    state = SettleState()
    _check(state, 100, [-5.0])
    text = unsettled_message(summary(state))
    assert "had not settled after 100 optimiser steps" in text and "--epochs auto" in text


# -- real fits ----------------------------------------------------------------------------------


def test_a_short_fit_is_reported_unsettled_by_the_command(tmp_path):
    """A fit far too short for the gates to move says so: one warning line on stderr, ``settled``
    false in report.json and the report page, never a silent result."""
    import json

    from click.testing import CliRunner

    from cli.main import cli

    out = tmp_path / "o"
    result = CliRunner().invoke(cli, ["lenet5", "--data", "digits", "--epochs", "2", "--finetune-epochs", "0",
                                      "--bench-batch-sizes", "", "-q", "--out", str(out)])
    assert result.exit_code == 0, result.output
    warning = [line for line in result.stderr.splitlines() if "settled" in line]
    assert len(warning) == 1 and warning[0].startswith("Warning: the gates had not settled after 18 optimiser steps")
    doc = json.loads((out / "report.json").read_text())
    assert doc["settled"] is False and doc["fit"]["settling"]["stopped"] == "epochs"
    assert "had not settled" in (out / "report.html").read_text()


def test_line_reporter_writes_one_flushed_line_per_epoch_and_check():
    import io

    from bmrs_surgery.data import load_data
    from bmrs_surgery.fit import FitConfig, fit
    from bmrs_surgery.gated import attach_gates
    from bmrs_surgery.progress import LineReporter, make_reporter
    from models import get_model

    data = load_data("digits", limit=300)
    gated = attach_gates(get_model("lenet5"), data.train.tensors[0][:2])
    stream = io.StringIO()
    assert isinstance(make_reporter(stream), LineReporter)  # not a terminal: plain lines
    fit(gated, data, FitConfig(epochs=4, finetune_epochs=1, batch_size=16), LineReporter(stream))
    lines = stream.getvalue().splitlines()
    epochs = [line for line in lines if "settling check" not in line]
    checks = [line for line in lines if "settling check" in line]
    assert [line.split(":")[0] for line in epochs] == ["fit 1/5", "fit 2/5", "fit 3/5", "fit 4/5", "finetune 5/5"]
    assert len(checks) == 1 and "step 76" in checks[0]  # 19 steps an epoch: no 100-step check, the final one
    assert all(len(line) > 80 for line in checks)  # never cut to a terminal's width


@pytest.mark.slow
def test_an_over_parameterised_mlp_settles_and_auto_stops_there(tmp_path):
    """A real fit that settles: an MLP far larger than the breast-cancer table needs, trained, then
    fitted with --epochs auto: it stops at the first epoch end after the gates settled, well before
    --max-steps, and says so."""
    import numpy as np
    from sklearn.datasets import load_breast_cancer

    from bmrs_surgery.data import load_data
    from bmrs_surgery.fit import FitConfig, fit, train_plain
    from bmrs_surgery.gated import attach_gates

    table = load_breast_cancer()
    x = (table.data - table.data.mean(0)) / table.data.std(0)
    np.savez(tmp_path / "table.npz", x=x.astype(np.float32), y=table.target.astype(np.int64))
    data = load_data(tmp_path / "table.npz")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(30, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
                              torch.nn.Linear(64, 2))
    train_plain(net, data.train, epochs=10, batch_size=128, lr=defaults.LR, seed=0)
    gated = attach_gates(net, data.train.tensors[0][:2])
    result = fit(gated, data, FitConfig(epochs="auto", gate_lr=5e-2, batch_size=32, finetune_epochs=0))
    info = result.settling
    assert result.settled and info["stopped"] == "settled"
    assert defaults.SETTLE_MIN_STEPS <= info["settled_at_step"] <= 2000
    assert info["steps"] - info["settled_at_step"] < 15  # the rest of that epoch (15 steps of 32), no more
    assert result.prune.compression > 0.5  # the hidden layers were far too wide: most of them went
