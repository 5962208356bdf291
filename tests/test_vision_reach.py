"""Reach in vision (issue 17): timm's attention heads, relative-position tables, model sources that
never download, and the reach that ``check`` reports. Real timm/torchvision architectures at small
sizes, random weights; every pruned network is proven equal to the gated one."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bmrs_surgery.check import check_model
from bmrs_surgery.errors import GatePlacementError
from bmrs_surgery.graph.export_trace import analyse_model as analyse_traced
from bmrs_surgery.graph.groups import analyse

timm = pytest.importorskip("timm")


def _vit(**kw):
    from timm.models.vision_transformer import VisionTransformer

    args = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4, num_classes=5)
    args.update(kw)
    return VisionTransformer(**args).eval()


def test_fused_qkv_gives_one_group_of_heads_per_block():
    model = _vit()
    analysis = analyse(model, torch.randn(1, 3, 32, 32))
    heads = [g for g in analysis.groups if g.kind == "heads"]
    assert len(heads) == 2  # one per block
    for g in heads:
        assert g.size == 4  # the four heads, not the 3 of (q, k, v) nor the 12 channels of a head
        assert g.channels_per_structure == 36  # 12 rows each of q, k and v
        rows = next(s for s in g.slots if s.target.endswith("attn.qkv.weight") and s.dim == 0)
        # qkv rows are (q|k|v, head, head_dim): row r belongs to head (r % 48) // 12
        assert rows.index.tolist() == [(r % 48) // 12 for r in range(144)]
        assert any(c.endswith("attn.proj") for c in g.consumers)


@pytest.mark.parametrize("fused", [True, False])
def test_vit_heads_pruned_with_proof(fused, monkeypatch):
    model = _vit()
    for blk in model.blocks:
        blk.attn.fused_attn = fused  # F.scaled_dot_product_attention, or q @ k.T / softmax / @ v
    res = check_model(model, (2, 3, 32, 32), ratio=0.5, onnx=False)
    assert res.ok, res.stages
    pruned_heads = res.structures - res.structures_kept
    assert pruned_heads > 0
    assert res.params_after < 0.8 * res.params_before
    assert 0.5 < res.reach < 1.0  # the residual stream under LayerNorm stays


def test_attention_width_read_from_the_input_is_rewritten():
    """``x.transpose(1, 2).reshape(B, N, C)`` with C the block's input width: after pruning heads the
    attention output is narrower than C, so the size is written as the kept count."""
    from timm.models.vision_transformer import Attention

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = Attention(32, num_heads=4)
            self.attn.fused_attn = False
            self.head = nn.Linear(32, 3)

        def forward(self, x):
            B, N, C = x.shape
            a = self.attn
            qkv = a.qkv(x).reshape(B, N, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
            x = ((q @ k.transpose(-2, -1)).softmax(-1) @ v).transpose(1, 2).reshape(B, N, C)
            return self.head(a.proj(x))

    res = check_model(Block().eval(), (2, 6, 32), ratio=0.5, onnx=False)
    assert res.ok, res.stages
    assert res.structures_kept < res.structures


def test_relative_position_table_shrinks_per_head():
    """timm's relative-position bias (an MLP over log coordinates gathered per token pair, added to
    the attention logits) follows the heads: the bias MLP's output rows go with them."""
    name = "vit_relpos_small_patch16_224"
    model = timm.create_model(name, img_size=32, patch_size=8, depth=2, num_heads=3, embed_dim=48,
                              num_classes=4).eval()
    analysis = analyse(model, torch.randn(1, 3, 32, 32))
    heads = [g for g in analysis.groups if g.kind == "heads"]
    assert heads and any(any("rel_pos" in s.target for s in g.slots) for g in heads)
    res = check_model(model, (2, 3, 32, 32), ratio=0.4, onnx=False)
    assert res.ok, res.stages


