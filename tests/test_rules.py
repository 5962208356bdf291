"""The operation-rule registry: every built-in module rule proven on a network that uses it, the
rules added through it (functional batch norm, 3-D convolutions), and a user's own layer."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bmrs_surgery import rules
from bmrs_surgery.check import check_model
from bmrs_surgery.graph.registry import module_rule
from bmrs_surgery.placement import find_groups


def _between(layer: nn.Module, c: int = 8, dims: int = 2) -> nn.Module:
    """conv(c) -> layer -> conv: the layer sits on a prunable channel group."""
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    return nn.Sequential(conv(2, c, 3, padding=1), layer, conv(c, 4, 3, padding=1))


# One network per built-in module rule, with its input shape: the table the registry is checked
# against, so a new rule without an example here fails `test_every_module_rule_has_an_example`.
EXAMPLES = {
    nn.Linear: (lambda: nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)), (2, 6)),
    nn.Conv1d: (lambda: _between(nn.ReLU(), dims=1), (2, 2, 9)),
    nn.Conv2d: (lambda: _between(nn.Conv2d(8, 8, 3, padding=1, groups=2)), (2, 2, 6, 6)),
    nn.Conv3d: (lambda: _between(nn.ReLU(), dims=3), (2, 2, 4, 5, 5)),
    nn.Embedding: (lambda: nn.Sequential(nn.Embedding(11, 8), nn.Linear(8, 3)), None),
    nn.BatchNorm1d: (lambda: _between(nn.BatchNorm1d(8), dims=1), (2, 2, 9)),
    nn.BatchNorm2d: (lambda: _between(nn.BatchNorm2d(8)), (2, 2, 6, 6)),
    nn.BatchNorm3d: (lambda: _between(nn.BatchNorm3d(8), dims=3), (2, 2, 4, 5, 5)),
    nn.InstanceNorm1d: (lambda: _between(nn.InstanceNorm1d(8, affine=True), dims=1), (2, 2, 9)),
    nn.InstanceNorm2d: (lambda: _between(nn.InstanceNorm2d(8, affine=True)), (2, 2, 6, 6)),
    nn.InstanceNorm3d: (lambda: _between(nn.InstanceNorm3d(8, affine=True), dims=3), (2, 2, 4, 5, 5)),
    nn.GroupNorm: (lambda: _between(nn.GroupNorm(8, 8)), (2, 2, 6, 6)),
    nn.LayerNorm: (lambda: nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5), nn.LayerNorm(5), nn.Linear(5, 3)),
                   (2, 6)),
    nn.PReLU: (lambda: _between(nn.PReLU(8)), (2, 2, 6, 6)),
    nn.Flatten: (lambda: nn.Sequential(nn.Conv2d(2, 8, 3), nn.Flatten(), nn.Linear(8 * 16, 3)), (2, 2, 6, 6)),
    nn.Softmax: (lambda: nn.Sequential(nn.Linear(6, 8), nn.Softmax(dim=0), nn.Linear(8, 3)), (2, 6)),
}
for t in (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh,
          nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Identity, nn.Dropout,
          nn.Dropout2d, nn.AlphaDropout):
    EXAMPLES[t] = (lambda t=t: _between(t()), (2, 2, 6, 6))
EXAMPLES[nn.Dropout1d] = (lambda: _between(nn.Dropout1d(), dims=1), (2, 2, 9))
EXAMPLES[nn.Dropout3d] = (lambda: _between(nn.Dropout3d(), dims=3), (2, 2, 4, 5, 5))
for t in (nn.MaxPool2d, nn.AvgPool2d):
    EXAMPLES[t] = (lambda t=t: _between(t(2)), (2, 2, 6, 6))
for t in (nn.MaxPool1d, nn.AvgPool1d):
    EXAMPLES[t] = (lambda t=t: _between(t(2), dims=1), (2, 2, 9))
for t in (nn.MaxPool3d, nn.AvgPool3d):
    EXAMPLES[t] = (lambda t=t: _between(t(2), dims=3), (2, 2, 4, 5, 5))
for t, dims in ((nn.AdaptiveAvgPool1d, 1), (nn.AdaptiveMaxPool1d, 1), (nn.AdaptiveAvgPool2d, 2),
                (nn.AdaptiveMaxPool2d, 2), (nn.AdaptiveAvgPool3d, 3), (nn.AdaptiveMaxPool3d, 3)):
    EXAMPLES[t] = (lambda t=t, dims=dims: _between(t(3), dims=dims),
                   {1: (2, 2, 9), 2: (2, 2, 6, 6), 3: (2, 2, 4, 5, 5)}[dims])
for t in (nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d):
    EXAMPLES[t] = (lambda t=t: _between(t(scale_factor=2)), (2, 2, 6, 6))
for t, dims in ((nn.ConvTranspose1d, 1), (nn.ConvTranspose2d, 2), (nn.ConvTranspose3d, 3)):
    # conv -> transposed conv (input channels read through dim 0 of its weight) -> conv
    EXAMPLES[t] = (lambda t=t, dims=dims: _between(nn.Sequential(t(8, 6, 2, stride=2), nn.ReLU(),
                                                                 {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims](6, 8, 1)),
                                                   dims=dims),
                   {1: (2, 2, 9), 2: (2, 2, 6, 6), 3: (2, 2, 4, 5, 5)}[dims])
EXAMPLES[nn.PixelShuffle] = (lambda: nn.Sequential(_between(nn.ReLU(), c=8), nn.Conv2d(4, 8, 1), nn.PixelShuffle(2),
                                                   nn.Conv2d(2, 3, 3)), (2, 2, 6, 6))
EXAMPLES[nn.PixelUnshuffle] = (lambda: nn.Sequential(_between(nn.ReLU(), c=8), nn.PixelUnshuffle(2), nn.Conv2d(16, 3, 1)),
                               (2, 2, 6, 6))

try:  # timm's copies of torch layers are registered once timm is imported (rules/timm_layers.py)
    import timm.layers as timm_layers
    from timm.layers.conv2d_same import Conv2dSameExport
    from timm.layers.grn import GlobalResponseNorm

    from bmrs_surgery.graph.rules.timm_layers import register_loaded

    register_loaded()
    EXAMPLES[timm_layers.Linear] = (
        lambda: nn.Sequential(nn.Linear(6, 8), nn.ReLU(), timm_layers.Linear(8, 7), nn.ReLU(), timm_layers.Linear(7, 3)),
        (2, 6))
    EXAMPLES[timm_layers.Conv2dSame] = (lambda: _between(timm_layers.Conv2dSame(8, 8, 3, stride=2)), (2, 2, 7, 7))
    EXAMPLES[Conv2dSameExport] = (lambda: _between(Conv2dSameExport(8, 8, 3, stride=2)), (2, 2, 7, 7))
    from timm.layers import norm as timm_norm
    from timm.layers import norm_act as timm_norm_act

    for cls in (timm_norm.RmsNorm2d, timm_norm.RmsNorm2dFp32, timm_norm_act.RmsNormAct2d,
                timm_norm_act.RmsNormAct2dFp32):  # RMSNorm over NCHW channels, rescaled after surgery
        EXAMPLES[cls] = (lambda cls=cls: _between(cls(8)), (2, 2, 6, 6))
    for cls in (timm_norm.RmsNorm, timm_norm.RmsNormFp32, timm_norm_act.RmsNormAct, timm_norm_act.RmsNormActFp32):
        EXAMPLES[cls] = (lambda cls=cls: nn.Sequential(nn.Linear(6, 8), cls(8), nn.Linear(8, 3)), (2, 6))
    for cls in (timm_norm.SimpleNorm2d, timm_norm.SimpleNorm2dFp32):  # channels kept; the next group pruned
        EXAMPLES[cls] = (lambda cls=cls: nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), cls(8), nn.Conv2d(8, 6, 1),
                                                       nn.ReLU(), nn.Conv2d(6, 4, 1)), (2, 2, 6, 6))
    for cls in (timm_norm.SimpleNorm, timm_norm.SimpleNormFp32):
        EXAMPLES[cls] = (lambda cls=cls: nn.Sequential(nn.Linear(6, 8), cls(8), nn.Linear(8, 7), nn.ReLU(),
                                                       nn.Linear(7, 3)), (2, 6))
    from timm.layers import std_conv

    for cls in (std_conv.StdConv2d, std_conv.ScaledStdConv2d):  # weight standardisation: frozen before slicing
        EXAMPLES[cls] = (lambda cls=cls: _between(nn.Sequential(cls(8, 6, 3, padding=1), nn.ReLU(), cls(6, 8, 1))),
                         (2, 2, 6, 6))
    for cls in (std_conv.StdConv2dSame, std_conv.ScaledStdConv2dSame):
        EXAMPLES[cls] = (lambda cls=cls: _between(nn.Sequential(cls(8, 6, 3, stride=2), nn.ReLU(), cls(6, 8, 1))),
                         (2, 2, 7, 7))
    EXAMPLES[GlobalResponseNorm] = (  # ConvNeXt-V2's norm: a mean over the channels
        lambda: _between(nn.Sequential(nn.GELU(), GlobalResponseNorm(8, channels_last=False))),
        (2, 2, 6, 6))
except ImportError:
    pass


try:  # transformers' Conv1D is registered once transformers is loaded (rules/transformers_layers.py)
    from transformers.pytorch_utils import Conv1D

    from bmrs_surgery.graph.rules import transformers_layers

    transformers_layers.register()
    EXAMPLES[Conv1D] = (lambda: nn.Sequential(nn.Linear(6, 8), nn.ReLU(), Conv1D(7, 8), nn.ReLU(), Conv1D(3, 7)), (2, 6))
except ImportError:
    pass


def test_every_module_rule_has_an_example():
    """Every rule registered for a layer class has an example below, except what a traced
    transformers model registers for its own classes at capture time (its norms, Gemma's scaled
    embedding; tested in test_transformers.py and test_hidden_size.py)."""
    registered = {t for t in rules.module_rules() if not t.__module__.startswith("transformers.models.")}
    assert registered == set(EXAMPLES)


@pytest.mark.parametrize("layer", sorted(EXAMPLES, key=lambda t: t.__name__), ids=lambda t: t.__name__)
def test_module_rule_prunes_exactly(layer):
    """Random keep-masks on every group, surgery, and the proof that nothing changed."""
    build, shape = EXAMPLES[layer]
    torch.manual_seed(0)
    net = build()
    if shape is None:  # token ids
        return _check_embedding(net)
    res = check_model(net, shape, ratio=0.4, onnx=False)
    assert res.ok, res.stages
    assert res.groups >= 1 and res.structures_kept < res.structures
    assert any(isinstance(m, layer) for m in net.modules())


def _check_embedding(net):
    from bmrs_surgery.gated import attach_gates
    from bmrs_surgery.surgery import shrink
    from bmrs_surgery.verify import prove

    ids = torch.randint(0, 11, (2, 5))
    gated = attach_gates(net, ids)
    bank = gated.bmrs_gates
    (group,) = bank.groups
    assert group.producers == ["0"] and group.consumers == ["1"]
    keep = torch.arange(bank.num_gates) % 2 == 0
    bank.mask.copy_(keep.float())
    gated.eval()
    small = shrink(gated.analysis, bank, keep)
    assert small.get_submodule("0").embedding_dim == 4
    assert prove(gated, small, [ids]).ok


# -- rules added through the registry --------------------------------------------------------------

class BatchNormAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d in miniature: its own forward calls F.batch_norm, then an activation."""

    def forward(self, x):
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return F.relu(x)


