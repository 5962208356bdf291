"""The fused autograd Functions equal autograd through the reference formulas of bmrs.py."""

import pytest
import torch

from bmrs_surgery import bmrs, fused


def _posterior(n, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    mu = torch.rand(n, generator=g, dtype=dtype) * 26 - 24  # also below a and near b
    ls = torch.rand(n, generator=g, dtype=dtype) * 27 - 21  # also beyond both clamps
    return torch.stack([mu, ls]).requires_grad_()


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 2e-3)])
def test_kl_values_and_gradients(dtype, tol):
    post = _posterior(400, dtype)
    ref = bmrs.kl_divergence(post[0], post[1])
    (g_ref,) = torch.autograd.grad(ref.sum(), post)
    got = fused.kl_divergence(post)
    (g_got,) = torch.autograd.grad(got.sum(), post)
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol)
    torch.testing.assert_close(g_got, g_ref, rtol=tol, atol=tol)
    assert torch.isfinite(got).all() and torch.isfinite(g_got).all()


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-7), (torch.float32, 2e-3)])
def test_sample_values_and_gradients(dtype, tol):
    post = _posterior(300, dtype, seed=1)
    with torch.no_grad():
        post[1].clamp_(-6, 3)  # keep the draws away from the gamma clamp for a clean comparison
    u = torch.rand(16, 300, dtype=dtype)
    mask = (torch.rand(300) > 0.2).to(dtype)
    weights = torch.randn(16, 300, dtype=dtype)
    ref = torch.exp(bmrs.sample_log_theta(post[0], post[1], u)) * mask
    (g_ref,) = torch.autograd.grad((ref * weights).sum(), post)
    got = fused.sample_theta(post, mask, u)
    (g_got,) = torch.autograd.grad((got * weights).sum(), post)
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol)
    torch.testing.assert_close(g_got, g_ref, rtol=tol, atol=tol)


def test_sample_gradcheck_float64():
    post = torch.stack([torch.tensor([-3.0, -1.0, -9.0]), torch.tensor([0.0, -1.0, 0.5])]).double()
    post.requires_grad_()
    u = torch.tensor([[0.3, 0.6, 0.9], [0.1, 0.5, 0.7]], dtype=torch.float64)
    mask = torch.ones(3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda p: fused.sample_theta(p, mask, u), (post,))
    assert torch.autograd.gradcheck(lambda p: fused.kl_divergence(p), (post,))


def test_broadcast_element_shape():
    post = torch.zeros(2, 1, 5, 1, 1, dtype=torch.float64, requires_grad=True)
    u = torch.rand(3, 5, 4, 4, dtype=torch.float64)
    theta = fused.sample_theta(post, torch.ones(1, 5, 1, 1, dtype=torch.float64), u)
    assert theta.shape == (3, 5, 4, 4)
    theta.sum().backward()
    assert post.grad.shape == post.shape
