"""Budgets (--target-macs/--target-params/--target-latency) and --round-to auto (issue 18, items 3-4),
on real networks with gates whose posteriors are drawn at random (seeded): the decisions are BMRS's
own on those posteriors, the MACs and parameters counted on the networks surgery makes."""

from __future__ import annotations

import json

import pytest
import torch

import bmrs_surgery as bmrs
from bmrs_surgery.budget import Budget, Planner, meet, removal_order
from bmrs_surgery.criteria import decision
from bmrs_surgery.deploy import count, plain_network
from bmrs_surgery.errors import JobError
from bmrs_surgery.gated import gate_bank
from bmrs_surgery.job import Job
from bmrs_surgery.latency_table import LatencyTable, candidates, round_auto, widen
from bmrs_surgery.plan import plan_keep
from bmrs_surgery.surgery import shrink
from models import get_model

SHAPE = (1, 32, 32)


def gated_lenet(seed: int = 0):
    torch.manual_seed(seed)
    gated = bmrs.attach_gates(get_model("lenet5").eval(), torch.randn((2,) + SHAPE))
    bank = gate_bank(gated)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # posteriors spread so that dF has both signs
        bank.posterior[0].uniform_(-20.0, 0.0, generator=gen)
        bank.posterior[1].uniform_(-2.0, 1.0, generator=gen)
    return gated, bank


def macs_ratio(gated, keep) -> float:
    example = torch.randn((1,) + SHAPE)
    pruned = shrink(gated.analysis, gate_bank(gated), keep)
    return count(pruned, example)[0] / count(plain_network(gated), example)[0]


def _runner():
    from click.testing import CliRunner

    try:  # click < 8.2 mixes stderr into stdout unless told not to
        return CliRunner(mix_stderr=False)
    except TypeError:
        return CliRunner()


def finalise_for(bank, score):
    return lambda k: plan_keep(bank, k, score)


def test_removal_order_spares_each_groups_best_and_goes_by_df():
    gated, bank = gated_lenet()
    dec = decision(gated, "bmrs_u")
    keep = plan_keep(bank, dec.keep, dec.score)
    order = removal_order(bank, keep, dec.score)
    assert bool(keep[order].all())  # only structures BMRS keeps
    assert torch.all(dec.score[order][:-1] >= dec.score[order][1:])  # highest dF first
    for i in range(len(bank.groups)):
        sl = bank.slice_of(i)
        kept = torch.nonzero(keep[sl]).flatten() + sl.start
        best = kept[torch.argmin(dec.score[kept])]
        assert int(best) not in order.tolist()
        assert len(set(order.tolist()) & set(kept.tolist())) == len(kept) - 1


def test_target_macs_prunes_in_df_order_just_far_enough():
    gated, bank = gated_lenet()
    dec = decision(gated, "bmrs_u")
    bmrs_keep = plan_keep(bank, dec.keep, dec.score)
    before = macs_ratio(gated, bmrs_keep)
    target = before * 0.6
    keep, info = meet(gated, dec.keep, dec.score, Budget("macs", target), torch.randn((1,) + SHAPE),
                      finalise_for(bank, dec.score))
    assert info["met"] and info["kept"] == "budget" and info["removed_beyond_bmrs"] > 0
    assert macs_ratio(gated, keep) <= target
    assert info["budget"]["macs_ratio"] == pytest.approx(macs_ratio(gated, keep))
    assert info["bmrs"]["macs_ratio"] == pytest.approx(before)
    assert not bool((keep & ~bmrs_keep).any())  # nothing BMRS pruned comes back
    for i in range(len(bank.groups)):
        assert int(keep[bank.slice_of(i)].sum()) >= 1  # no group emptied
    # just far enough: one structure fewer removed misses the target
    order = removal_order(bank, bmrs_keep, dec.score)
    one_less = bmrs_keep.clone()
    one_less[order[: info["removed_beyond_bmrs"] - 1]] = False
    assert macs_ratio(gated, one_less) > target