def test_mask_that_differs_per_head_keeps_the_heads_when_it_cannot_follow():
    """An additive mask with one row per head that does not come from the model's parameters
    (a buffer gathered with an index) cannot be sliced: the heads are kept, and the proof passes."""
    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(16, 48)
            self.proj = nn.Linear(16, 16)
            self.register_buffer("bias", torch.randn(4, 5, 5))

        def forward(self, x):
            B, N, C = x.shape
            q, k, v = self.qkv(x).reshape(B, N, 3, 4, 4).permute(2, 0, 3, 1, 4).unbind(0)
            y = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=self.bias[None] * 1.0)
            return self.proj(y.transpose(1, 2).reshape(B, N, 16))

    analysis = analyse(Masked().eval(), torch.randn(1, 5, 16))
    assert not [g for g in analysis.groups if g.kind == "heads"]


def test_timm_source_builds_without_downloading(monkeypatch):
    from bmrs_surgery.loading import build_arch

    def no_network(*a, **k):
        raise AssertionError("tried to download")

    monkeypatch.setattr("urllib.request.urlopen", no_network)
    net, shape = build_arch("timm:resnet10t", num_classes=7)
    assert shape == (3, 224, 224) or len(shape) == 3
    assert net(torch.randn(1, 3, 64, 64)).shape == (1, 7)


def test_unknown_timm_name_is_one_line():
    from bmrs_surgery.errors import ModelLoadError
    from bmrs_surgery.loading import build_arch

    with pytest.raises(ModelLoadError, match="unknown timm model 'no_such_net'"):
        build_arch("timm:no_such_net")


def test_torchvision_segmentation_builds_without_backbone_weights(monkeypatch):
    """fcn_resnet50's builder defaults to ImageNet backbone weights (a download); the source passes
    weights_backbone=None."""
    from bmrs_surgery import zoo

    def no_network(*a, **k):
        raise AssertionError("tried to download")

    monkeypatch.setattr("torch.hub.load_state_dict_from_url", no_network)
    monkeypatch.setattr("urllib.request.urlopen", no_network)
    net, shape = zoo.torchvision_model("lraspp_mobilenet_v3_large", num_classes=3)
    assert shape == (3, 224, 224)
    assert zoo.torchvision_kind("lraspp_mobilenet_v3_large") == "segmentation"
    assert zoo.torchvision_kind("r3d_18") == "video"
    out = net.eval()(torch.randn(1, 3, 64, 64))
    assert out["out"].shape == (1, 3, 64, 64)


def test_timm_classifier_input_is_prunable():
    """timm's Linear (its own forward calling F.linear) reads the head features like nn.Linear: a
    gate sits at its input, so the 1024 head channels of MobileNetV3 are a prunable group."""
    model = timm.create_model("mobilenetv3_small_050", num_classes=3).eval()
    analysis = analyse(model, torch.randn(1, 3, 64, 64))
    head = [g for g in analysis.groups if "classifier" in g.consumers]
    assert head and head[0].size == 1024
    res = check_model(model, (2, 3, 64, 64), onnx=False)
    assert res.ok, res.stages
    assert res.reach > 0.99


def test_a_layer_called_several_times_is_sliced_once():
    """CoaT's parallel blocks call one MLP three times (mlp2 = mlp3 = mlp4): its hidden layer is one
    group, its rows sliced once (slicing them per call ran past the end of the weight)."""
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.mlp(x) + self.mlp(2 * x) + self.mlp(-x))

    res = check_model(Shared().eval(), (2, 8), ratio=0.5, onnx=False)
    assert res.ok, res.stages
    assert res.structures_kept < res.structures


