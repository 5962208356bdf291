"""Tests of the pure BMRS math in ``bmrs_surgery.bmrs`` against the reference values of docs/math.md, numerical
integration (scipy), high-precision references (mpmath) and the theory's invariants."""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import integrate
from scipy.stats import truncnorm

from bmrs_surgery import bmrs

A, B = bmrs.LOWER, bmrs.UPPER


def f64(x):
    return torch.as_tensor(x, dtype=torch.float64)


def scalar(t) -> float:
    return float(torch.as_tensor(t).reshape(()))


def assert_rel(actual, expected, rel, abs_=0.0, what=""):
    if isinstance(actual, torch.Tensor):
        actual = actual.detach()
    actual, expected = float(actual), float(expected)
    assert math.isfinite(actual), f"{what}: {actual}"
    assert abs(actual - expected) <= rel * abs(expected) + abs_, (
        f"{what}: got {actual!r}, expected {expected!r} (rel err {abs(actual - expected) / max(abs(expected), 1e-300):.3g})"
    )


# ------------------------------------------------------------------------------------------------
# 1. Reference values (docs/math.md, section 6)

# (mu, sigma, dF paper Eq. 8, SNR, E[theta]); a=-20, b=0, mu_p=-20, s_p^2=1e-12
BMRS_N_TABLE = [
    (0.0, math.exp(-5.0), -4405285.0, None, None),
    (-1.0, 0.5, -719.20699, 2.1703, 0.398069),
    (-3.0, 1.0, -142.42184, 0.84773, 0.080326),
    (-5.0, 2.0, -26.735121, 0.38979, 0.034641),
    (-8.0, 3.0, -7.0179480, 0.20255, 0.0111994),
    (-15.0, 3.0, -0.36173664, 0.027942, 2.82605e-5),
]


@pytest.mark.parametrize("mu,sigma,df,snr,e_theta", BMRS_N_TABLE)
def test_reference_table_bmrs_n(mu, sigma, df, snr, e_theta):
    ls = math.log(sigma)
    assert_rel(bmrs.delta_f(mu, ls), df, 1e-4, what="dF BMRS_N")
    assert_rel(bmrs.delta_f(mu, ls, "normal"), df, 1e-4, what="dF BMRS_N explicit")
    assert_rel(bmrs.delta_f_normal(mu, ls), df, 1e-4, what="delta_f_normal")
    if snr is not None:
        assert_rel(bmrs.snr(mu, ls), snr, 1e-4, what="SNR")
        assert_rel(bmrs.expected_theta(mu, ls), e_theta, 1e-4, what="E[theta]")
        # E[theta] is also exp(log_expected_theta); SNR = E / sqrt(Var)
        assert_rel(math.exp(scalar(bmrs.log_expected_theta(f64(mu), f64(ls)))), e_theta, 1e-4)
        var = scalar(bmrs.variance_theta(mu, ls))
        assert_rel(e_theta / math.sqrt(var), snr, 1e-4, what="E/sqrt(Var)")


def test_reference_table_keep_decision():
    # the last row is the only one near the threshold: dF < 0 means keep
    assert scalar(bmrs.delta_f(-15.0, math.log(3.0))) < 0


@pytest.mark.parametrize("mu,sigma,df", [(-5.0, 2.0, -18.52276), (-15.0, 3.0, 0.52699)])
def test_reference_bmrs_n_wide_prior(mu, sigma, df):
    got = bmrs.delta_f(mu, math.log(sigma), prior_mu=-18.0, prior_var=0.25)
    assert_rel(got, df, 1e-4, what="dF BMRS_N mu_p=-18, s_p=0.5")


def _half_unit_in_last_place(text: str) -> float:
    """Half a unit in the last given digit of a decimal literal such as '-0.109' -> 5e-4."""
    decimals = len(text.split(".")[1]) if "." in text else 0
    return 0.5 * 10.0 ** (-decimals)


# (mu, sigma) -> (dF p=8, dF p=4); the doc gives these to 3 significant digits only, so they are
# compared at the precision given: |got - ref| <= half a unit in the last printed digit (i.e. the
# computed value must round to the printed one), which is tighter than rel 1e-2.
BMRS_U_TABLE = [
    (-1.0, 0.5, "-43.8", "-8.10"),
    (-3.0, 1.0, "-4.55", "-0.109"),
    (-5.0, 2.0, "-0.275", "+0.282"),
    (-8.0, 3.0, "+0.422", "+0.376"),
]