def test_bmrs_own_stop_is_kept_when_it_goes_further():
    gated, bank = gated_lenet()
    dec = decision(gated, "bmrs_u")
    keep, info = meet(gated, dec.keep, dec.score, Budget("params", 0.999), torch.randn((1,) + SHAPE),
                      finalise_for(bank, dec.score))
    assert info["bmrs"]["params_ratio"] < 0.999  # these posteriors make BMRS prune about half
    assert info["kept"] == "bmrs" and info["met"] and "already meets" in info["note"]
    assert torch.equal(keep, plan_keep(bank, dec.keep, dec.score))


def test_an_unreachable_target_says_so_and_keeps_one_structure_per_group():
    gated, bank = gated_lenet()
    dec = decision(gated, "bmrs_u")
    keep, info = meet(gated, dec.keep, dec.score, Budget("params", 1e-6), torch.randn((1,) + SHAPE),
                      finalise_for(bank, dec.score))
    assert not info["met"] and "cannot be met" in info["note"]
    assert [int(keep[bank.slice_of(i)].sum()) for i in range(len(bank.groups))] == [1] * len(bank.groups)


def test_latency_target_is_measured_in_onnx_runtime():
    gated, bank = gated_lenet()
    dec = decision(gated, "bmrs_u")
    keep, info = meet(gated, dec.keep, dec.score, Budget("latency", 1e6, batch=2), torch.randn((1,) + SHAPE),
                      finalise_for(bank, dec.score))
    assert info["kept"] == "bmrs" and info["batch"] == 2
    assert 0 < info["bmrs"]["latency_ms"] < 1e6 and info["bmrs"]["latency_batch"] == 2


def test_budget_options_are_checked_before_any_work():
    with pytest.raises(JobError) as e:
        Job(model="lenet5", data="digits", target_macs=0.5, target_params=0.5).validate()
    assert "one target" in str(e.value)
    for bad in (0.0, 1.5, float("nan"), True):
        with pytest.raises(JobError) as e:
            Job(model="lenet5", data="digits", target_macs=bad).validate()
        assert e.value.param == "target_macs"
    with pytest.raises(JobError) as e:
        Job(model="lenet5", data="digits", target_latency=-1.0).validate()
    assert e.value.param == "target_latency"
    with pytest.raises(JobError) as e:
        Job(model="lenet5", data="digits", round_to="fast").validate()
    assert e.value.param == "round_to"


# ------------------------------------------------------------------------------------------------
# --round-to auto
# ------------------------------------------------------------------------------------------------


def test_candidate_widths_are_aligned_and_at_or_above_the_kept_count():
    assert candidates(13, 64, 1) == [16, 32]  # 13 channels would leave ONNX Runtime's blocked layout
    assert candidates(16, 64, 1) == [16, 32]
    assert candidates(30, 30, 1) == [30]  # the full size, whatever it is
    assert candidates(3, 10, 2) == [4, 8, 10]  # 2 channels per structure: 4 structures = 8 channels
    assert candidates(100, 128, 1) == [104, 112, 128]