class _Functional(nn.Module):
    """conv -> F.group_norm (per channel or in groups) -> roll over space -> repeat over space -> conv."""

    def __init__(self, groups: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.gn = nn.GroupNorm(groups, 8)
        self.conv2 = nn.Conv2d(8, 4, 3)
        self.groups = groups

    def forward(self, x):
        x = nn.functional.group_norm(self.conv1(x), self.groups, self.gn.weight, self.gn.bias)
        x = torch.roll(x, shifts=(1, 2), dims=(2, 3)).repeat(1, 1, 2, 1)
        return self.conv2(x)


@pytest.mark.parametrize("groups,prunable", [(8, True), (2, False)])
def test_functional_group_norm_roll_repeat(groups, prunable):
    net = _Functional(groups).eval()
    analysis = analyse(net, torch.randn(1, 3, 6, 6))
    assert bool(analysis.groups) == prunable
    if prunable:  # one channel per group: the norm's weight and bias follow the channels
        (g,) = analysis.groups
        assert {s.target for s in g.slots} >= {"gn.weight", "gn.bias", "conv1.weight"}
        res = check_model(net, (2, 3, 6, 6), ratio=0.5, onnx=False)
        assert res.ok, res.stages
    else:
        assert any("group_norm" in why for _, why in analysis.propagation.opaque)


@pytest.mark.slow
def test_segmentation_dict_outputs_all_compared_in_onnx_runtime():
    """A segmentation network returns {"out", "aux"}: ONNX Runtime is compared on both."""
    from torchvision.models import segmentation

    from bmrs_surgery.export import _flat_outputs, onnx_parity

    net = segmentation.deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=3,
                                                    aux_loss=True).eval()
    x = torch.randn(2, 3, 64, 64)
    assert [t.shape[1] for t in _flat_outputs(net(x))] == [3, 3]
    assert onnx_parity(net, (2, 3, 64, 64), [x]) < 1e-3


@pytest.mark.slow
def test_detector_parts_pruned_with_proof_inside_its_own_control_flow():
    """Faster R-CNN's top level does not trace; its backbone+FPN, RPN head (one feature map at a
    time) and box head do: each is pruned and proven, put back into the untouched detector, and
    the detector's boxes, scores and labels equal the gated detector's."""
    from bmrs_surgery import zoo
    from bmrs_surgery.check import randomized_copy
    from bmrs_surgery.graph.partial import detection_outputs, prune_parts
    from bmrs_surgery.surgery import parameter_count
    from bmrs_surgery.verify import compare

    net, _ = zoo.torchvision_model("fasterrcnn_mobilenet_v3_large_320_fpn")
    net = randomized_copy(net, torch.Generator().manual_seed(0)).eval()
    net.roi_heads.score_thresh = 0.0
    with torch.no_grad():  # confident classes: near-equal random scores make the top-100 boxes noise
        net.roi_heads.box_predictor.cls_score.weight.mul_(30.0)
    images = torch.rand(1, 3, 320, 320, generator=torch.Generator().manual_seed(0))
    pruned, reference, parts = prune_parts(net, images)
    assert [p.name for p in parts] == ["backbone", "rpn.head", "roi_heads.box_head"]
    assert all(p.ok and p.params_after < p.params_before for p in parts), parts
    assert parameter_count(pruned) < 0.8 * parameter_count(net)
    proof = compare([detection_outputs(reference, images)], [detection_outputs(pruned, images)])
    assert proof.ok, proof
    assert len(detection_outputs(pruned, images)[0]) > 0  # boxes were compared, not two empty lists


@pytest.mark.slow
def test_check_falls_back_to_the_detectors_traceable_parts():
    """``bmrs-compress check`` on a detector: the top level traces with neither front end, so check
    prunes its parts at random, proves and exports each, and compares the whole detector's boxes,
    scores and labels with the gated one's; the result says it was partial and lists the parts."""
    import json

    from click.testing import CliRunner

    from cli.main import cli

    out = CliRunner().invoke(cli, ["check", "torchvision:fasterrcnn_mobilenet_v3_large_320_fpn", "--json"])
    assert out.exit_code == 0, out.output
    res = json.loads(out.output[out.output.index("{"):])
    assert res["ok"] and res["tracer"] == "partial"
    assert list(res["stages"]) == ["trace", "parts", "whole"]
    assert res["opaque"][0].startswith("top level: ")  # why the top level was not traced
    parts = {p["name"]: p for p in res["parts"]}
    assert list(parts) == ["backbone", "rpn.head", "roi_heads.box_head"]
    for p in parts.values():
        assert p["ok"] and p["params_after"] < p["params_before"], p
        assert p["stages"]["onnx"] == "ok" and p["onnx_max_abs_diff"] < 1e-3, p
    assert res["params_after"] < 0.8 * res["params_before"]


