"""Pure BMRS math: truncated log-normal gates, KL, moments, sampling and dF.

Every function takes tensors (or anything ``torch.as_tensor`` accepts), broadcasts, and is
vectorised over any number of gates. Functions used in training (:func:`kl_divergence`,
:func:`sample_log_theta`, :func:`log_expected_theta`) keep the input dtype and are differentiable;
scoring functions (:func:`delta_f`, :func:`snr`, :func:`expected_theta`) compute in float64.

Notation follows ``docs/bmrs-math.md``: ``x = log theta ~ N(mu, sigma^2)`` truncated to ``[a, b]``;
``alpha = (a - mu)/sigma``, ``beta = (b - mu)/sigma``, ``Z = Phi(beta) - Phi(alpha)``.
Everything is done with log-CDFs so that no NaN or inf reaches a decision.
"""

from __future__ import annotations

import math

import torch
from torch.special import log_ndtr, ndtr, ndtri

LOWER = -20.0
UPPER = 0.0
LOG_SIGMA_MIN = -20.0
LOG_SIGMA_MAX = 5.0
FLOAT32_MANTISSA_BITS = 23
_LOG_2PI = math.log(2.0 * math.pi)
_LN2 = math.log(2.0)


def _f64(x) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.float64)


def clamp_log_sigma(log_sigma: torch.Tensor) -> torch.Tensor:
    """The posterior's log standard deviation as used everywhere: clamped to [-20, 5]."""
    return log_sigma.clamp(LOG_SIGMA_MIN, LOG_SIGMA_MAX)