def test_functional_batch_norm_follows_its_channels():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), BatchNormAct(8), nn.Conv2d(8, 4, 3))
    assert module_rule(net[1]) is None  # its own forward: traced through, not treated as BatchNorm2d
    (group,) = find_groups(net, torch.randn(1, 3, 8, 8))
    owned = {(s.target, s.role) for s in group.slots}
    assert {("1.weight", "norm"), ("1.bias", "norm"), ("1.running_mean", "norm"), ("1.running_var", "norm")} <= owned
    assert group.norms == ["1"] and group.producers == ["0"]
    with torch.no_grad():
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(0.5, 2)
    res = check_model(net, (2, 3, 8, 8), ratio=0.5, keep_weights=True)
    assert res.ok, res.stages
    assert res.structures_kept == 4


def test_functional_batch_norm_over_another_axis_keeps_the_channels():
    class Odd(nn.Module):  # batch_norm applied to a transposed tensor: its statistics are not per channel
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.bn = nn.BatchNorm2d(6)
            self.out = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            y = self.conv(x).transpose(1, 2)
            y = F.batch_norm(y, self.bn.running_mean, self.bn.running_var, self.bn.weight, self.bn.bias, False)
            return self.out(y.transpose(1, 2))

    with pytest.raises(Exception, match="no prunable structure"):
        find_groups(Odd(), torch.randn(1, 3, 8, 8))


