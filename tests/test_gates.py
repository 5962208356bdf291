"""Gate bank and hooks: eval values, masks, noise modes, KL, gradients, copies."""

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

import bmrs_surgery as bmrs
from bmrs_surgery import bmrs as math_
from bmrs_surgery.gates import GateBank
from bmrs_surgery.graph.group import Group, Tap
from models import get_model

X = torch.randn(8, 1, 32, 32)


def _mlp_gated(noise="sample"):
    return bmrs.attach_gates(get_model("mlp"), X, noise=noise)


def test_eval_forward_is_network_with_expected_theta_times_mask():
    g = _mlp_gated()
    bank = g.bmrs_gates
    with torch.no_grad():
        bank.posterior[0].uniform_(-8, 0)
        bank.posterior[1].uniform_(-3, 1)
        bank.mask[::3] = 0
    g.eval()
    net = g.model
    e = math_.expected_theta(bank.mu.detach(), bank.log_sigma.detach()).float() * bank.mask
    e1, e2 = e[:150], e[150:]
    lin = torch.nn.functional.linear  # calling net[3] itself would run its gate hook
    h = torch.tanh(lin(X.flatten(1), net[1].weight, net[1].bias)) * e1
    h = torch.tanh(lin(h, net[3].weight, net[3].bias)) * e2
    expected = lin(h, net[5].weight, net[5].bias)
    torch.testing.assert_close(g(X), expected, rtol=1e-5, atol=1e-6)


def test_masked_structure_contributes_nothing():
    g = _mlp_gated()
    with torch.no_grad():
        g.bmrs_gates.mask[7] = 0  # unit 7 of the first hidden layer
    g.eval()
    before = g(X)
    with torch.no_grad():  # whatever unit 7 computes or feeds forward no longer matters
        g.model[1].weight[7].normal_()
        g.model[1].bias[7] = 5.0
        g.model[3].weight[:, 7].normal_()
    torch.testing.assert_close(g(X), before)


@pytest.mark.parametrize("noise", ["sample", "structure", "element"])
def test_training_noise_modes_shape_and_sharing(noise):
    g = _mlp_gated(noise)
    bank = g.bmrs_gates
    with torch.no_grad():
        bank.posterior[1].fill_(0.0)  # sigma 1: clearly random
    g.train()
    x = torch.randn(6, 150)
    bank.begin_forward()
    theta = bank.theta_for(0, x)
    again = bank.theta_for(0, x)
    bank.end_forward()
    if noise == "structure":
        assert theta.shape == (1, 150)
    else:
        assert theta.shape == (6, 150)
        assert not torch.allclose(theta[0], theta[1])  # examples get their own draw
    if noise != "element":
        assert torch.equal(theta, again)  # one draw per forward, shared by every gate
    assert ((theta > 0) & (theta <= 1)).all()


def test_training_mean_matches_expected_theta():
    groups = [Group(0, 4, name="s", taps=[Tap("m", 1, np.arange(4))])]
    bank = GateBank(groups, noise="sample")
    with torch.no_grad():
        bank.posterior[0] = torch.tensor([-1.0, -3.0, -5.0, -8.0])
        bank.posterior[1] = torch.log(torch.tensor([0.5, 1.0, 2.0, 3.0]))
    theta = bank.sample((200_000, 4)).detach().double()
    expected = math_.expected_theta(bank.mu.detach(), bank.log_sigma.detach())
    sd = theta.std(0) / math.sqrt(theta.shape[0])
    assert ((theta.mean(0) - expected).abs() < 5 * sd + 1e-6).all()


def test_kl_term_weightings():
    g = _mlp_gated()
    per_gate = math_.kl_divergence(g.bmrs_gates.mu.detach().double(), g.bmrs_gates.log_sigma.detach().double())
    assert bmrs.kl_term(g).item() == pytest.approx(per_gate.mean().item(), rel=1e-5)
    assert bmrs.kl_term(g, 1000, "elbo").item() == pytest.approx(per_gate.sum().item() / 1000, rel=1e-5)
    with pytest.raises(ValueError, match="num_train"):
        bmrs.kl_term(g, None, "elbo")
    with pytest.raises(ValueError, match="weighting"):
        bmrs.kl_term(g, 10, "bogus")


def test_gradients_reach_weights_and_posteriors():
    g = _mlp_gated()
    g.train()
    loss = nn.functional.cross_entropy(g(X), torch.randint(0, 10, (8,))) + bmrs.kl_term(g)
    loss.backward()
    assert g.bmrs_gates.posterior.grad is not None
    assert torch.isfinite(g.bmrs_gates.posterior.grad).all()
    assert g.bmrs_gates.posterior.grad[0].abs().sum() > 0
    assert g.bmrs_gates.posterior.grad[1].abs().sum() > 0
    assert g.model[1].weight.grad.abs().sum() > 0


def test_deepcopy_and_state_dict_round_trip():
    g = _mlp_gated()
    with torch.no_grad():
        g.bmrs_gates.posterior[0].uniform_(-5, 0)
        g.bmrs_gates.mask[:10] = 0
    g.eval()
    c = copy.deepcopy(g)
    torch.testing.assert_close(c(X), g(X))
    fresh = _mlp_gated()
    fresh.load_state_dict(g.state_dict())
    fresh.eval()
    torch.testing.assert_close(fresh(X), g(X))
    assert set(g.state_dict()) >= {"bmrs_gates.posterior", "bmrs_gates.mask", "model.1.weight"}


def test_attach_twice_and_bad_noise_are_refused():
    g = _mlp_gated()
    with pytest.raises(ValueError, match="already"):
        bmrs.attach_gates(g.model, X)
    with pytest.raises(ValueError, match="noise"):
        bmrs.attach_gates(get_model("mlp"), X, noise="bogus")


def test_detach_gives_back_the_plain_network():
    net = get_model("lenet5")
    ref = net(X)
    g = bmrs.attach_gates(net, X)
    plain = bmrs.detach_gates(g)
    torch.testing.assert_close(plain(X), ref)


def test_no_gates_error():
    with pytest.raises(bmrs.BmrsError, match="no BMRS gates"):
        bmrs.kl_term(get_model("mlp"))
