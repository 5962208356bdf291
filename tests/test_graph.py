"""Dependency analysis, surgery and the equivalence proof on every kind of coupling."""


import numpy as np
import pytest
import torch
from torch import nn

import bmrs_surgery as bmrs
from bmrs_surgery.check import check_model, random_masks
from bmrs_surgery.errors import GraphError
from bmrs_surgery.graph.groups import analyse
from bmrs_surgery.graph.labels import reshape_groups
from bmrs_surgery.graph.unionfind import Recorder
from bmrs_surgery.surgery import shrink
from bmrs_surgery.verify import prove, random_inputs
from models import get_model, input_shape

BLOCKS = ["mlp", "lenet5", "resnet_block", "dense_block", "depthwise_separable", "shuffle_block", "transformer_block"]


def _shape(name):
    return (1,) + input_shape(name)


@pytest.mark.parametrize("name", BLOCKS)
def test_every_coupling_kind_passes_check_with_onnx(name):
    res = check_model(get_model(name), _shape(name), name=name, ratio=0.4, seed=1)
    assert res.ok, res.stages
    assert list(res.stages) == ["trace", "groups", "gates", "surgery", "verify", "onnx"]
    assert res.params_after < res.params_before
    assert res.max_abs_diff <= 1e-4 * res.output_scale and res.output_scale > 1e-3
    assert res.onnx_max_abs_diff <= 1e-4 * res.output_scale


def _groups(name):
    return analyse(get_model(name), torch.randn(_shape(name))).groups


def _owners(group, role):
    return {s.module for s in group.slots if s.role == role}


def test_residual_stream_couples_main_path_and_downsample():
    res = [g for g in _groups("resnet_block") if g.kind == "residual"]
    assert len(res) == 1 and res[0].size == 32
    assert _owners(res[0], "out") == {"1.conv2", "1.downsample.0", "2.conv2"}
    assert _owners(res[0], "norm") >= {"1.bn2", "1.downsample.1", "2.bn2"}
    assert {t.module for t in res[0].taps} == {"2.conv1.0", "3.fc"}


def test_concat_groups_keep_their_offsets():
    groups = _groups("dense_block")
    transition = "4.2"
    offsets = {}
    for g in groups:
        for t in g.taps:
            if t.module == transition:
                offsets[g.id] = int(np.flatnonzero(t.index >= 0)[0])
    assert sorted(offsets.values()) == [0, 8, 12, 16]  # stem 8 channels, then 3 x growth 4
    assert all(g.kind == "concat" for g in groups if g.id in offsets)


def test_depthwise_conv_passes_channels_and_grouped_conv_prunes_index_in_every_group():
    groups = _groups("depthwise_separable")
    kinds = {g.kind for g in groups}
    assert "depthwise" in kinds and "grouped" in kinds
    grouped = next(g for g in groups if g.kind == "grouped")
    tap = next(t for t in grouped.taps if t.module == "4")
    # 32 input channels in 4 groups of 8: structure i is index i of every group
    assert tap.index.tolist() == list(range(8)) * 4


def _interleave(first, second):
    """channel_shuffle(cat(first, second), 2): first[0], second[0], first[1], second[1], ..."""
    return [c for pair in zip(first, second) for c in pair]


