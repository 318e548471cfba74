"""rlft/guidance/restart.py against what it promises (Xu et al. 2023; MATH.md §5).

- the forward kernel between adjacent levels, by Monte Carlo, has the VP closed form computed from the
  schedule alone (scale a(s_l) / a(s_{l+1}), variance 1 - scale^2), and it carries the exact forward marginal
  at level l+1 to the exact marginal at level l (Xu et al. eq. 6: restarts re-noise with the forward process);
- `jump_kernel` is that kernel composed, a(s_noisy) / a(s_clean), and one jump has its moments;
- draw order: `restart_sample` is the documented generator sequence (x_0, then each noising draw) run through
  `run_actions`, draw for draw, in both noising forms and across batches; R = 0 is the plain ODE sampler;
- bookkeeping: NFE = K + R (clean - noisy) = the DENOISE actions; invalid schedules and actions are refused;
- with the exact score, restarting keeps the data law (moments of a Gaussian data law, closed form).
"""

from __future__ import annotations

import math

import pytest
import torch

from rlft.guidance.restart import DENOISE, NOISE, RestartSchedule, jump_kernel, restart_sample, run_actions

K = 12


def _a(model, level: int) -> float:
    """a(s_level) from the schedule's closed form (not from the chain's coefficients)."""
    s = model.schedule.levels(model.num_steps)[level].item()
    return math.exp(model.schedule.log_a(s))


def _moments_close(x: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor, z: float = 4.5) -> None:
    """Sample mean within z s.e. per coordinate; sample covariance within z s.e. (Gaussian-approximate)."""
    n = x.shape[0]
    m = x.mean(0)
    se_m = torch.sqrt(torch.diagonal(cov) / n)
    assert (torch.abs(m - mean) < z * se_m).all(), (m, mean, se_m)
    c = torch.cov(x.T)
    d = torch.diagonal(cov)
    se_c = torch.sqrt((cov**2 + torch.outer(d, d)) / n)  # Var of a sample covariance entry (Gaussian 4th moments)
    assert (torch.abs(c - cov) < z * se_c + 1e-12).all(), (c, cov, se_c)


def test_adjacent_forward_kernel_moments_by_monte_carlo(gmm_factory):
    model = gmm_factory(K)
    g = torch.Generator().manual_seed(0)
    n = 200_000
    for level in (0, 5, K - 1):  # level+1 -> level
        scale = _a(model, level) / _a(model, level + 1)
        x = torch.tensor([[1.3, -0.7]], dtype=torch.float64).expand(n, 2)
        y = model.noise_step(level, x, g)
        cov = (1 - scale**2) * torch.eye(2, dtype=torch.float64)
        _moments_close(y, scale * x[0], cov)


@pytest.mark.parametrize("clean,noisy", [(K - 1, K - 2), (9, 3), (K, 0)])
def test_noising_carries_the_exact_marginal_up_the_levels(clean, noisy, gmm_factory):
    """x ~ q_clean (exact mixture marginal), NOISE actions up to `noisy`: x ~ q_noisy, in mean and covariance."""
    model = gmm_factory(K)
    g = torch.Generator().manual_seed(1)
    x = model.marginal(clean).sample(100_000, g)
    y, level, nfe = run_actions(model, x, [NOISE] * (clean - noisy), clean, generator=g)
    assert level == noisy and nfe == 0
    target = model.marginal(noisy)
    _moments_close(y, target.mean(), target.covariance())


def test_jump_kernel_is_the_composed_vp_kernel(gmm_factory):
    model = gmm_factory(K)
    for noisy, clean in ((0, K), (2, 7), (5, 6)):
        scale, std = jump_kernel(model, noisy, clean)
        a = _a(model, noisy) / _a(model, clean)
        assert scale == pytest.approx(a, rel=1e-10)
        assert std == pytest.approx(math.sqrt(1 - a * a), rel=1e-9)
    assert jump_kernel(model, 4, 4) == (1.0, 0.0)
    # one jump from a point, by Monte Carlo: level-by-level noising has the same law
    g = torch.Generator().manual_seed(2)
    x = torch.tensor([[0.4, 2.0]], dtype=torch.float64).expand(100_000, 2)
    y, _, _ = run_actions(model, x, [NOISE] * 7, 9, generator=g)
    scale, std = jump_kernel(model, 2, 9)
    _moments_close(y, scale * x[0], std**2 * torch.eye(2, dtype=torch.float64))


@pytest.mark.parametrize("schedule", [RestartSchedule(), RestartSchedule(2, 7, 3), RestartSchedule(0, K - 1, 1)],
                         ids=["ode", "R3", "full"])