@pytest.mark.parametrize("mu,sigma,df8,df4", BMRS_U_TABLE)
def test_reference_table_bmrs_u(mu, sigma, df8, df4):
    ls = math.log(sigma)
    for bits, ref in ((8, df8), (4, df4)):
        got = scalar(bmrs.delta_f(mu, ls, "uniform", bits))
        tol = _half_unit_in_last_place(ref) + 1e-12
        assert abs(got - float(ref)) <= tol, f"BMRS_U-{bits} ({mu}, {sigma}): {got} vs {ref}"
        assert got == pytest.approx(scalar(bmrs.delta_f_uniform(mu, ls, bits)), rel=1e-15)


@pytest.mark.parametrize("bits,u_ref", [(8, 0.5199), (4, 0.6585)])
def test_reference_uniform_mass(bits, u_ref):
    lo, hi = bmrs.uniform_interval(bits)
    assert lo == pytest.approx(math.log(2.0**-23), rel=1e-15)
    assert hi == pytest.approx(math.log(2.0**-bits), rel=1e-15)
    assert_rel((hi - lo) / (B - A), u_ref, 1e-4, what="U")


# ------------------------------------------------------------------------------------------------
# 2. The s_p -> 0 limit


@pytest.mark.parametrize("mu,sigma,df,_s,_e", BMRS_N_TABLE)
def test_zero_prior_var_limit_matches_table(mu, sigma, df, _s, _e):
    ls = math.log(sigma)
    limit = scalar(bmrs.delta_f(mu, ls, prior_var=0.0))
    # the difference to s_p^2 = 1e-12 is O(s_p |alpha| / sigma): 0.39 of 4.4e6 for row 1
    assert_rel(limit, df, 1e-6, abs_=1e-4, what="prior_var=0 vs table")
    tiny = scalar(bmrs.delta_f(mu, ls, prior_var=1e-20))
    assert_rel(limit, tiny, 1e-9, abs_=1e-7, what="prior_var=0 vs 1e-20")


def test_zero_prior_var_limit_grid_and_definition():
    mu = torch.linspace(-19.5, -0.5, 39, dtype=torch.float64)[:, None]
    sigma = torch.tensor([0.1, 0.3, 1.0, 3.0, 10.0], dtype=torch.float64)[None, :]
    ls = sigma.log()
    limit = bmrs.delta_f(mu, ls, prior_var=0.0)
    tiny = bmrs.delta_f(mu, ls, prior_var=1e-16)
    assert torch.isfinite(limit).all()
    assert torch.allclose(limit, tiny, rtol=1e-8, atol=1e-4)
    # the limit is log((b - a) q_logtheta(a)), q the truncated normal density
    m, s = np.broadcast_arrays(mu.numpy(), sigma.numpy())
    dens = truncnorm.logpdf(A, (A - m) / s, (B - m) / s, loc=m, scale=s)
    np.testing.assert_allclose(limit.numpy(), math.log(B - A) + dens, rtol=1e-9, atol=1e-9)
    # and the shrinking prior converges monotonically in its width
    errs = [(bmrs.delta_f(mu, ls, prior_var=v) - limit).abs().max().item() for v in (1e-4, 1e-8, 1e-12)]
    assert errs[0] > errs[1] > errs[2]


def test_zero_prior_var_requires_prior_at_lower_bound():
    with pytest.raises(ValueError, match=r"prior_var == 0 is only defined for prior_mu == a"):
        bmrs.delta_f(-3.0, 0.0, prior_mu=-18.0, prior_var=0.0)


# ------------------------------------------------------------------------------------------------
# 3. Cross-checks against numerical integration (scipy.integrate.quad)

_RNG = np.random.default_rng(20240601)
QUAD_CASES = [(float(m), float(s)) for m, s in zip(_RNG.uniform(-18, -1, 10), _RNG.uniform(0.3, 3.0, 10))]


def _logq(x, mu, sigma):
    return truncnorm.logpdf(x, (A - mu) / sigma, (B - mu) / sigma, loc=mu, scale=sigma)


def _log_quad(logf, lo, hi, peak, width):
    """log of the integral of exp(logf) over [lo, hi]; the integrand is scaled by its value at
    ``peak`` (its maximum, for the log-concave integrands used here) so nothing underflows."""
    peak = min(max(peak, lo), hi)
    lo_i, hi_i = max(lo, peak - 40 * width), min(hi, peak + 40 * width)
    top = logf(peak)
    pts = sorted({min(max(p, lo_i), hi_i) for p in (peak - 2 * width, peak, peak + 2 * width)} - {lo_i, hi_i})
    val, err = integrate.quad(
        lambda x: math.exp(logf(x) - top), lo_i, hi_i, points=pts or None, epsabs=0.0, epsrel=1e-12, limit=400
    )
    assert val > 0 and err < 1e-9 * val
    return top + math.log(val)