def test_shuffle_couples_the_two_halves_index_by_index():
    """shuffle_block: unit 1 concatenates branch1's 8 channels a0..a7 with branch2's b0..b7 and
    shuffles them to a0 b0 a1 b1 ...; the shuffle's view (N, 2, 8, H, W) can only lose index j of
    both halves at once, so a_j and b_j are one structure. Units 2 and 3 chunk that in two, pass the
    first half x1 through and shuffle it with their branch's output c: c_j joins x1[j]'s structure."""
    groups = [g for g in _groups("shuffle_block") if "shuffle" in g.tags]
    assert groups and all(g.kind == "concat" for g in groups)

    def structures(target, dim):
        """(group id, structure index) of every index of ``target``'s dimension ``dim``."""
        found = {}
        for g in groups:
            for s in g.slots:
                if s.target == target and s.dim == dim:
                    for i, k in enumerate(s.index.tolist()):
                        if k >= 0:
                            assert i not in found, f"{target}[{i}] in two groups"
                            found[i] = (g.id, k)
        assert sorted(found) == list(range(len(found))) and found, (target, found)
        return [found[i] for i in range(len(found))]

    a = structures("1.branch1.2.0.weight", 0)  # unit 1, branch1's output channels
    b = structures("1.branch2.3.0.weight", 0)  # unit 1, branch2's output channels
    assert len(a) == len(b) == 8
    assert a == b  # index by index
    assert len(set(a)) == 8  # and nothing more: a_i and a_j (i != j) stay independent
    out1 = _interleave(a, b)
    c = structures("2.branch2.3.0.weight", 0)
    assert c == out1[:8]  # unit 2's branch output shuffled with x1 = out1[:8]
    assert structures("2.branch2.0.0.weight", 1) == out1[8:]  # unit 2's branch reads x2 = out1[8:]
    out2 = _interleave(out1[:8], c)
    d = structures("3.branch2.3.0.weight", 0)
    assert d == out2[:8]
    assert structures("3.branch2.0.0.weight", 1) == out2[8:]
    out3 = _interleave(out2[:8], d)
    assert structures("4.0.weight", 1) == out3  # the 1x1 conv after the last unit reads all 16
    # the gates sit on those consumers, with the same structure indices as their weights
    taps = {t.module: (g.id, t.index.tolist()) for g in groups for t in g.taps}
    for module, seen in (("2.branch2.0.0", out1[8:]), ("3.branch2.0.0", out2[8:]), ("4.0", out3)):
        gid, index = taps[module]
        assert [(gid, k) for k in index] == seen, module


def test_attention_heads_are_structures_for_written_out_and_library_attention():
    heads = [g for g in _groups("transformer_block") if g.kind == "heads"]
    assert [g.size for g in heads] == [4, 4]
    assert _owners(heads[0], "out") == {"blocks.0.attn.q", "blocks.0.attn.k", "blocks.0.attn.v"}
    assert _owners(heads[1], "out") == {f"blocks.1.attn.{p}_proj" for p in "qkv"}
    assert all((s.index >= 0).sum() == 32 for s in heads[0].slots)  # 4 heads x 8 dims


def test_layernorm_keeps_the_stream_and_output_layer_is_never_gated():
    groups = _groups("transformer_block")
    owned = {s.module for g in groups for s in g.slots}
    assert "patch" not in owned and "head" not in owned and "norm" not in owned


def _pruned(name, ratio=0.5, seed=0):
    model = get_model(name).eval()
    gated = bmrs.attach_gates(model, torch.randn(_shape(name)))
    bank = gated.bmrs_gates
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bank.posterior[0].uniform_(-0.7, 0.0, generator=gen)
        bank.posterior[1].uniform_(-3, -1, generator=gen)
        bank.mask.copy_(random_masks(bank, ratio, gen).float())
    gated.eval()
    return gated, shrink(gated.analysis, bank)


