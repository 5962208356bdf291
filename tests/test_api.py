"""Placement, parameter accounting, criteria and the prune API."""

import copy
import math

import pytest
import torch
from torch import nn

import bmrs_surgery as bmrs
from bmrs_surgery.accounting import compression
from bmrs_surgery.errors import BmrsError, GatePlacementError
from bmrs_surgery.placement import find_groups
from models import get_model

X = torch.randn(2, 1, 32, 32)


def test_lenet5_sites_gate_the_inputs_of_the_next_layer():
    sites = find_groups(get_model("lenet5"), X)
    assert [(s.name, s.size, s.producers, s.consumers) for s in sites] == [
        ("0", 6, ["0"], ["3"]),
        ("3", 16, ["3"], ["7"]),
        ("7", 120, ["7"], ["9"]),
        ("9", 84, ["9"], ["11"]),
    ]
    flat = sites[1].taps[0]  # 16 channels x 5 x 5 flattened into Linear(400, 120)
    assert flat.module == "7" and flat.axis == 1 and flat.index.tolist() == [c for c in range(16) for _ in range(25)]
    assert sites[1].kind == "flatten" and sites[0].kind == "channels"


def test_batchnorm_is_coupled_and_gate_reads_the_flattened_features():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 30 * 30, 3))
    (site,) = find_groups(net, X)
    assert site.norms == ["1"] and site.consumers == ["4"] and len(site.taps[0].index) == 3600
    owned = {(s.target, s.dim) for s in site.slots}
    assert owned == {("0.weight", 0), ("0.bias", 0), ("1.weight", 0), ("1.bias", 0), ("1.running_mean", 0),
                     ("1.running_var", 0), ("4.weight", 1)}


def test_ignored_layers_get_no_gate():
    sites = find_groups(get_model("mlp"), X, ignore=("1",))
    assert [s.name for s in sites] == ["3"]


def test_no_prunable_layer_and_wrong_input_are_errors():
    with pytest.raises(GatePlacementError, match="no parameters"):
        find_groups(nn.Sequential(nn.Flatten(), nn.ReLU()), X)
    with pytest.raises(GatePlacementError, match="no prunable structure"):
        find_groups(nn.Sequential(nn.Flatten(), nn.Linear(1024, 10)), X)
    with pytest.raises(BmrsError, match="shape"):
        find_groups(get_model("lenet5"), torch.randn(2, 3, 8, 8))
    with pytest.raises(GatePlacementError, match="not a module"):
        find_groups(get_model("mlp"), X, ignore=("nope",))


def test_mlp_compression_counts_incoming_outgoing_and_gates():
    g = bmrs.attach_gates(get_model("mlp"), X)
    bank = g.bmrs_gates
    keep = torch.ones(300, dtype=torch.bool)
    keep[:5] = False  # 5 units of hidden layer 1
    total = sum(p.numel() for p in g.model.parameters()) + 600
    c = compression(g.model, bank, keep)
    assert c.total == total
    assert c.removable == 5 * (1024 + 1) + 5 * 150 + 5 * 2
    keep[150:153] = False  # and 3 of hidden layer 2: the 5x3 weights between them count once
    c = compression(g.model, bank, keep)
    assert c.removable == 5 * (1024 + 1) + 5 * 150 + 3 * (150 + 1) + 3 * 10 - 5 * 3 + 8 * 2


def test_lenet5_flatten_channel_counts_its_spatial_inputs():
    g = bmrs.attach_gates(get_model("lenet5"), X)
    keep = torch.ones(g.bmrs_gates.num_gates, dtype=torch.bool)
    keep[6] = False  # first channel of conv "3"
    c = compression(g.model, g.bmrs_gates, keep)
    assert c.removable == (6 * 25 + 1) + 25 * 120 + 2