def test_round_auto_never_drops_a_kept_structure_and_reuses_its_table(tmp_path):
    gated, bank = gated_lenet()
    dec = decision(gated, "bmrs_u")
    keep = plan_keep(bank, dec.keep, dec.score)
    table = LatencyTable(threads=1)
    example = torch.randn((1,) + SHAPE)
    rounded, choices = round_auto(gated, keep, dec.score, example, table, batches=(1, 4))
    assert not bool((keep & ~rounded).any())
    for i, g in enumerate(bank.groups):
        k = int(keep[bank.slice_of(i)].sum())
        c = choices[g.name]
        assert c["kept"] == k and int(rounded[bank.slice_of(i)].sum()) == c["chosen"] >= k
        assert c["chosen"] in candidates(k, g.size, g.channels_per_structure) or "why" in c
        if "relative_latency" in c:  # the chosen width is the fastest measured, or k within the margin
            rel = {int(w): r for w, r in c["relative_latency"].items()}
            assert rel[c["chosen"]] <= min(rel.values()) + 0.03 + 1e-9
    assert table.measured > 0
    path = tmp_path / "latency_table.json"
    path.write_bytes(table.to_bytes())
    again = LatencyTable(threads=1, path=path)
    assert again.entries == table.entries
    rounded2, _ = round_auto(gated, keep, dec.score, example, again, batches=(1, 4))
    assert again.measured == 0 and again.reused > 0 and torch.equal(rounded, rounded2)
    doc = json.loads(path.read_text())
    doc["machine"]["cpu"] = "another machine"
    path.write_text(json.dumps(doc))
    assert LatencyTable(threads=1, path=path).entries == {}  # never reused on another machine


def test_widen_adds_the_best_scored_pruned_structures():
    gated, bank = gated_lenet()
    dec = decision(gated, "bmrs_u")
    keep = plan_keep(bank, dec.keep, dec.score)
    g = bank.groups[0]
    sl = bank.slice_of(0)
    k = int(keep[sl].sum())
    wider = widen(bank, keep, dec.score, {g.name: min(g.size, k + 2)})
    added = torch.nonzero(wider[sl] & ~keep[sl]).flatten()
    pruned = torch.nonzero(~keep[sl]).flatten()
    best = pruned[torch.argsort(dec.score[sl][pruned])[: len(added)]]
    assert sorted(added.tolist()) == sorted(best.tolist())


def test_planner_combines_auto_widths_and_a_budget():
    gated, bank = gated_lenet()
    dec = decision(gated, "bmrs_u")
    job = Job(model="lenet5", data="digits", round_to="auto", target_macs=0.3, threads=1)
    planner = Planner(job, gated, torch.randn((1,) + SHAPE))
    planner.latency_batches = (1,)
    planned = planner(dec)
    assert planner(dec).keep is planned.keep  # the same decision is planned once
    doc = planner.report()
    assert doc["round_to"] == "auto" and doc["budget"]["met"]
    assert doc["budget"]["budget"]["macs_ratio"] <= 0.3
    assert macs_ratio(gated, planned.keep) == pytest.approx(doc["budget"]["budget"]["macs_ratio"])
    if doc["widths"] is None:  # lenet5's 6- and 16-channel layers: aligned widths overshoot 0.3 MACs
        assert "exact widths kept" in doc["budget"]["note"]
    else:
        assert set(doc["widths"]) == {g.name for g in bank.groups}


def test_compress_with_target_macs_reports_both_points(tmp_path):
    from cli.main import cli

    out = tmp_path / "out"
    runner = _runner()
    r = runner.invoke(cli, ["lenet5", "--data", "digits", "--epochs", "1", "--finetune-epochs", "0", "-q",
                            "--bench-batch-sizes", "", "--target-macs", "0.4", "--out", str(out)])
    assert r.exit_code == 0, (r.output, r.exception)
    doc = json.loads((out / "report.json").read_text())
    b = doc["plan"]["budget"]
    assert b["option"] == "--target-macs" and b["target"] == 0.4 and b["met"]
    assert doc["surgery"]["counts"]["macs_ratio"] <= 0.4
    assert b["budget"]["macs_ratio"] == pytest.approx(doc["surgery"]["counts"]["macs_ratio"])
    assert b["budget"]["accuracy"] == doc["totals"]["accuracy_after"]
    assert 0.0 <= b["bmrs"]["accuracy"] <= 1.0 and b["bmrs"]["macs_ratio"] >= b["budget"]["macs_ratio"]
    page = (out / "report.html").read_text()
    assert "<h2>Budget</h2>" in page and "BMRS&#x27;s own stop" in page
    r = runner.invoke(cli, ["lenet5", "--data", "digits", "--target-macs", "1.5", "-q", "--out", str(tmp_path / "o2")])
    assert r.exit_code == 2 and "--target-macs" in r.stderr.splitlines()[-1]  # the console script: one line
    assert not (tmp_path / "o2").exists()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