def test_restart_sample_is_the_documented_draw_sequence(schedule, gmm_factory):
    """x_0 from the prior, then the noising draws in schedule order, through `run_actions`: draw for draw."""
    model = gmm_factory(K)
    n = 64
    out = restart_sample(model, n, schedule, seed=5, progress=False)
    g = torch.Generator().manual_seed(5)
    x = model.prior_sample(n, g)
    ref, level, nfe = run_actions(model, x, schedule.actions(K), 0, generator=g)
    assert level == K and nfe == out.nfe == schedule.nfe(K)
    assert torch.equal(out.x, ref)
    # batches continue the same generator: the first batch of a split run is the unsplit run of that size
    split = restart_sample(model, n + 10, schedule, seed=5, batch_size=n, progress=False)
    assert torch.equal(split.x[:n], out.x) and split.x.shape == (n + 10, 2)


def test_single_jump_draw_sequence(gmm_factory):
    model = gmm_factory(K)
    sched = RestartSchedule(3, 8, 2)
    out = restart_sample(model, 32, sched, seed=3, single_jump=True, progress=False)
    g = torch.Generator().manual_seed(3)
    x = model.prior_sample(32, g)
    x, _, _ = run_actions(model, x, [DENOISE] * 8, 0)
    scale, std = jump_kernel(model, 3, 8)
    for _ in range(2):
        x = scale * x + std * torch.randn(x.shape, generator=g, dtype=x.dtype)
        x, _, _ = run_actions(model, x, [DENOISE] * 5, 3)
    x, _, _ = run_actions(model, x, [DENOISE] * (K - 8), 8)
    assert torch.equal(out.x, x)


def test_zero_restarts_is_the_plain_ode_sampler(gmm_factory):
    model = gmm_factory(K)
    g = torch.Generator().manual_seed(4)
    x = model.prior_sample(16, g)
    for k in range(K):
        x = model.ode_step(k, x)
    out = restart_sample(model, 16, RestartSchedule(2, 5, 0), seed=4, progress=False)
    assert torch.equal(out.x, x) and out.nfe == K


def test_nfe_and_actions_bookkeeping():
    for sched in (RestartSchedule(), RestartSchedule(1, 4, 2), RestartSchedule(0, K - 1, 3)):
        actions = sched.actions(K)
        gap = sched.clean_level - sched.noisy_level
        assert sched.nfe(K) == K + sched.num_restarts * gap == actions.count(DENOISE)
        assert actions.count(NOISE) == sched.num_restarts * gap
        assert len(actions) == K + 2 * sched.num_restarts * gap
        # the walk never leaves [0, K] and ends at K
        level = 0
        for a in actions:
            level += 1 if a == DENOISE else -1
            assert 0 <= level <= K
        assert level == K


def test_invalid_schedules_and_actions_are_refused(gmm_factory):
    model = gmm_factory(K)
    with pytest.raises(ValueError, match="num_restarts must be >= 0"):
        RestartSchedule(0, 3, -1)
    with pytest.raises(ValueError, match="noisy_level < clean_level"):
        RestartSchedule(4, 4, 1)
    with pytest.raises(ValueError, match=f"clean_level must be < K = {K}"):
        RestartSchedule(1, K, 1).nfe(K)
    x = model.prior_sample(2)
    with pytest.raises(ValueError, match=f"DENOISE at level K = {K}"):
        run_actions(model, x, [DENOISE], K)
    with pytest.raises(ValueError, match="restart actions are 0"):
        run_actions(model, x, [2], 0)
    y, level, nfe = run_actions(model, x, [NOISE, NOISE], 0)  # noising at level 0 is a no-op, as in the env
    assert torch.equal(y, x) and (level, nfe) == (0, 0)
    with pytest.raises(ValueError, match="n and batch_size must be >= 1"):
        restart_sample(model, 0, progress=False)


def test_restarts_keep_the_data_law_with_the_exact_score(gaussian_chain_factory):
    """Gaussian data N(mu, s^2 I), exact score: restarted samples keep the plain ODE sampler's law.

    At K = 40 the deterministic sampler itself under-disperses (measured variance 0.323 for s^2 = 0.36, mean
    within 0.006); restarts re-noise with the exact forward kernel, so they must not move the law further
    (measured 0.315-0.319): a wrong kernel scale or variance shows here as a shifted mean or variance."""
    mu, s = torch.tensor([1.0, -0.5], dtype=torch.float64), 0.6
    model = gaussian_chain_factory(mu.tolist(), s, num_steps=40)
    plain = restart_sample(model, 20_000, RestartSchedule(), seed=0, progress=False).x
    assert torch.allclose(plain.mean(0), mu, atol=0.03)
    assert torch.allclose(plain.var(0), torch.full((2,), s * s, dtype=plain.dtype), rtol=0.15)
    for sched in (RestartSchedule(10, 30, 4), RestartSchedule(30, 38, 8)):
        for single_jump in (False, True):
            x = restart_sample(model, 20_000, sched, seed=1, single_jump=single_jump, progress=False).x
            assert torch.allclose(x.mean(0), mu, atol=0.03), (sched, x.mean(0))
            assert torch.allclose(x.var(0), plain.var(0), rtol=0.05), (sched, x.var(0), plain.var(0))