@pytest.mark.slow  # 30 adaptive quadratures at epsrel 1e-12
@pytest.mark.parametrize("prior_mu,prior_var", [(-20.0, 0.25), (-18.0, 0.25), (-20.0, 0.01)])
@pytest.mark.parametrize("mu,sigma", QUAD_CASES)
def test_quad_delta_f_normal(mu, sigma, prior_mu, prior_var):
    s_p = math.sqrt(prior_var)
    a_p, b_p = (A - prior_mu) / s_p, (B - prior_mu) / s_p

    def logf(x):  # log[q(x) p~(x) / p(x)], p = 1/(b - a)
        return _logq(x, mu, sigma) + truncnorm.logpdf(x, a_p, b_p, loc=prior_mu, scale=s_p) + math.log(B - A)

    total = sigma**2 + prior_var
    peak = (mu * prior_var + prior_mu * sigma**2) / total
    width = sigma * s_p / math.sqrt(total)
    expected = _log_quad(logf, A, B, peak, width)
    got = bmrs.delta_f(mu, math.log(sigma), prior_mu=prior_mu, prior_var=prior_var)
    assert_rel(got, expected, 1e-6, abs_=1e-9, what="dF BMRS_N vs quad")


@pytest.mark.parametrize("bits", [4, 8, 16])
@pytest.mark.parametrize("mu,sigma", QUAD_CASES)
def test_quad_delta_f_uniform(mu, sigma, bits):
    lo, hi = bmrs.uniform_interval(bits)
    log_q = _log_quad(lambda x: _logq(x, mu, sigma), lo, hi, mu, sigma)
    expected = log_q - math.log((hi - lo) / (B - A))
    got = bmrs.delta_f(mu, math.log(sigma), "uniform", bits)
    assert_rel(got, expected, 1e-6, abs_=1e-9, what="dF BMRS_U vs quad")


@pytest.mark.parametrize("mu,sigma", QUAD_CASES)
def test_quad_kl(mu, sigma):
    lo, hi = max(A, mu - 40 * sigma), min(B, mu + 40 * sigma)
    peak = min(max(mu, lo), hi)

    def integrand(x):  # q log(q / p), p = 1/(b - a)
        lq = _logq(x, mu, sigma)
        return math.exp(lq) * (lq + math.log(B - A))

    expected, _ = integrate.quad(integrand, lo, hi, points=[peak], epsabs=0.0, epsrel=1e-12, limit=400)
    for dtype, rel in ((torch.float64, 1e-6), (torch.float32, 1e-5)):
        got = bmrs.kl_divergence(torch.tensor(mu, dtype=dtype), torch.tensor(math.log(sigma), dtype=dtype))
        assert got.dtype == dtype
        assert_rel(got, expected, rel, abs_=1e-9, what=f"KL vs quad ({dtype})")


@pytest.mark.parametrize("mu,sigma", QUAD_CASES)
def test_quad_moments(mu, sigma):
    ls = math.log(sigma)
    log_e1 = _log_quad(lambda x: x + _logq(x, mu, sigma), A, B, mu + sigma**2, sigma)
    log_e2 = _log_quad(lambda x: 2 * x + _logq(x, mu, sigma), A, B, mu + 2 * sigma**2, sigma)
    e1, e2 = math.exp(log_e1), math.exp(log_e2)
    assert_rel(bmrs.expected_theta(mu, ls), e1, 1e-6, what="E[theta] vs quad")
    assert_rel(bmrs.log_expected_theta(f64(mu), f64(ls), power=2), log_e2, 0.0, abs_=1e-6, what="log E[theta^2]")
    assert_rel(bmrs.variance_theta(mu, ls), e2 - e1 * e1, 1e-6, what="Var[theta] vs quad")
    assert_rel(bmrs.snr(mu, ls), e1 / math.sqrt(e2 - e1 * e1), 1e-6, what="SNR vs quad")


# ------------------------------------------------------------------------------------------------
# 3b. Extreme parameters against 60-digit references (mpmath), where float64 formulas that
#     subtract log-normalisers of size ~1e20 used to return garbage.

def _mp_mass(lo, hi):
    """Phi(hi) - Phi(lo) in mpmath, without cancellation at the working precision."""
    mp = mpmath.mp
    s2 = mp.sqrt(2)
    if lo >= 0:
        return (mp.erfc(lo / s2) - mp.erfc(hi / s2)) / 2
    if hi <= 0:
        return (mp.erfc(-hi / s2) - mp.erfc(-lo / s2)) / 2
    return 1 - (mp.erfc(-lo / s2) + mp.erfc(hi / s2)) / 2