def log1mexp(d: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(d)) for d <= 0, accurate on both sides of -log 2."""
    d = d.clamp(max=0.0)
    return torch.where(d > -_LN2, torch.log(-torch.expm1(d)), torch.log1p(-torch.exp(d)))


def log_ndtr_diff(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """log(Phi(hi) - Phi(lo)) for lo <= hi, without cancellation in either tail."""
    lo, hi = torch.broadcast_tensors(lo, hi)
    flip = lo > 0  # both in the upper tail: use Phi(hi) - Phi(lo) = Phi(-lo) - Phi(-hi)
    big = torch.where(flip, -lo, hi)
    small = torch.where(flip, -hi, lo)
    log_big = log_ndtr(big)
    return log_big + log1mexp(log_ndtr(small) - log_big)


def _std(mu, log_sigma, a, b):
    sigma = torch.exp(clamp_log_sigma(log_sigma))
    return sigma, (a - mu) / sigma, (b - mu) / sigma


def log_normaliser(mu, log_sigma, a: float = LOWER, b: float = UPPER) -> torch.Tensor:
    """log Z, the log of the normal mass that the truncation keeps."""
    _, alpha, beta = _std(mu, log_sigma, a, b)
    return log_ndtr_diff(alpha, beta)


def _log_phi(x: torch.Tensor) -> torch.Tensor:
    return -0.5 * x * x - 0.5 * _LOG_2PI


def kl_divergence(mu, log_sigma, a: float = LOWER, b: float = UPPER) -> torch.Tensor:
    """KL(q || p) of the truncated log-normal posterior from the truncated log-uniform prior.

    Differentiable, in the dtype of ``mu``; one value per gate.
    """
    mu = torch.as_tensor(mu)
    log_sigma = clamp_log_sigma(torch.as_tensor(log_sigma, dtype=mu.dtype))
    sigma = torch.exp(log_sigma)
    alpha, beta = (a - mu) / sigma, (b - mu) / sigma
    log_z = log_ndtr_diff(alpha, beta)
    # (alpha*phi(alpha) - beta*phi(beta)) / Z, each term formed in log space
    t_alpha = alpha * torch.exp(_log_phi(alpha) - log_z)
    t_beta = beta * torch.exp(_log_phi(beta) - log_z)
    return (
        math.log(b - a)
        - log_sigma
        - log_z
        - 0.5 * (_LOG_2PI + 1.0)
        - 0.5 * (t_alpha - t_beta)
    )


def log_expected_theta(mu, log_sigma, a: float = LOWER, b: float = UPPER, power: int = 1):
    """log E[theta^power] (power 1 or 2) of the truncated log-normal, in the dtype of ``mu``."""
    mu = torch.as_tensor(mu)
    sigma, alpha, beta = _std(mu, torch.as_tensor(log_sigma, dtype=mu.dtype), a, b)
    k = float(power)
    return (
        k * mu
        + 0.5 * k * k * sigma * sigma
        + log_ndtr_diff(k * sigma - beta, k * sigma - alpha)
        - log_ndtr_diff(alpha, beta)
    )


def expected_theta(mu, log_sigma, a: float = LOWER, b: float = UPPER) -> torch.Tensor:
    """E[theta] in float64: the constant that replaces a kept gate at test time."""
    return torch.exp(log_expected_theta(_f64(mu), _f64(log_sigma), a, b))


def variance_theta(mu, log_sigma, a: float = LOWER, b: float = UPPER) -> torch.Tensor:
    """Var[theta] in float64 (never negative)."""
    mu, log_sigma = _f64(mu), _f64(log_sigma)
    log_e1 = log_expected_theta(mu, log_sigma, a, b)
    return torch.exp(2.0 * log_e1) * _relative_variance(mu, log_sigma, a, b, log_e1)


def _relative_variance(mu, log_sigma, a, b, log_e1):
    """Var[theta] / E[theta]^2 = E[theta^2]/E[theta]^2 - 1, guarded against cancellation.

    When the relative variance is below ~1e-8 (tiny sigma) the difference of logs has lost most of
    its digits; there the delta method (Var theta ~ E[theta]^2 Var[log theta]) is accurate, with
    Var[log theta] the truncated normal's variance.
    """
    log_e2 = log_expected_theta(mu, log_sigma, a, b, power=2)
    direct = torch.expm1((log_e2 - 2.0 * log_e1).clamp(min=0.0))
    sigma, alpha, beta = _std(mu, log_sigma, a, b)
    log_z = log_ndtr_diff(alpha, beta)
    p_alpha, p_beta = torch.exp(_log_phi(alpha) - log_z), torch.exp(_log_phi(beta) - log_z)
    var_log = sigma * sigma * (1.0 + alpha * p_alpha - beta * p_beta - (p_alpha - p_beta) ** 2)
    var_log = var_log.clamp(min=0.0)
    rel = torch.where(direct < 1e-8, var_log, direct)
    return rel.clamp(min=torch.finfo(torch.float64).tiny)


def snr(mu, log_sigma, a: float = LOWER, b: float = UPPER) -> torch.Tensor:
    """Signal-to-noise ratio E[theta] / sqrt(Var[theta]) in float64 (finite, positive)."""
    mu, log_sigma = _f64(mu), _f64(log_sigma)
    log_e1 = log_expected_theta(mu, log_sigma, a, b)
    return torch.rsqrt(_relative_variance(mu, log_sigma, a, b, log_e1))


def sample_log_theta(mu, log_sigma, u, a: float = LOWER, b: float = UPPER) -> torch.Tensor:
    """Reparameterised sample of log theta from the truncated normal, given uniforms ``u``.

    gamma = Phi(alpha) + u*Z, clamped to [1e-5, 1 - 1e-5]; log theta = mu + sigma*Phi^-1(gamma),
    clamped to [a, b]. Differentiable in mu and log_sigma.
    """
    sigma = torch.exp(clamp_log_sigma(log_sigma))
    cdf_a = ndtr((a - mu) / sigma)
    cdf_b = ndtr((b - mu) / sigma)
    gamma = (cdf_a + u * (cdf_b - cdf_a)).clamp(1e-5, 1.0 - 1e-5)
    return (mu + sigma * ndtri(gamma)).clamp(a, b)


def uniform_interval(precision_bits: int, a: float = LOWER, b: float = UPPER) -> tuple[float, float]:
    """[a', b'] of BMRS_U: from log(2^-23) (float32 mantissa) to log(2^-p), clipped to [a, b]."""
    if not 1 <= int(precision_bits) < FLOAT32_MANTISSA_BITS:
        raise ValueError(f"precision_bits must be in 1..{FLOAT32_MANTISSA_BITS - 1}, got {precision_bits}")
    lo = max(a, -FLOAT32_MANTISSA_BITS * _LN2)
    hi = min(b, -int(precision_bits) * _LN2)
    if not lo < hi:
        raise ValueError(f"BMRS_U interval [{lo:.3f}, {hi:.3f}] is empty for bounds [{a}, {b}]")
    return lo, hi


def delta_f_uniform(mu, log_sigma, precision_bits: int = 8, a: float = LOWER, b: float = UPPER):
    """BMRS_U: dF = log Q - log U for the reduced prior log-uniform on [log 2^-23, log 2^-p]."""
    lo, hi = uniform_interval(precision_bits, a, b)
    mu, log_sigma = _f64(mu), _f64(log_sigma)
    sigma, alpha, beta = _std(mu, log_sigma, a, b)
    log_q = log_ndtr_diff((lo - mu) / sigma, (hi - mu) / sigma) - log_ndtr_diff(alpha, beta)
    return log_q - math.log((hi - lo) / (b - a))


def delta_f_normal(
    mu,
    log_sigma,
    prior_mu: float = LOWER,
    prior_var: float = 1e-12,
    a: float = LOWER,
    b: float = UPPER,
):
    """BMRS_N (paper Eq. 8): reduced prior a narrow truncated log-normal N(prior_mu, prior_var).

    The quadratic bracket is evaluated as (mu - mu_p)^2 / (sigma^2 + s_p^2), which is exact and free
    of cancellation. ``prior_var == 0`` gives the s_p -> 0 limit log((b - a) q_logtheta(a)).
    """
    mu, log_sigma = _f64(mu), _f64(log_sigma)
    sigma, alpha, beta = _std(mu, log_sigma, a, b)
    log_z_q = log_ndtr_diff(alpha, beta)
    if prior_var == 0.0:
        if prior_mu != a:
            raise ValueError("prior_var == 0 is only defined for prior_mu == a")
        return math.log(b - a) + _log_phi(alpha) - torch.log(sigma) - log_z_q
    var_q = sigma * sigma
    total = var_q + prior_var
    s_p = math.sqrt(prior_var)
    var_qt = var_q * prior_var / total
    s_qt = torch.sqrt(var_qt)
    mu_qt = (mu * prior_var + prior_mu * var_q) / total
    log_z_p = log_ndtr_diff(_f64((a - prior_mu) / s_p), _f64((b - prior_mu) / s_p))
    log_z_qt = log_ndtr_diff((a - mu_qt) / s_qt, (b - mu_qt) / s_qt)
    return (
        log_z_qt
        + math.log(b - a)
        - log_z_p
        - log_z_q
        - 0.5 * (_LOG_2PI + torch.log(total))
        - 0.5 * (mu - prior_mu) ** 2 / total
    )


PRIORS = ("normal", "uniform")


def delta_f(
    mu,
    log_sigma,
    prior: str = "normal",
    precision_bits: int = 8,
    *,
    prior_mu: float = LOWER,
    prior_var: float = 1e-12,
    a: float = LOWER,
    b: float = UPPER,
) -> torch.Tensor:
    """Change in log evidence dF for switching each gate off; prune where dF >= 0.

    ``prior="normal"`` is BMRS_N (reduced prior N(prior_mu, prior_var) at the bottom of the
    support), ``prior="uniform"`` is BMRS_U with ``precision_bits`` p. Returns float64, finite.
    """
    if prior == "normal":
        df = delta_f_normal(mu, log_sigma, prior_mu, prior_var, a, b)
    elif prior == "uniform":
        df = delta_f_uniform(mu, log_sigma, precision_bits, a, b)
    else:
        raise ValueError(f"unknown prior {prior!r}; expected one of {', '.join(PRIORS)}")
    return df