@pytest.mark.slow
def test_yolo_from_ultralytics_yaml_prunes_with_proof():
    """YOLOv8n from ultralytics' YAML: C2f split and concatenation, SPPF, the Detect head kept."""
    pytest.importorskip("ultralytics")
    from bmrs_surgery import zoo

    net, shape = zoo.yolo_model("yolov8n.yaml")
    assert shape == (3, 320, 320)
    res = check_model(net, (2, 3, 128, 128), onnx=False)
    assert res.ok, res.stages
    assert res.params_after < 0.75 * res.params_before
    assert any("Detect" in why for why in res.opaque)  # the head is kept whole, and said so


def test_coverage_table_counts_passes_and_removals():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("coverage_bench", Path(__file__).parent.parent / "benchmarks" / "coverage.py")
    cov = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cov)
    rows = [
        {"kind": "timm", "family": "a", "spec": "timm:a", "ok": True, "params_before": 100, "params_after": 60,
         "stages": {"verify": "ok"}, "torch_pruning": {"ok": True, "ratio": 0.8}},
        {"kind": "timm", "family": "b", "spec": "timm:b", "ok": True, "params_before": 100, "params_after": 90,
         "stages": {"verify": "ok"}, "torch_pruning": {"ok": False, "error": "boom"},
         "opaque": ["norm1: LayerNorm normalises over channels", "norm2: LayerNorm normalises over channels",
                    "f: no rule for f"]},
        {"kind": "timm", "family": "c", "spec": "timm:c", "ok": False, "stages": {"trace": "cannot trace"}},
        {"kind": "timm", "family": "d", "spec": "timm:d", "ok": True, "params_before": 100, "params_after": 80,
         "stages": {"verify": "ok"}, "opaque": ["g: no rule for g"]},
    ]
    # models, pass, ratio <= 0.75, ratio > 0.75 held by a LayerNorm stream (b, not d), TP pass, TP <= 0.75
    assert "| timm | 4 | 3 | 1 | 1 | 1 | 0 |" in cov.summary(rows)
    table = cov.table(rows)
    assert "trace: cannot trace" in table and "TP: boom" in table
    # what keeps a row above 0.75: LayerNorm first, then the next most frequent reason
    assert "| LayerNorm normalises over channels; no rule for f |" in table
    assert "| no rule for g |" in table


def test_channels_merged_with_the_batch_axis_are_kept():
    """HaloNet's ``q.reshape(B * heads, dim_head, -1)``: at the analysis's batch of 1 the heads look
    like the first axis; at batch 2 they are not, so those channels stay (the proof failed before)."""
    class MergedHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = nn.Conv2d(3, 8, 1)
            self.out = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            B, _, H, W = x.shape
            q = self.q(x).reshape(B * 2, 4, H * W).softmax(-1)
            return self.out(q.reshape(B, 8, H, W))

    res = check_model(MergedHeads().eval(), (2, 3, 5, 5), ratio=0.5, onnx=False)
    assert res.stages.get("verify") in ("ok", None), res.stages
    assert res.stages["groups"] != "ok" or res.ok


def test_sliding_windows_over_space_keep_channels_prunable():
    class Halo(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 1)
            self.b = nn.Linear(8, 5)

        def forward(self, x):
            w = self.a(x).unfold(2, 3, 1).unfold(3, 3, 1)  # (B, 8, 4, 4, 3, 3)
            return self.b(w.mean((4, 5)).permute(0, 2, 3, 1))

    analysis = analyse(Halo().eval(), torch.randn(1, 3, 6, 6))
    assert [g.size for g in analysis.groups] == [8]
    res = check_model(Halo().eval(), (2, 3, 6, 6), ratio=0.5, onnx=False)
    assert res.ok, res.stages