def test_surgery_gives_plain_module_with_consistent_sizes_that_saves_and_loads(tmp_path):
    gated, pruned = _pruned("resnet_block")
    assert not any(type(m).__module__.startswith("bmrs_surgery") for m in pruned.modules())
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in pruned.modules())
    for m in pruned.modules():
        if isinstance(m, nn.Conv2d):
            assert m.weight.shape[:2] == (m.out_channels, m.in_channels // m.groups)
        if isinstance(m, nn.BatchNorm2d):
            assert m.running_mean.shape == (m.num_features,)
    torch.save(pruned, tmp_path / "p.pt")
    loaded = torch.load(tmp_path / "p.pt", weights_only=False)
    x = torch.randn(3, 3, 16, 16)
    torch.testing.assert_close(loaded(x), pruned(x))
    assert prove(gated, loaded, [x]).ok
    # the original network is untouched by surgery
    assert gated.model[1].conv2.weight.shape == (32, 32, 3, 3)


def test_heads_surgery_rewrites_literal_sizes():
    gated, pruned = _pruned("transformer_block", ratio=0.5)
    code = pruned.code
    assert "view(" in code and ", 2, 8)" in code  # 4 heads -> 2 kept, head_dim 8
    assert pruned.get_submodule("blocks.1.attn.q_proj").out_features == 16
    assert prove(gated, pruned, random_inputs(_shape("transformer_block"))).ok


def test_chunk_becomes_split_with_kept_sizes():
    gated, pruned = _pruned("shuffle_block", ratio=0.5)
    targets = {n.target for n in pruned.graph.nodes}
    assert "chunk" not in targets and torch.split in targets
    assert prove(gated, pruned, random_inputs(_shape("shuffle_block"))).ok


def test_broken_surgery_is_caught_and_names_the_group():
    from bmrs_surgery.verify import failing_group

    gated, _ = _pruned("lenet5", ratio=0.5)
    analysis = gated.analysis
    bank = gated.bmrs_gates
    # sabotage: forget that the producer's bias belongs to the second group
    analysis.propagation.slots = [s for s in analysis.propagation.slots if s.target != "3.bias"]
    pruned = shrink(analysis, bank)
    x = random_inputs(_shape("lenet5"))
    with pytest.raises(RuntimeError, match=r"bias of size \[16\]"):
        prove(gated, pruned, x)  # conv "3" lost output channels but kept all 16 biases
    assert failing_group(analysis, bank, bank.mask.bool(), gated, x).name == "3"


class Branchy(nn.Module):
    """A submodule with data-dependent control flow: fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        if x.sum() > 0:
            return self.conv(x)
        return -self.conv(x)


def test_untraceable_submodule_becomes_an_opaque_leaf_and_the_rest_is_pruned():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), Branchy(), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.ReLU(),
                          nn.Flatten(), nn.LazyLinear(4) if False else nn.Linear(16 * 10 * 10, 4))
    a = analyse(model, torch.randn(1, 3, 14, 14))
    assert a.opaque_modules == ["2"]
    assert [g.size for g in a.groups] == [16]  # channels into and out of the opaque module stay
    res = check_model(model, (1, 3, 14, 14), onnx=False)
    assert res.ok, res.stages


class Untraceable(nn.Module):
    """Data-dependent control flow in the top-level forward."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x) if x.sum() > 0 else x


def test_untraceable_top_level_names_the_model():
    with pytest.raises(GraphError, match="cannot trace Untraceable"):
        analyse(Untraceable(), torch.randn(1, 4))


def test_reshape_groups_pairs_dims():
    assert reshape_groups((1, 768, 14, 14), (1, 768, 196)) == [(range(0, 1), range(0, 1)), (range(1, 2), range(1, 2)),
                                                               (range(2, 4), range(2, 3))]
    assert reshape_groups((1, 197, 768), (1, 197, 12, 64))[-1] == (range(2, 3), range(2, 4))
    assert reshape_groups((1, 64, 7, 7), (1, 3136)) == [(range(0, 1), range(0, 1)), (range(1, 4), range(1, 2))]


def test_recorder_solves_unions_and_blocks():
    r = Recorder()
    a, b, c = r.fresh(3), r.fresh(3), r.fresh(2)
    r.unite(a, b)
    r.unite(b[:2], c)
    r.unite(np.array([a[2]]), np.array([-1]))
    sol = r.solve()
    cls = sol.classes(np.concatenate([a, b, c]))
    assert cls[0] == cls[3] == cls[6] and cls[1] == cls[4] == cls[7]
    assert cls[2] == cls[5] == -1  # blocked through the union
    assert len({cls[0], cls[1]}) == 2


def test_plan_rounds_widths_and_never_empties_a_group():
    from bmrs_surgery.plan import plan_keep

    gated = bmrs.attach_gates(get_model("lenet5"), torch.randn(1, 1, 32, 32))
    bank = gated.bmrs_gates
    keep = torch.zeros(bank.num_gates, dtype=torch.bool)
    keep[6:6 + 5] = True  # 5 of 16 channels of group "3"; group "0" loses everything
    score = torch.arange(bank.num_gates, dtype=torch.float64)
    plan = plan_keep(bank, keep, score, round_to=8)
    kept = [int(plan[bank.slice_of(i)].sum()) for i in range(len(bank.groups))]
    assert kept == [6, 8, 8, 8]  # 6 structures only (capped), 5 -> 8, 0 -> 1 -> 8
    assert bool(plan[6:11].all()) and bool(plan[11:14].all())  # the best-scored pruned come back first
    assert plan_keep(bank, keep)[:6].sum() == 1


def test_check_with_round_to_gives_multiples_of_eight():
    res = check_model(get_model("resnet_block"), _shape("resnet_block"), ratio=0.3, round_to=8, onnx=False)
    assert res.ok
    assert res.structures_kept % 8 == 0