def test_the_budget_is_met_before_fine_tuning_on_any_device(device):
    """Fine-tuning trains the network that is deployed: the budget's keep-mask is applied before
    fine-tuning starts (planning runs on the CPU, the network moves back to ``device``)."""
    res = bmrs.compress(Job(model="lenet5", data="digits", epochs=1, finetune_epochs=1, device=device,
                            target_macs=0.4, bench_batch_sizes=()))
    assert res.report["surgery"]["counts"]["macs_ratio"] <= 0.4
    assert res.report["plan"]["budget"]["met"]
    assert torch.equal(res.fit.prune.keep.cpu(), res.decision.keep.cpu())  # fine-tuned = deployed


def test_cli_latency_target_is_timed_at_the_target_batch(tmp_path):
    """--target-latency MS --target-batch B: the latency of BMRS's own stop is measured at batch B in
    ONNX Runtime; a target above it keeps BMRS's stop and says so. A bad batch is one line, exit 2."""
    from cli.main import cli

    runner = _runner()
    out = tmp_path / "out"
    r = runner.invoke(cli, ["lenet5", "--data", "digits", "--epochs", "1", "--finetune-epochs", "0", "-q",
                            "--bench-batch-sizes", "", "--target-latency", "1e6", "--target-batch", "4",
                            "--out", str(out)])
    assert r.exit_code == 0, (r.output, r.exception)
    b = json.loads((out / "report.json").read_text())["plan"]["budget"]
    assert b["option"] == "--target-latency" and b["batch"] == 4 and b["kept"] == "bmrs" and b["met"]
    assert b["bmrs"]["latency_batch"] == 4 and 0 < b["bmrs"]["latency_ms"] < 1e6
    r = runner.invoke(cli, ["lenet5", "--data", "digits", "--target-latency", "5", "--target-batch", "0", "-q",
                            "--out", str(tmp_path / "o2")])
    assert r.exit_code == 2 and "--target-batch" in r.stderr.splitlines()[-1]
    assert not (tmp_path / "o2").exists()


def test_cli_amp_fits_in_bfloat16_autocast_and_still_proves(tmp_path):
    """--amp (bf16 autocast for the network while fitting) on the CPU: the job runs, and surgery's
    proof holds on the deployed float network."""
    from cli.main import cli

    out = tmp_path / "out"
    r = _runner().invoke(cli, ["lenet5", "--data", "digits", "--epochs", "1", "--finetune-epochs", "1", "--amp",
                                 "-q", "--bench-batch-sizes", "", "--out", str(out)])
    assert r.exit_code == 0, (r.output, r.exception)
    doc = json.loads((out / "report.json").read_text())
    assert doc["surgery"]["proof"]["ok"]
    assert doc["fit"]["config"]["amp"] is True


def test_cli_says_when_a_budget_cannot_be_met(tmp_path):
    from cli.main import cli

    runner = _runner()
    out = tmp_path / "out"
    r = runner.invoke(cli, ["lenet5", "--data", "digits", "--epochs", "1", "--finetune-epochs", "0", "-q",
                            "--bench-batch-sizes", "", "--target-params", "0.0001", "--out", str(out)])
    assert r.exit_code == 0, (r.output, r.exception)
    b = json.loads((out / "report.json").read_text())["plan"]["budget"]
    assert not b["met"]
    line = [x for x in r.stderr.splitlines() if x.startswith("Warning:") and "target" in x]
    assert len(line) == 1 and "--target-params 0.0001 cannot be met" in line[0] and "parameter ratio" in line[0]