class Conv3DSimple(nn.Conv3d):
    """torchvision's video ResNet convolution: a subclass of nn.Conv3d that keeps its forward."""


def test_a_subclass_that_keeps_the_forward_uses_the_base_rule():
    net = nn.Sequential(Conv3DSimple(3, 8, 3, padding=1), nn.BatchNorm3d(8), nn.ReLU(), Conv3DSimple(8, 4, 3))
    assert module_rule(net[0]) is module_rule(nn.Conv3d(1, 1, 1))
    res = check_model(net, (2, 3, 4, 6, 6), ratio=0.5)
    assert res.ok, res.stages
    assert (res.groups, res.structures, res.structures_kept) == (1, 8, 4)


@pytest.mark.slow  # r3d_18: 33M parameters traced, gated and pruned
def test_torchvision_video_resnet_prunes_its_3d_convolutions():
    from torchvision.models.video import r3d_18

    res = check_model(r3d_18(num_classes=5), (1, 3, 4, 32, 32), ratio=0.3, onnx=False)
    assert res.ok, res.stages
    assert res.groups >= 8 and res.params_after < 0.8 * res.params_before


class FunctionalConv3d(nn.Module):
    """A layer computing F.conv3d with its own parameters (no nn.Conv3d to hold a gate)."""

    def __init__(self, cin, cout):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, 3, 3, 3) * 0.2)
        self.bias = nn.Parameter(torch.randn(cout) * 0.1)

    def forward(self, x):
        return F.conv3d(x, self.weight, self.bias, padding=1)