def _mp_ref(mu, ls, prior_mu=A, prior_var="1e-12", bits=8):
    mp = mpmath.mp
    with mpmath.workdps(90):
        mu, ls = mp.mpf(mu), mp.mpf(min(max(ls, bmrs.LOG_SIGMA_MIN), bmrs.LOG_SIGMA_MAX))
        mass = _mp_mass

        def pdf(x):
            return mp.exp(-x * x / 2) / mp.sqrt(2 * mp.pi)

        s = mp.exp(ls)
        al, be = (A - mu) / s, (B - mu) / s
        z = mass(al, be)
        out = {
            "kl": mp.log(B - A) - ls - mp.log(z) - mp.log(2 * mp.pi * mp.e) / 2
            - (al * pdf(al) - be * pdf(be)) / (2 * z)
        }
        e1 = mp.exp(mu + s * s / 2) * mass(al - s, be - s) / z
        e2 = mp.exp(2 * mu + 2 * s * s) * mass(al - 2 * s, be - 2 * s) / z
        out["E"], out["V"], out["snr"] = e1, e2 - e1**2, e1 / mp.sqrt(e2 - e1**2)
        sp2 = mp.mpf(prior_var)
        sp = mp.sqrt(sp2)
        sqt2 = 1 / (1 / s**2 + 1 / sp2)
        sqt = mp.sqrt(sqt2)
        muqt = sqt2 * (mu / s**2 + prior_mu / sp2)
        zp = mass((A - prior_mu) / sp, (B - prior_mu) / sp)
        zqt = mass((A - muqt) / sqt, (B - muqt) / sqt)
        out["dfn"] = (
            mp.log(zqt * (B - A) / (zp * z))
            + mp.log(sqt2 / (2 * mp.pi * sp2 * s**2)) / 2
            - (mu - prior_mu) ** 2 / (s**2 + sp2) / 2
        )
        out["dfn0"] = mp.log((B - A) * pdf(al) / (s * z))
        lo, hi = mp.log(mp.mpf(2) ** -23), mp.log(mp.mpf(2) ** -bits)
        out["dfu"] = mp.log(mass((lo - mu) / s, (hi - mu) / s) / z) - mp.log((hi - lo) / (B - A))
        return {k: float(v) for k, v in out.items()}


def _mp_ref_kl(mu, ls):
    """KL at 90 digits for mpf (or float) inputs, mu and log_sigma unrounded."""
    mp = mpmath.mp
    with mpmath.workdps(90):
        mu, ls = mp.mpf(mu), mp.mpf(ls)
        s = mp.exp(ls)
        al, be = (A - mu) / s, (B - mu) / s
        z = _mp_mass(al, be)

        def pdf(x):
            return mp.exp(-x * x / 2) / mp.sqrt(2 * mp.pi)

        return (
            mp.log(B - A) - ls - mp.log(z) - mp.log(2 * mp.pi * mp.e) / 2
            - (al * pdf(al) - be * pdf(be)) / (2 * z)
        )


EXTREME_CASES = [
    (5.0, -20.0), (5.0, -5.0), (3.0, -4.0), (0.5, -12.0), (0.0, -20.0), (0.0, -5.0), (1e-6, -15.0),
    (-20.0, -20.0), (-20.0 - 1e-7, -18.0), (-21.0, -19.5), (-25.0, -20.0), (-25.0, -7.0), (-25.0, 1.0),
    (-10.0, -20.0), (-10.0, 5.0), (5.0, 5.0), (-19.99, -3.0), (2.0, -5.0), (-22.0, -5.0),
]


@pytest.mark.parametrize("mu,ls", EXTREME_CASES)
def test_extreme_parameters_against_mpmath(mu, ls):
    ref = _mp_ref(mu, ls)
    # log-scale quantities: relative error, or absolute where they are close to 0
    assert_rel(bmrs.delta_f(mu, ls), ref["dfn"], 1e-10, abs_=1e-10, what="dF BMRS_N")
    assert_rel(bmrs.delta_f(mu, ls, prior_var=0.0), ref["dfn0"], 1e-10, abs_=1e-10, what="dF limit")
    assert_rel(bmrs.delta_f(mu, ls, "uniform", 8), ref["dfu"], 1e-10, abs_=1e-10, what="dF BMRS_U-8")
    assert_rel(bmrs.kl_divergence(f64(mu), f64(ls)), ref["kl"], 1e-10, abs_=1e-10, what="KL")
    m32, s32 = torch.tensor(mu, dtype=torch.float32), torch.tensor(ls, dtype=torch.float32)
    ref32 = _mp_ref(float(m32), float(s32))  # the reference at the float32-rounded inputs
    assert_rel(bmrs.kl_divergence(m32, s32), ref32["kl"], 1e-6, abs_=1e-6, what="KL f32")
    assert_rel(bmrs.expected_theta(mu, ls), ref["E"], 1e-10, what="E[theta]")
    # the variance falls back to a cumulant expansion where it is tiny: 1e-6 relative
    assert_rel(bmrs.variance_theta(mu, ls), ref["V"], 1e-6, what="Var[theta]")
    assert_rel(bmrs.snr(mu, ls), ref["snr"], 1e-6, what="SNR")


