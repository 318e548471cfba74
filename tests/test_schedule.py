"""rlft/schedule.py against closed forms that do not reuse its formulas.

- a(s) and beta(s) against the VP-SDE's own moment ODEs (dm/ds = -beta m / 2, dv/ds = -beta v + beta),
  integrated with RK4, and log a against finite differences (d log a / ds = -beta / 2);
- the per-step coefficients against the exact Gaussian conditionals of a Gaussian data law N(mu, v0 I):
  the DDPM mean with the exact score is E[x_{s'} | x_s] (Tweedie + linearity), the reverse variance is
  beta v_{s'} / v_s ("large" at v0 = 1, "small" at v0 = 0), DDIM is exact transport for a point mass, and the
  forward kernel preserves variance (scale^2 + std^2 = 1) and composes to the marginal.
"""

from __future__ import annotations

import math

import pytest
import torch

from rlft.schedule import LevelCoefficients, VPSchedule

SCHEDULES = [VPSchedule(), VPSchedule(beta_min=0.5, beta_max=5.0, T=2.0, s_min=0.01)]


def _rk4_moments(schedule: VPSchedule, s_end: float, m0: float, v0: float, steps: int = 4000) -> tuple[float, float]:
    """Mean and variance of the forward VP SDE at noise time s_end from y_0 ~ N(m0, v0): RK4 on the moment ODEs."""

    def f(s, m, v):
        b = schedule.beta(s)
        return -0.5 * b * m, -b * v + b

    h = s_end / steps
    m, v, s = m0, v0, 0.0
    for _ in range(steps):
        k1 = f(s, m, v)
        k2 = f(s + h / 2, m + h / 2 * k1[0], v + h / 2 * k1[1])
        k3 = f(s + h / 2, m + h / 2 * k2[0], v + h / 2 * k2[1])
        k4 = f(s + h, m + h * k3[0], v + h * k3[1])
        m += h / 6 * (k1[0] + 2 * k2[0] + 2 * k3[0] + k4[0])
        v += h / 6 * (k1[1] + 2 * k2[1] + 2 * k3[1] + k4[1])
        s += h
    return m, v


@pytest.mark.parametrize("schedule", SCHEDULES, ids=["default", "T2"])
def test_signal_fraction_solves_the_forward_sde(schedule):
    """y_s | y_0 ~ N(a(s) y_0, (1 - a(s)^2)): the moments the SDE's own ODEs give, at several s."""
    for frac in (0.1, 0.37, 0.8, 1.0):
        s = frac * schedule.T
        m, v = _rk4_moments(schedule, s, m0=1.7, v0=0.0)
        a = math.exp(schedule.log_a(s))
        assert m == pytest.approx(a * 1.7, rel=1e-9)
        assert v == pytest.approx(1.0 - schedule.alpha_bar(s), rel=1e-9)
        assert schedule.alpha_bar(s) == pytest.approx(a * a, rel=1e-12)


@pytest.mark.parametrize("schedule", SCHEDULES, ids=["default", "T2"])
def test_beta_is_linear_and_log_a_its_half_integral(schedule):
    assert schedule.beta(0.0) == pytest.approx(schedule.beta_min)
    assert schedule.beta(schedule.T) == pytest.approx(schedule.beta_max)
    assert schedule.beta(schedule.T / 2) == pytest.approx((schedule.beta_min + schedule.beta_max) / 2)
    assert schedule.log_a(0.0) == 0.0
    h = 1e-5
    for s in (0.05, 0.5, 0.9):
        s = s * schedule.T
        slope = (schedule.log_a(s + h) - schedule.log_a(s - h)) / (2 * h)
        assert slope == pytest.approx(-0.5 * schedule.beta(s), rel=1e-7)


def test_levels_run_from_T_down_to_s_min_uniformly():
    schedule = VPSchedule(T=2.0, s_min=0.01)
    levels = schedule.levels(8)
    assert levels.dtype == torch.float64 and levels.shape == (9,)
    assert levels[0].item() == 2.0 and levels[-1].item() == pytest.approx(0.02)
    steps = levels[:-1] - levels[1:]
    assert torch.allclose(steps, steps[0].expand_as(steps)) and (steps > 0).all()
    c = LevelCoefficients.from_schedule(schedule, 8)
    assert c.times[0] == 0.0 and c.times[-1] == pytest.approx(2.0 - 0.02)
    assert sum(c.dt) == pytest.approx(2.0 - 0.02) and all(dt > 0 for dt in c.dt)


@pytest.mark.parametrize(
    "bad", [dict(beta_min=0.0), dict(beta_min=2.0, beta_max=1.0), dict(T=0.0), dict(s_min=0.0), dict(s_min=1.0)]
)
def test_invalid_schedules_are_refused(bad):
    with pytest.raises(ValueError, match="schedule"):
        VPSchedule(**bad)
    with pytest.raises(ValueError, match="num_steps"):
        VPSchedule().levels(0)