def test_functional_conv3d_output_channels_are_prunable():
    net = nn.Sequential(FunctionalConv3d(2, 6), nn.ReLU(), nn.Conv3d(6, 3, 1))
    (group,) = find_groups(net, torch.randn(1, 2, 3, 5, 5))
    assert {(s.target, s.dim, s.role) for s in group.slots} == {
        ("0.weight", 0, "out"), ("0.bias", 0, "out"), ("2.weight", 1, "in")}
    res = check_model(net, (2, 2, 3, 5, 5), ratio=0.5)
    assert res.ok, res.stages
    assert res.structures_kept == 3
    # its input channels have no gate: a group before it stays whole
    net2 = nn.Sequential(nn.Conv3d(2, 6, 1), FunctionalConv3d(6, 4), nn.Conv3d(4, 3, 1))
    groups = find_groups(net2, torch.randn(1, 2, 3, 5, 5))
    assert [g.producers for g in groups] == [["1"]]


# -- a user's own layer ----------------------------------------------------------------------------

class ChannelScale(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, channels))

    def forward(self, x):
        return x * self.weight[:, None, None]


class ScaledDense(nn.Module):
    """A user's linear layer: y = (x @ W^T) * s, written so that fx cannot see a plain linear."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in) / n_in ** 0.5)
        self.scale = nn.Parameter(torch.full((n_out,), 2.0))

    def forward(self, x):
        return torch.einsum("bi,oi->bo", x, self.weight) * self.scale


class ScaledDenseRule(rules.ModuleRule):
    needs_input = False

    def propagate(self, ctx, node, module, x):
        return ctx.dense(node, x, module.weight.shape[1], module.weight.shape[0], out_params=("weight", "scale"))

    def fold(self, module, factor):
        module.weight.mul_(factor.to(module.weight.dtype)[None, :])


@pytest.fixture
def registered():
    """Register the user layers' rules for one test only."""
    rules.register_module(ChannelScale)(type("ChannelScaleRule", (rules.ModuleRule,), {
        "propagate": lambda self, ctx, node, module, x: ctx.channelwise(node, x, ("weight",), 1)}))
    rules.register_module(ScaledDense)(ScaledDenseRule)
    yield
    rules.unregister_module(ChannelScale)
    rules.unregister_module(ScaledDense)


def test_a_users_layer_without_a_rule_keeps_its_channels():
    net = nn.Sequential(nn.Flatten(), ScaledDense(12, 8), nn.Tanh(), ScaledDense(8, 3))
    with pytest.raises(Exception, match="no prunable structure"):
        find_groups(net, torch.randn(1, 3, 2, 2))


def test_a_users_layers_with_registered_rules_prune_exactly(registered):
    net = nn.Sequential(nn.Flatten(), ScaledDense(12, 8), nn.Tanh(), ScaledDense(8, 3))
    (group,) = find_groups(net, torch.randn(1, 3, 2, 2))
    assert group.producers == ["1"] and group.consumers == ["3"]
    assert {(s.target, s.dim) for s in group.slots} == {("1.weight", 0), ("1.scale", 0), ("3.weight", 1)}
    res = check_model(net, (2, 3, 2, 2), ratio=0.5)
    assert res.ok, res.stages
    assert res.params_after < res.params_before

    conv = nn.Sequential(nn.Conv2d(3, 8, 3), ChannelScale(8), nn.ReLU(), nn.Conv2d(8, 2, 3))
    (group,) = find_groups(conv, torch.randn(1, 3, 8, 8))
    assert group.norms == ["1"]
    res = check_model(conv, (2, 3, 8, 8), ratio=0.5)
    assert res.ok, res.stages
    assert res.structures_kept == 4


def test_registering_twice_is_refused_unless_replacing():
    with pytest.raises(ValueError, match="already has a rule"):
        rules.register_module(nn.Linear)(rules.ModuleRule)
    with pytest.raises(ValueError, match="already has a rule"):
        rules.register_function("cat")(lambda ctx, node: None)
    with pytest.raises(TypeError):
        rules.register_module(int)(rules.ModuleRule)