def _bank_with(mu, sigma):
    g = bmrs.attach_gates(get_model("mlp"), X)
    n = g.bmrs_gates.num_gates
    with torch.no_grad():
        g.bmrs_gates.posterior[0] = torch.tensor(mu).repeat(n // len(mu) + 1)[:n]
        g.bmrs_gates.posterior[1] = torch.log(torch.tensor(sigma)).repeat(n // len(sigma) + 1)[:n]
    return g


def test_bmrs_decisions_follow_the_sign_of_delta_f():
    # reference table rows (docs/math.md): (-8, 3) and (-15, 3) are pruned by BMRS_U-8, not by BMRS_N;
    # (-19, 1) has its mass at the bottom and is pruned by BMRS_N
    g = _bank_with([-1.0, -3.0, -8.0, -15.0, -19.0], [0.5, 1.0, 3.0, 3.0, 1.0])
    df_n = bmrs.scores(g, "normal")
    assert df_n[:5].tolist() == pytest.approx([-719.20699, -142.42184, -7.0179480, -0.36173664, df_n[4].item()], rel=1e-4)
    r = bmrs.prune(g, "normal")
    assert r.keep[:5].tolist() == [True, True, True, True, False]
    assert torch.equal(g.bmrs_gates.mask.bool(), r.keep)
    r8 = bmrs.prune(g, "uniform", 8)
    assert r8.keep[:4].tolist() == [True, True, False, False]  # dF_U8 -43.8, -4.55, +0.42, +0.23
    assert r8.per_group["1"] == (int(r8.keep[:150].sum()), 150)
    assert 0 < r8.compression < 1


def test_baseline_criteria():
    g = _bank_with([-1.0, -3.0, -8.0], [0.5, 1.0, 3.0])
    snr = bmrs.decision(g, "snr")
    assert snr.keep[:3].tolist() == [True, False, False]  # SNR 2.17, 0.85, 0.20
    assert snr.score[:3].tolist() == pytest.approx([2.1703, 0.84773, 0.20255], rel=1e-4)
    e = bmrs.decision(g, "expected")
    assert e.keep[:3].tolist() == [True, False, False]  # E 0.398, 0.080, 0.011


def test_l2_reaches_the_target_compression_with_the_fewest_structures():
    g = bmrs.attach_gates(get_model("mlp"), X)
    d = bmrs.decision(g, "l2", target_compression=0.3)
    got = compression(g.model, g.bmrs_gates, d.keep).ratio
    assert got >= 0.3
    order = torch.argsort(d.score)
    fewer = d.keep.clone()
    fewer[order[int((~d.keep).sum()) - 1]] = True  # one structure less pruned misses the target
    assert compression(g.model, g.bmrs_gates, fewer).ratio < 0.3
    assert (d.score[~d.keep].max() <= d.score[d.keep].min())


def test_l2_never_empties_a_layer():
    """With the second hidden layer's weights small, a global L2 threshold at 95% would remove all
    of its units (the network would output a constant); each group keeps its largest one."""
    model = get_model("mlp")
    with torch.no_grad():
        model[3].weight.mul_(0.01)
        model[3].bias.mul_(0.01)
    g = bmrs.attach_gates(model, X)
    d = bmrs.decision(g, "l2", target_compression=0.95)
    kept = [int(d.keep[g.bmrs_gates.slice_of(i)].sum()) for i in range(len(g.bmrs_gates.groups))]
    assert min(kept) >= 1 and compression(g.model, g.bmrs_gates, d.keep).ratio >= 0.95


def test_per_layer_l2_prunes_the_same_share_of_every_layer():
    """The second hidden layer's units all have smaller norms than the first's: the global ranking
    takes almost all of them, the per-layer ranking the same share of both layers, each layer's
    smallest units first."""
    model = get_model("mlp")
    with torch.no_grad():
        model[3].weight.mul_(0.01)
    g = bmrs.attach_gates(model, X)
    bank = g.bmrs_gates
    widths = lambda d: [int(d.keep[bank.slice_of(i)].sum()) for i in range(2)]  # noqa: E731
    glob = bmrs.decision(g, "l2", target_compression=0.6)
    layer = bmrs.decision(g, "l2", target_compression=0.6, per_layer=True)
    assert widths(glob)[1] < 10 < widths(glob)[0]
    assert abs(widths(layer)[0] - widths(layer)[1]) <= 1
    assert compression(g.model, bank, layer.keep).ratio >= 0.6
    for i in range(2):
        sl = bank.slice_of(i)
        assert layer.score[sl][~layer.keep[sl]].max() <= layer.score[sl][layer.keep[sl]].min()


def test_prune_rejects_unknown_prior_and_criterion():
    g = bmrs.attach_gates(get_model("mlp"), X)
    with pytest.raises(ValueError, match="prior"):
        bmrs.prune(g, "bogus")
    with pytest.raises(ValueError, match="criterion"):
        bmrs.decision(g, "bogus")


def test_masks_are_replaced_not_accumulated():
    g = _bank_with([-8.0], [3.0])
    assert bmrs.prune(g, "uniform", 8).kept_fraction < 0.01
    with torch.no_grad():
        g.bmrs_gates.posterior[0] = -1.0
        g.bmrs_gates.posterior[1] = math.log(0.5)
    assert bmrs.prune(g, "uniform", 8).keep.all()


def test_prune_never_empties_a_layer_and_the_proof_fails_on_an_emptied_one():
    """Every gate of the MLP at dF >= 0: each layer keeps its best structure (the one with the
    lowest dF), the pruned network has width 1 where it had 150, and the proof holds; a network
    whose layer was emptied by hand fails the proof although its outputs match."""
    g = _bank_with([-8.0], [3.0])
    with torch.no_grad():
        g.bmrs_gates.posterior[0, 7] = -7.5  # the lowest dF of the first layer: the one it keeps
    r = bmrs.prune(g, "uniform", 8)
    assert r.per_group == {"1": (1, 150), "3": (1, 150)}
    assert bool(r.keep[7]) and int(r.keep[:150].sum()) == 1
    small = bmrs.pruned_network(g)
    widths = [m.out_features for m in small.modules() if isinstance(m, nn.Linear)]
    assert widths == [1, 1, 10]
    proof = bmrs.prove(g, small, [X])
    assert proof.ok and proof.problem is None

    emptied = copy.deepcopy(small)
    with torch.no_grad():
        first = emptied.get_submodule("1")
        first.weight = nn.Parameter(first.weight[:0])
        first.bias = nn.Parameter(first.bias[:0])
        second = emptied.get_submodule("3")
        second.weight = nn.Parameter(second.weight[:, :0])
    # the emptied network computes what the gated one does (its layer was all but silenced) ...
    bad = bmrs.prove(g, emptied, [X])
    assert bad.max_abs_diff < 1.0
    # ... yet the proof fails, naming the emptied layer
    assert not bad.ok and "1.weight" in bad.problem


def test_surgery_refuses_a_keep_mask_that_empties_a_group():
    from bmrs_surgery.errors import SurgeryError
    from bmrs_surgery.gated import analysis_of
    from bmrs_surgery.surgery import shrink

    g = _bank_with([-1.0], [0.5])
    bank = g.bmrs_gates
    keep = torch.ones(bank.num_gates, dtype=torch.bool)
    keep[bank.slice_of(1)] = False
    with pytest.raises(SurgeryError, match="every structure of group 3"):
        shrink(analysis_of(g), bank, keep)


def test_resnet18_for_fashion_mnist_gets_one_gate_per_coupled_group():
    """The ResNet-18 of the Fashion-MNIST benchmark: 32x32 single-channel input, 10 classes; each of
    its four residual streams is one group (all blocks of a stage share its channels)."""
    from models import get_model, input_shape

    model = get_model("resnet18-1ch")
    x = torch.randn(2, *input_shape("resnet18-1ch"))
    assert model.eval()(x).shape == (2, 10)
    gated = bmrs.attach_gates(model, x)
    sizes = sorted(s.size for s in gated.bmrs_gates.groups)
    # 4 streams (64, 128, 256, 512) + the first conv of each of the 8 blocks (64,64,128,128,...)
    assert sizes == sorted([64, 128, 256, 512] + [64, 64, 128, 128, 256, 256, 512, 512])