class _EagerHeads(nn.Module):
    """Hiera's attention in small: the head count and the output width are the module's own
    attributes, written into its reshapes."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.proj = nn.Linear(8, 8)
        self.heads, self.head_dim, self.dim_out = 2, 4, 8

    def forward(self, x):
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        y = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(B, -1, self.dim_out))


class _OptionalMask(nn.Module):
    """A forward with an optional mask (Hiera's): torch.fx traces ``mask`` as a tensor, the trace
    fails, and torch.export captures the model instead."""

    def __init__(self):
        super().__init__()
        self.attn = _EagerHeads()
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
        self.head = nn.Linear(8, 3)

    def forward(self, x, mask=None):
        if mask is not None:
            x = x * mask[..., None]
        x = x + self.attn(x)
        return self.head(x + self.mlp(x))


def test_sizes_in_eager_code_keep_their_channels_under_torch_export():
    """A torch.export graph is analysis only: the pruned network is the eager model, whose
    ``reshape(B, N, 3, self.heads, self.head_dim)`` and ``reshape(B, -1, self.dim_out)`` nobody
    rewrites. Those heads are kept, with a reason (the pruned model failed to run before: "mat1 and
    mat2 shapes cannot be multiplied", timm:hiera_tiny_224); the MLP is still pruned."""
    res = check_model(_OptionalMask().eval(), (2, 5, 8), ratio=0.5, onnx=False)
    assert res.tracer == "export"
    assert res.ok, res.stages
    assert res.structures_kept < res.structures  # the MLP's hidden neurons
    assert any("cannot follow pruned channels" in why for why in res.opaque), res.opaque
    analysis = analyse_traced(_OptionalMask().eval(), torch.randn(1, 5, 8))
    assert not [g for g in analysis.groups if g.kind == "heads"]


def test_hiera_prunes_with_proof():
    model = timm.create_model("hiera_tiny_224", embed_dim=16, num_heads=1, stages=(1, 2, 1, 1),
                              num_classes=5).eval()
    res = check_model(model, (2, 3, 224, 224), ratio=0.5, onnx=False)
    assert res.ok, res.stages
    assert res.params_after < 0.9 * res.params_before


class _DctStem(nn.Module):
    """CSATv2's stem in small: input statistics held in buffers (a variance under a square root)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.full((4,), 0.5))
        self.register_buffer("var", torch.full((4,), 4.0))
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(self.fc1((x - self.mean) / self.var ** 0.5).relu())


def test_random_weights_leave_constant_buffers_as_built():
    """check draws the weights and norm statistics anew, not the model's constants: a random
    ``var`` buffer went negative under CSATv2's square root and the outputs were NaN ("max abs diff
    inf", blamed on a group)."""
    from bmrs_surgery.check import randomized_copy

    net = nn.Sequential(_DctStem(), nn.BatchNorm1d(3))
    copy = randomized_copy(net, torch.Generator().manual_seed(0))
    assert torch.equal(copy[0].var, net[0].var) and torch.equal(copy[0].mean, net[0].mean)
    assert not torch.equal(copy[1].running_var, net[1].running_var)  # norm statistics are drawn
    assert not torch.equal(copy[0].fc1.weight, net[0].fc1.weight)
    res = check_model(_DctStem().eval(), (2, 4), ratio=0.5, onnx=False)
    assert res.ok, res.stages


def test_outputs_that_are_not_finite_are_said_so():
    class Inf(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(4, 8)
            self.fc2 = nn.Linear(8, 3)

        def forward(self, x):
            return self.fc2(self.fc1(x).relu()) / 0.0

    res = check_model(Inf().eval(), (2, 4), ratio=0.5, onnx=False)
    assert "not finite" in res.stages["verify"] and not res.ok


def test_s3d_gets_an_input_it_accepts():
    """S3D pools its last features with a fixed (2, 7, 7) kernel: the 16 x 112 x 112 clips of the
    other video models leave 4 x 4 there and fail; its default is 16 x 224 x 224 (run on the meta
    device: shapes only)."""
    from bmrs_surgery import zoo

    net, shape = zoo.torchvision_model("s3d", num_classes=4)
    assert shape == (3, 16, 224, 224)
    net = net.to("meta").eval()
    assert net(torch.empty((1,) + shape, device="meta")).shape == (1, 4)
    with pytest.raises(RuntimeError):
        net(torch.empty((1,) + zoo.TORCHVISION_SHAPES["video"], device="meta"))


class Chaotic(nn.Module):
    """sin(gain * fc2(relu(fc1(x)))): float rounding in front of the sine, times ``gain``."""

    def __init__(self, gain: float):
        super().__init__()
        self.fc1 = nn.Linear(4, 16)
        self.fc2 = nn.Linear(16, 3)
        self.gain = gain

    def forward(self, x):
        return torch.sin(self.gain * self.fc2(self.fc1(x).relu()))


def test_a_network_that_amplifies_float32_rounding_is_proved_in_float64():
    """timm:efficientvit_m0 with random weights: activations reach 1e3 in front of its softmaxes, and
    the float32 proof misses the tolerance from rounding alone. check proves it again in float64
    (the surgery redone on a float64 copy): a gain of 1e6 on float32 rounding breaks the float32
    proof, but not the float64 one."""
    res = check_model(Chaotic(1e6).eval(), (2, 4), ratio=0.5, onnx=False)
    assert res.ok and res.proof_dtype == "float64"
    assert res.float32_max_abs_diff > 1e-4 * res.output_scale  # float32 alone fails
    assert res.max_abs_diff <= 1e-4 * res.output_scale
    plain = check_model(Chaotic(1.0).eval(), (2, 4), ratio=0.5, onnx=False)
    assert plain.ok and plain.proof_dtype == "float32" and plain.float32_max_abs_diff is None
    # ONNX Runtime runs the same float32 network in another operation order: held to twice the
    # rounding level the float32 proof measured, said in the result
    exported = check_model(Chaotic(1e6).eval(), (2, 4), ratio=0.5, onnx=True)
    assert exported.ok and exported.stages["onnx"] == "ok" and exported.proof_dtype == "float64"
    assert exported.onnx_tolerance == pytest.approx(2 * exported.float32_max_abs_diff / exported.output_scale)
    assert plain.onnx_tolerance is None


class Float32Chaotic(Chaotic):
    """Chaotic, with a float32 tensor attribute (not a buffer) that a float64 copy cannot multiply."""

    def __init__(self, gain: float):
        super().__init__(gain)
        self.mix = torch.eye(3)

    def forward(self, x):
        return super().forward(x) @ self.mix


def test_a_network_that_amplifies_rounding_is_not_blamed_on_a_group():
    """A network that amplifies float32 rounding and cannot run in float64 keeps the float32
    verdict: check says rounding is to blame instead of naming a group that broke equivalence."""
    res = check_model(Float32Chaotic(1e6).eval(), (2, 4), ratio=0.5, onnx=False)
    assert not res.ok and res.proof_dtype == "float32"
    assert "amplifies rounding" in res.stages["verify"] and "group" not in res.stages["verify"].split(";")[0]


def _timm_norm(name: str, channels_last: bool):
    from timm.layers.grn import GlobalResponseNorm
    from timm.layers.norm import RmsNorm, RmsNorm2d
    from timm.layers.norm_act import RmsNormAct2d

    if name == "grn":
        return GlobalResponseNorm(24, channels_last=channels_last)
    if name == "rms":
        return RmsNorm(24) if channels_last else RmsNorm2d(24)
    return RmsNormAct2d(24, act_layer=nn.GELU)


class NormMlp(nn.Module):
    """ConvNeXt-V2's MLP: fc1, GELU, a timm norm over the channels (GlobalResponseNorm, RmsNorm2d,
    RmsNormAct2d; RmsNorm on NHWC), fc2: 1x1 convolutions on NCHW, or linear layers on NHWC with
    ``channels_last``."""

    def __init__(self, norm: str, channels_last: bool):
        super().__init__()
        layer = nn.Linear if channels_last else (lambda i, o: nn.Conv2d(i, o, 1))
        self.channels_last = channels_last
        self.fc1, self.act, self.fc2 = layer(8, 24), nn.GELU(), layer(24, 8)
        self.norm = _timm_norm(norm, channels_last)

    def forward(self, x):
        if self.channels_last:
            x = x.permute(0, 2, 3, 1)
        x = self.fc2(self.norm(self.act(self.fc1(x))))
        return x.permute(0, 3, 1, 2) if self.channels_last else x


@pytest.mark.parametrize("norm,channels_last", [("grn", False), ("grn", True), ("rms", False), ("rms", True),
                                                ("rms_act", False)])
def test_norms_over_channels_are_pruned_exactly(norm, channels_last, monkeypatch):
    """GRN's statistic is a mean over channels, RMSNorm's too: a mask tap zeroes a removed channel at
    the norm's input and the narrower norm is rescaled (GRN: weight and eps by C/C'; RMSNorm: weight
    by sqrt(C/C'), eps by C/C'). Without that rescale the proof fails."""
    from bmrs_surgery.graph import registry

    net = NormMlp(norm, channels_last).eval()
    groups = analyse(net, torch.randn(1, 8, 6, 6)).groups
    hidden = next(g for g in groups if "norm" in g.norms)
    assert hidden.size == 24 and hidden.consumers == ["fc2"]
    assert [t.side for t in hidden.taps if t.module == "norm"] == ["mask"]
    res = check_model(net, (2, 8, 6, 6), ratio=0.5, onnx=True)
    assert res.ok, res.stages
    assert res.params_after < res.params_before and res.max_abs_diff <= 1e-4 * res.output_scale
    rule = type(registry.module_rule(net.norm))
    monkeypatch.setattr(rule, "rescale", lambda self, module, width: None)
    broken = check_model(NormMlp(norm, channels_last).eval(), (2, 8, 6, 6), ratio=0.5, onnx=False)
    assert not broken.ok and "max abs diff" in broken.stages["verify"]


def test_convnext_v2_prunes_its_mlp_through_global_response_norm():
    res = check_model(timm.create_model("convnextv2_atto").eval(), (2, 3, 224, 224), ratio=0.3, onnx=False)
    assert res.ok, res.stages
    assert res.params_after / res.params_before < 0.8  # the MLPs (GRN) pruned; the LayerNorm stream kept


def test_instance_norm_without_affine_passes_its_channels():
    """Statistics per channel over space only (RAFT's encoders): a removed channel changes nothing
    else, so the channels on either side stay one prunable group."""
    net = nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.InstanceNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3))
    groups = analyse(net, torch.randn(1, 2, 6, 6)).groups
    assert [g.size for g in groups] == [8]
    res = check_model(net.eval(), (2, 2, 6, 6), ratio=0.5, onnx=False)
    assert res.ok and res.params_after < res.params_before


@pytest.mark.slow
def test_raft_prunes_its_encoders_and_update_block_inside_its_own_loop():
    """RAFT's top level takes two frames and iterates its update block in Python: check feeds it two
    random frames, prunes the feature and context encoders and the update block as parts (the block
    takes four tensors: hidden state, context, correlation features, flow; analysed as one packed
    input), and compares the flows of the whole model (its loop around the pruned parts) with the
    gated model's."""
    from bmrs_surgery import zoo
    from bmrs_surgery.graph.partial import Packed, find_parts

    net, shape = zoo.torchvision_model("raft_small")
    frames = tuple(torch.rand((1,) + tuple(shape)) for _ in range(2))
    parts = {p.name: p for p in find_parts(net.eval(), frames)}
    assert set(parts) == {"feature_encoder", "context_encoder", "update_block"}
    block = parts["update_block"]
    assert isinstance(block.module, Packed) and block.module.sizes == [96, 64, 196, 2]
    res = check_model(net.eval(), (2,) + tuple(shape), ratio=0.3, onnx=False)
    assert res.ok, res.stages
    assert res.tracer == "partial" and {p["name"] for p in res.parts} == set(parts)
    assert res.reach > 0.5  # 0.23 with the flow head alone: the motion encoder is most of the block
    assert res.params_after < res.params_before and res.stages["whole"] == "ok"


class _PoolIfSmall(nn.Module):
    """timm's VGG ``ConvMlp`` in small: a branch on the input's size, which torch.fx cannot trace."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Conv2d(8, 32, 3)
        self.fc2 = nn.Conv2d(32, 16, 1)

    def forward(self, x):
        if x.shape[-1] < 3:
            x = nn.functional.adaptive_avg_pool2d(x, 3)
        return self.fc2(torch.relu(self.fc1(x)))


class _Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.mix = nn.Conv2d(6, 8, 1)
        self.pre_logits = _PoolIfSmall()
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = self.pre_logits(torch.relu(self.mix(torch.relu(self.stem(x)))))
        return self.fc(x.mean((2, 3)))


def test_auto_tracer_sees_inside_a_module_fx_keeps_whole():
    """fx keeps the branching module whole (its channels out of reach); torch.export specialises on
    the example's size and sees its convolutions: ``auto`` takes the capture that reaches more."""
    torch.manual_seed(0)
    model, x = _Head().eval(), torch.randn(1, 3, 8, 8)
    fx_analysis = analyse_traced(model, x, tracer="fx")
    assert fx_analysis.opaque_modules == ["pre_logits"]
    auto = analyse_traced(model, x)
    assert auto.tracer == "export" and auto.fx_opaque_modules == ["pre_logits"]
    from bmrs_surgery.graph.groups import prunable_share

    assert prunable_share(fx_analysis) < 0.1 and prunable_share(auto) > 0.9
    res = check_model(model, (1, 3, 8, 8), ratio=0.3, onnx=False)
    assert res.ok and res.tracer == "export" and res.params_after < 0.8 * res.params_before
    # where fx finds no group at all (only the opaque module has channels to prune), auto still
    # captures it with torch.export; --tracer fx says why it found none
    alone = nn.Sequential(_PoolIfSmall(), nn.Flatten(), nn.Linear(16 * 6 * 6, 4)).eval()
    with pytest.raises(GatePlacementError, match="no prunable structure"):
        analyse_traced(alone, x[:, :1].expand(1, 8, 8, 8), tracer="fx")
    assert analyse_traced(alone, x[:, :1].expand(1, 8, 8, 8)).tracer == "export"


def test_rotary_attention_heads_of_eva_and_dinov3_are_pruned():
    """timm's ``AttentionRope`` (EVA, DINOv3): the fused projection is ``F.linear`` on the qkv
    weight with a bias concatenated from q/k/v biases, split as ``reshape(B, N, 3, heads, -1)``,
    q and k rotated by a table over head_dim (a product broadcast along the heads) and cast with
    ``type_as(v)``. Each of these once hid the heads; now every block has a heads group, proven."""
    model = timm.create_model("vit_tiny_patch16_dinov3_qkvb", depth=2, img_size=64, pretrained=False).eval()
    analysis = analyse(model, torch.randn(1, 3, 64, 64))
    heads = [g for g in analysis.groups if g.kind == "heads"]
    assert len(heads) == 2 and all(g.size == 3 for g in heads)  # 3 heads of 64 channels, one group per block
    assert not [o for o in analysis.propagation.opaque if "attention over channels" in o[1]]
    res = check_model(model, (1, 3, 64, 64), ratio=0.3, onnx=False)
    assert res.ok, res.stages
    assert res.reach > 0.8  # 0.57 with the MLP hidden layers alone


def test_a_product_broadcast_along_the_other_operands_channels_keeps_them():
    """``x * table`` where ``x`` carries channels on axis 1 and ``table`` (labelled on its own last
    axis) is broadcast along axis 1: x's channels pass, the table's are kept whole. Where the
    table is not broadcast along x's channel axis, both are kept."""

    class Rotate(nn.Module):
        def __init__(self, broadcast: bool):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 1)
            self.table = nn.Parameter(torch.randn(1 if broadcast else 8, 5, 5))
            self.out = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            return self.out(self.conv(x) * self.table)

    x = torch.randn(1, 3, 5, 5)
    assert [g.size for g in analyse(Rotate(True).eval(), x).groups] == [8]
    assert analyse(Rotate(False).eval(), x).groups == []


def test_heads_merged_with_the_batch_by_a_computed_size_are_kept():
    """SAM's attention splits qkv as ``view(B, N, 3, heads, -1)`` and then merges the batch with the
    heads, ``reshape(3, B * heads, H * W, -1)``: a size computed as a product, which pruned heads
    could not follow at another batch size. Its heads are kept; the network is proven."""
    from timm.models.vision_transformer_sam import VisionTransformerSAM

    model = VisionTransformerSAM(img_size=64, patch_size=16, embed_dim=64, depth=1, num_heads=2, use_rel_pos=True,
                                 num_classes=3, global_pool="avg").eval()
    analysis = analyse(model, torch.randn(1, 3, 64, 64))
    assert not [g for g in analysis.groups if g.kind == "heads"]
    res = check_model(model, (2, 3, 64, 64), ratio=0.3, onnx=False)
    assert res.ok, res.stages