def _gaussian_moments(ab: float, mu: float, v0: float) -> tuple[float, float]:
    """Mean and variance of the forward marginal at signal fraction ab of data N(mu, v0)."""
    return math.sqrt(ab) * mu, ab * v0 + 1.0 - ab


@pytest.mark.parametrize("v0", [0.0, 0.3, 1.0, 4.0])
def test_ddpm_mean_is_the_exact_reverse_conditional_mean(v0):
    """For Gaussian data the chain mean with the exact score equals E[x_{s'} | x_s] in closed form.

    (x_s, x_{s'}) are jointly Gaussian with Cov = sqrt(alpha) Var(x_{s'}) (x_s = sqrt(alpha) x_{s'} + sqrt(beta)
    eps), so E[x_{s'} | x_s] = mu' + sqrt(alpha) v' / v (x_s - mu)."""
    c = LevelCoefficients.from_schedule(VPSchedule(), 20)
    mu = 0.8
    for k in (0, 5, 12, 19):
        ab, ab_next = c.alpha_bar[k], c.alpha_bar[k + 1]
        m, v = _gaussian_moments(ab, mu, v0)
        m_next, v_next = _gaussian_moments(ab_next, mu, v0)
        alpha = ab / ab_next
        for x in (-1.3, 0.0, 2.1):
            score = -(x - m) / v
            mean = c.mean_x[k] * x + c.mean_score[k] * score
            exact = m_next + math.sqrt(alpha) * v_next / v * (x - m)
            assert mean == pytest.approx(exact, rel=1e-9, abs=1e-12), (k, x)


def test_reverse_std_is_the_exact_conditional_std_at_its_two_limits():
    """Var[x_{s'} | x_s] = beta v_{s'} / v_s: "large" is it for v0 = 1 (= beta), "small" for v0 = 0."""
    ab_list = [VPSchedule().alpha_bar(s) for s in VPSchedule().levels(20).tolist()]
    times = list(range(21))
    large = LevelCoefficients.from_alpha_bars(ab_list, times, variance="large")
    small = LevelCoefficients.from_alpha_bars(ab_list, times, variance="small")
    for k in range(20):
        ab, ab_next = ab_list[k], ab_list[k + 1]
        beta = 1.0 - ab / ab_next
        for v0, coeffs in ((1.0, large), (0.0, small)):
            v = _gaussian_moments(ab, 0.0, v0)[1]
            v_next = _gaussian_moments(ab_next, 0.0, v0)[1]
            assert coeffs.std[k] ** 2 == pytest.approx(beta * v_next / v, rel=1e-9)
    with pytest.raises(ValueError, match="variance"):
        LevelCoefficients.from_alpha_bars(ab_list, times, variance="medium")


def test_ddim_step_is_exact_transport_of_a_point_mass():
    """Data = a point mass at mu: x_s = sqrt(ab) mu + sqrt(1 - ab) eps, and DDIM maps it to the same eps at s'."""
    c = LevelCoefficients.from_schedule(VPSchedule(), 20)
    mu = -0.6
    for k in (0, 7, 19):
        ab, ab_next = c.alpha_bar[k], c.alpha_bar[k + 1]
        for eps in (-1.5, 0.2, 2.0):
            x = math.sqrt(ab) * mu + math.sqrt(1 - ab) * eps
            score = -(x - math.sqrt(ab) * mu) / (1 - ab)
            ode = c.ode_x[k] * x + c.ode_score[k] * score
            assert ode == pytest.approx(math.sqrt(ab_next) * mu + math.sqrt(1 - ab_next) * eps, rel=1e-9, abs=1e-12)


def test_forward_kernel_preserves_variance_and_composes_to_the_marginal():
    """x_k = scale x_{k+1} + std eps: scale^2 + std^2 = 1 (VP), and composing k+1 -> ... -> 0 gives a(s_0)/a(s_{k+1})."""
    schedule = VPSchedule()
    c = LevelCoefficients.from_schedule(schedule, 20)
    levels = schedule.levels(20).tolist()
    for k in range(20):
        assert c.kernel_scale[k] ** 2 + c.kernel_std[k] ** 2 == pytest.approx(1.0, rel=1e-12)
    for top in (5, 13, 20):
        scale, var = 1.0, 0.0
        for k in range(top - 1, -1, -1):  # level top -> top-1 -> ... -> 0
            scale, var = c.kernel_scale[k] * scale, c.kernel_scale[k] ** 2 * var + c.kernel_std[k] ** 2
        a = math.exp(schedule.log_a(levels[0]) - schedule.log_a(levels[top]))
        assert scale == pytest.approx(a, rel=1e-10)
        assert var == pytest.approx(1 - a * a, rel=1e-10)