@pytest.mark.parametrize("mu,ls", [(0.0, -5.0), (0.0, -8.0), (3.0, -19.5), (-21.0, -19.5), (-25.0, -3.0),
                                   (5.0, -12.0), (-20.0, 0.5), (-3.0, 0.0), (0.01, -5.0), (-19.99, -5.0)])
def test_gradients_match_finite_differences(mu, ls):
    """Autograd of the training functions agrees with finite differences, also deep in the tails
    (where torch's own log_ndtr and erfcx backward formulas lose every digit)."""
    m = torch.tensor(mu, dtype=torch.float64, requires_grad=True)
    s = torch.tensor(ls, dtype=torch.float64, requires_grad=True)
    for fn in (bmrs.kl_divergence, bmrs.log_expected_theta, lambda x, y: bmrs.log_expected_theta(x, y, power=2)):
        assert torch.autograd.gradcheck(fn, (m, s), atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("mu,ls", [(0.0, -19.9), (1e-9, -19.9), (-20.0, -19.9), (3.0, -19.5), (-21.0, -19.5)])
def test_gradients_match_mpmath_differences(mu, ls):
    """Where sigma ~ 2e-9 float64 finite differences are useless; difference the 90-digit
    reference instead (steps of 1e-25 sigma)."""
    m = torch.tensor(mu, dtype=torch.float64, requires_grad=True)
    s = torch.tensor(ls, dtype=torch.float64, requires_grad=True)
    bmrs.kl_divergence(m, s).backward()
    with mpmath.workdps(90):
        h_mu = mpmath.mpf(10) ** -25 * mpmath.exp(ls)
        h_ls = mpmath.mpf(10) ** -25

        def kl(x, y):
            return _mp_ref_kl(x, y)

        d_mu = (kl(mpmath.mpf(mu) + h_mu, ls) - kl(mpmath.mpf(mu) - h_mu, ls)) / (2 * h_mu)
        d_ls = (kl(mu, mpmath.mpf(ls) + h_ls) - kl(mu, mpmath.mpf(ls) - h_ls)) / (2 * h_ls)
    assert_rel(m.grad, float(d_mu), 1e-8, what="dKL/dmu")
    assert_rel(s.grad, float(d_ls), 1e-8, abs_=1e-12, what="dKL/dlog_sigma")


def test_kl_gradient_far_tail_matches_asymptotics():
    # mu above b with tiny sigma: q is ~ exponential at b with scale sigma^2/(mu - b), so
    # KL ~ log((b - a)(mu - b)/sigma^2) - 1, dKL/dmu ~ 1/(mu - b), dKL/dlog_sigma ~ -2
    m = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    s = torch.tensor(-19.5, dtype=torch.float64, requires_grad=True)
    kl = bmrs.kl_divergence(m, s)
    kl.backward()
    assert_rel(kl, math.log(20 * 3 / math.exp(-39.0)) - 1, 1e-9)
    assert_rel(m.grad, 1 / 3, 1e-6)
    assert_rel(s.grad, -2.0, 1e-6)


# ------------------------------------------------------------------------------------------------
# 4. Properties over the whole parameter range (hypothesis)

MU = st.floats(-25.0, 5.0, allow_nan=False)
LOG_SIGMA = st.floats(-20.0, 5.0, allow_nan=False)
SHAPES = hnp.array_shapes(min_dims=1, max_dims=2, max_side=6)


@st.composite
def params(draw):
    """(mu, log_sigma) as Python floats, 0-d, or broadcastable arrays; float64 or float32."""
    dtype = draw(st.sampled_from([torch.float64, torch.float32]))
    if draw(st.booleans()):
        mu, ls = draw(MU), draw(LOG_SIGMA)
        if draw(st.booleans()):
            return mu, ls, dtype
        return torch.tensor(mu, dtype=dtype), torch.tensor(ls, dtype=dtype), dtype
    shape = draw(SHAPES)
    mu = draw(hnp.arrays(np.float64, shape, elements=MU))
    ls = draw(hnp.arrays(np.float64, shape[-1:], elements=LOG_SIGMA))  # broadcasts over mu
    return torch.tensor(mu, dtype=dtype), torch.tensor(ls, dtype=dtype), dtype


PROPS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.slow
@PROPS
@given(params(), st.integers(1, 22))
def test_property_delta_f_finite_and_bounded(p, bits):
    mu, ls, _ = p
    df_n = bmrs.delta_f(mu, ls)
    df_u = bmrs.delta_f(mu, ls, "uniform", bits)
    df_0 = bmrs.delta_f(mu, ls, prior_var=0.0)
    df_w = bmrs.delta_f(mu, ls, prior_mu=-18.0, prior_var=0.25)
    for df in (df_n, df_u, df_0, df_w):
        assert df.dtype == torch.float64
        assert torch.isfinite(df).all(), df
    # dF = log E_q[p~/p] <= log max(p~/p); for BMRS_U, Q <= 1 gives dF <= -log U
    s_p = 1e-6
    bound_n = math.log((B - A) / (s_p * math.sqrt(2 * math.pi) * 0.5))
    assert (df_n <= bound_n + 1e-9).all(), df_n.max()
    lo, hi = bmrs.uniform_interval(bits)
    assert (df_u <= -math.log((hi - lo) / (B - A)) + 1e-12).all()


@pytest.mark.slow
@PROPS
@given(params())
def test_property_moments_finite_and_bounded(p):
    mu, ls, _ = p
    e = bmrs.expected_theta(mu, ls)
    v = bmrs.variance_theta(mu, ls)
    r = bmrs.snr(mu, ls)
    for t in (e, v, r):
        assert t.dtype == torch.float64 and torch.isfinite(t).all()
    lo, hi = math.exp(A), math.exp(B)
    assert (e >= lo * (1 - 1e-12)).all() and (e <= hi * (1 + 1e-12)).all(), e
    assert (v >= 0).all()
    assert (v <= (hi - lo) ** 2 / 4 * (1 + 1e-12)).all()  # Popoviciu: theta lives in [e^a, e^b]
    assert (r > 0).all()
    # SNR is E / sqrt(Var) wherever Var is representable
    ok = v > 1e-280
    assert torch.allclose(r[ok], (e / v.sqrt())[ok], rtol=1e-9)


@pytest.mark.slow
@PROPS
@given(params())
def test_property_kl_finite_nonnegative_with_gradients(p):
    mu, ls, dtype = p
    mu = torch.as_tensor(mu, dtype=dtype).clone().requires_grad_(True)
    ls = torch.as_tensor(ls, dtype=dtype).clone().requires_grad_(True)
    kl = bmrs.kl_divergence(mu, ls)
    assert kl.dtype == dtype
    assert torch.isfinite(kl).all() and (kl >= 0).all(), kl
    log_e = bmrs.log_expected_theta(mu, ls)
    assert log_e.dtype == dtype and torch.isfinite(log_e).all()
    (kl.sum() + log_e.sum()).backward()
    assert torch.isfinite(mu.grad).all() and torch.isfinite(ls.grad).all()


@pytest.mark.slow
@PROPS
@given(params(), st.floats(0.0, 1.0))
def test_property_samples_in_bounds_with_finite_gradients(p, u):
    mu, ls, dtype = p
    mu = torch.as_tensor(mu, dtype=dtype).clone().requires_grad_(True)
    ls = torch.as_tensor(ls, dtype=dtype).clone().requires_grad_(True)
    x = bmrs.sample_log_theta(mu, ls, torch.tensor(u, dtype=dtype))
    assert torch.isfinite(x).all() and (x >= A).all() and (x <= B).all()
    torch.exp(x).sum().backward()
    assert torch.isfinite(mu.grad).all() and torch.isfinite(ls.grad).all()


@pytest.mark.slow
@PROPS
@given(MU, st.floats(-40.0, 20.0))
def test_property_log_sigma_is_clamped(mu, ls):
    clamped = min(max(ls, bmrs.LOG_SIGMA_MIN), bmrs.LOG_SIGMA_MAX)
    for fn in (bmrs.delta_f, bmrs.expected_theta, bmrs.snr, bmrs.kl_divergence):
        assert scalar(fn(f64(mu), f64(ls))) == scalar(fn(f64(mu), f64(clamped)))


# ------------------------------------------------------------------------------------------------
# 5. Monotonicity


@pytest.mark.parametrize("sigma", [math.exp(-5.0), 0.05, 0.3, 1.0, 3.0, 20.0])
def test_monotone_in_mu(sigma):
    mu = torch.linspace(-19.0, 0.0, 381, dtype=torch.float64)
    ls = torch.full_like(mu, math.log(sigma))
    # reduced prior at the bottom of the support: a larger mu moves q away from it
    for prior_var in (1e-12, 0.25, 0.0):
        df = bmrs.delta_f(mu, ls, prior_var=prior_var)
        assert (df.diff() < 0).all(), f"dF not decreasing in mu (sigma={sigma}, prior_var={prior_var})"
    e = bmrs.expected_theta(mu, ls)
    assert (e.diff() > 0).all(), f"E[theta] not increasing in mu (sigma={sigma})"


# ------------------------------------------------------------------------------------------------
# 6. Sampling


@pytest.mark.slow  # 200,000 draws for each of 12 cases
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mu,sigma", [(-1.0, 0.5), (-3.0, 1.0), (-8.0, 3.0), (-15.0, 3.0), (0.0, math.exp(-5.0)), (-19.0, 2.0)])
def test_sampling_matches_moments(mu, sigma, dtype):
    n = 200_000
    gen = torch.Generator().manual_seed(1234)
    u = torch.rand(n, generator=gen, dtype=torch.float64).to(dtype)
    m = torch.tensor(mu, dtype=dtype, requires_grad=True)
    s = torch.tensor(math.log(sigma), dtype=dtype, requires_grad=True)
    x = bmrs.sample_log_theta(m, s, u)
    assert x.dtype == dtype and x.shape == (n,)
    assert torch.isfinite(x).all() and (x >= A).all() and (x <= B).all()
    theta = torch.exp(x.double())
    mean, se = theta.mean().item(), theta.std().item() / math.sqrt(n)
    expected = scalar(bmrs.expected_theta(mu, math.log(sigma)))
    # 5 standard errors plus the float32 rounding of log theta (~1e-7 * |log theta| relative)
    slack = 5 * se + (0 if dtype == torch.float64 else 2e-6 * expected * (1 + abs(mu)))
    assert abs(mean - expected) <= slack, (mean, expected, se)
    torch.exp(x).mean().backward()
    assert torch.isfinite(m.grad) and torch.isfinite(s.grad)
    assert m.grad.item() != 0.0


@pytest.mark.slow  # 200,000 draws for each case
@pytest.mark.parametrize("mu,sigma", [(-3.0, 1.0), (-8.0, 3.0), (-1.0, 0.5)])
def test_sampling_pathwise_gradient_is_unbiased(mu, sigma):
    """The mean of the per-sample reparameterisation gradients estimates d E[theta]."""
    n = 200_000
    u = torch.rand(n, generator=torch.Generator().manual_seed(99), dtype=torch.float64)
    m = torch.full((n,), mu, dtype=torch.float64, requires_grad=True)
    s = torch.full((n,), math.log(sigma), dtype=torch.float64, requires_grad=True)
    torch.exp(bmrs.sample_log_theta(m, s, u)).sum().backward()
    m0 = torch.tensor(mu, dtype=torch.float64, requires_grad=True)
    s0 = torch.tensor(math.log(sigma), dtype=torch.float64, requires_grad=True)
    torch.exp(bmrs.log_expected_theta(m0, s0)).backward()
    for per_sample, exact in ((m.grad, m0.grad), (s.grad, s0.grad)):
        se = per_sample.std().item() / math.sqrt(n)
        assert abs(per_sample.mean().item() - exact.item()) <= 5 * se + 1e-6, (per_sample.mean(), exact, se)


def test_sampling_extreme_parameters():
    u = torch.rand(1000, generator=torch.Generator().manual_seed(0))
    for dtype in (torch.float32, torch.float64):
        for mu, ls in [(5.0, -20.0), (-25.0, -20.0), (0.0, -20.0), (-20.0, -20.0), (-10.0, 5.0)]:
            m = torch.tensor(mu, dtype=dtype, requires_grad=True)
            s = torch.tensor(ls, dtype=dtype, requires_grad=True)
            x = bmrs.sample_log_theta(m, s, u.to(dtype))
            assert torch.isfinite(x).all() and (x >= A).all() and (x <= B).all()
            x.sum().backward()
            assert torch.isfinite(m.grad) and torch.isfinite(s.grad)


# ------------------------------------------------------------------------------------------------
# 7. Vectorisation and broadcasting

VEC_MU = [-19.5, -15.0, -8.0, -3.0, -1.0, 0.0, 2.0, -22.0]
VEC_LS = [-5.0, 1.0, 0.5, -1.0, -0.7, -5.0, -10.0, 0.0]

SCORES = {
    "bmrs_n": lambda m, s: bmrs.delta_f(m, s),
    "bmrs_n_wide": lambda m, s: bmrs.delta_f(m, s, prior_mu=-18.0, prior_var=0.25),
    "bmrs_n_limit": lambda m, s: bmrs.delta_f(m, s, prior_var=0.0),
    "bmrs_u4": lambda m, s: bmrs.delta_f(m, s, "uniform", 4),
    "bmrs_u8": lambda m, s: bmrs.delta_f(m, s, "uniform", 8),
    "expected": bmrs.expected_theta,
    "variance": bmrs.variance_theta,
    "snr": bmrs.snr,
    "kl": bmrs.kl_divergence,
}


@pytest.mark.parametrize("name", sorted(SCORES))
def test_vectorised_equals_scalar(name):
    fn = SCORES[name]
    vec = fn(f64(VEC_MU), f64(VEC_LS))
    assert vec.shape == (len(VEC_MU),)
    for i, (m, s) in enumerate(zip(VEC_MU, VEC_LS)):
        one = fn(m, s) if name != "kl" else fn(f64(m), f64(s))
        assert one.shape == ()
        assert scalar(one) == pytest.approx(vec[i].item(), rel=1e-13, abs=1e-300)


@pytest.mark.parametrize("name", sorted(SCORES))
def test_broadcasting(name):
    fn = SCORES[name]
    mu = f64(VEC_MU)[:, None]
    ls = f64(VEC_LS[:5])[None, :]
    out = fn(mu, ls)
    assert out.shape == (len(VEC_MU), 5)
    for i in range(len(VEC_MU)):
        for j in range(5):
            assert out[i, j].item() == pytest.approx(scalar(fn(mu[i, 0], ls[0, j])), rel=1e-13, abs=1e-300)


def test_python_floats_and_lists_accepted():
    assert bmrs.delta_f([-3.0, -8.0], [0.0, math.log(3.0)]).shape == (2,)
    assert bmrs.expected_theta(-3.0, 0.0).dtype == torch.float64
    assert bmrs.kl_divergence(torch.tensor([-3.0]), torch.tensor([0.0])).dtype == torch.float32


# ------------------------------------------------------------------------------------------------
# 8. Errors


@pytest.mark.parametrize("bits", [0, 23, -1, 24])
def test_uniform_interval_rejects_bad_precision(bits):
    message = rf"precision_bits: must be in 1\.\.22, got {bits}$"
    with pytest.raises(ValueError, match=message):
        bmrs.uniform_interval(bits)
    with pytest.raises(ValueError, match=message):
        bmrs.delta_f(-3.0, 0.0, "uniform", bits)


@pytest.mark.parametrize("bits", [1, 22])
def test_uniform_interval_accepts_range_ends(bits):
    lo, hi = bmrs.uniform_interval(bits)
    assert A <= lo < hi <= B


def test_delta_f_rejects_unknown_prior():
    with pytest.raises(ValueError, match=r"unknown prior 'bogus'; expected one of normal, uniform"):
        bmrs.delta_f(-3.0, 0.0, prior="bogus")


@pytest.mark.slow  # 300,000 structures, scored twice per prior
def test_large_inputs_scored_in_blocks_equal_one_pass():
    g = torch.Generator().manual_seed(5)
    mu = torch.rand(300_000, generator=g, dtype=torch.float64) * 30 - 25
    ls = torch.rand(300_000, generator=g, dtype=torch.float64) * 25 - 20
    for prior in ("normal", "uniform"):
        blocked = bmrs.delta_f(mu, ls, prior)
        one_pass = bmrs.delta_f_normal(mu, ls) if prior == "normal" else bmrs.delta_f_uniform(mu, ls)
        assert torch.equal(blocked, one_pass)


def test_bmrs_n_as_the_authors_code_computes_it_is_eq8_plus_half_log_2pi():
    import bmrs_surgery as bmrs
    from bmrs_surgery.criteria import bmrs_n, bmrs_n_code
    from models import get_model

    g = bmrs.attach_gates(get_model("mlp"), torch.zeros(2, 1, 32, 32))
    with torch.no_grad():  # rows of the reference table: (-15, 3) is kept by Eq. 8 (dF = -0.3617)
        g.bmrs_gates.posterior[0, :2] = torch.tensor([-15.0, -8.0])
        g.bmrs_gates.posterior[1, :2] = torch.tensor([math.log(3.0), math.log(3.0)])
    exact, code = bmrs_n(g.bmrs_gates), bmrs_n_code(g.bmrs_gates)
    torch.testing.assert_close(code.score - exact.score, torch.full_like(exact.score, 0.5 * math.log(2 * math.pi)))
    assert exact.score[0] == pytest.approx(-0.36173664, abs=1e-6)
    assert bool(exact.keep[0]) and not bool(code.keep[0])  # the code's offset prunes it, Eq. 8 keeps it
