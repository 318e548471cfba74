"""The exact Gaussian-mixture bed against closed forms and Monte-Carlo (float64, fixed seeds)."""

from __future__ import annotations

import math

import pytest
import torch

from rlft.models.gmm import GaussianMixture, GMMModel
from rlft.rewards.builtin import LinearReward, QuadraticReward


def _exact_log_density(model: GMMModel, k: int, x: torch.Tensor) -> torch.Tensor:
    """log q_s(x) written out from scratch: sum_c w_c N(x; a m_c, (a^2 s_c^2 + 1 - a^2) I)."""
    ab = model.coefficients.alpha_bar[k]
    a = math.sqrt(ab)
    w, m, s = model.data.weights, model.data.means, model.data.stds
    terms = []
    for c in range(len(w)):
        var = a * a * s[c] ** 2 + 1 - a * a
        dist = torch.distributions.MultivariateNormal(a * m[c], var * torch.eye(m.shape[1], dtype=torch.float64))
        terms.append(torch.log(w[c]) + dist.log_prob(x))
    return torch.logsumexp(torch.stack(terms, -1), -1)


@pytest.mark.parametrize("fixture", ["gmm2d", "gmm3d"])
def test_score_equals_autograd_of_exact_log_density(fixture, request):
    model = request.getfixturevalue(fixture)
    g = torch.Generator().manual_seed(0)
    for k in [0, 5, model.num_steps // 2, model.num_steps - 1, model.num_steps]:
        x = torch.randn((64, model.event_dim), generator=g, dtype=torch.float64) * 2
        x.requires_grad_(True)
        (grad,) = torch.autograd.grad(_exact_log_density(model, k, x).sum(), x)
        assert torch.allclose(model.score(k, x.detach()), grad, atol=1e-10, rtol=1e-8)



@pytest.mark.parametrize("fixture", ["gmm2d", "gmm3d"])
def test_float32_score_agrees_with_the_float64_reference_form(fixture, request):
    model = request.getfixturevalue(fixture)
    g = torch.Generator().manual_seed(1)
    for k in [0, model.num_steps // 2, model.num_steps - 1, model.num_steps]:
        x = torch.randn((512, model.event_dim), generator=g, dtype=torch.float64) * 3  # far tails included
        want = model.marginal(k).score(x)
        got = model.score(k, x.float())
        assert got.dtype == torch.float32
        assert float((got.double() - want).norm() / want.norm()) < 1e-5, k


def test_float32_score_of_runaway_states_falls_back_to_float64(gmm2d):
    """|x| ~ 1e20 (a diverging baseline's states): |x|^2 overflows float32, the score must stay finite and exact."""
    k = gmm2d.num_steps
    x = torch.tensor([[1e20, -3e20], [0.5, 0.5]], dtype=torch.float64)
    got = gmm2d.score(k, x.float())
    assert got.dtype == torch.float32 and bool(torch.isfinite(got).all())
    want = gmm2d.marginal(k).score(x.float().double())
    assert torch.allclose(got.double(), want, rtol=1e-6)

def _importance_estimates(mix: GaussianMixture, reward, alpha: float, n: int, seed: int):
    """Self-normalised importance estimates of the tilted target from samples of p_data."""
    x = mix.sample(n, torch.Generator().manual_seed(seed))
    logw = reward(x) / alpha
    w = torch.softmax(logw, 0)
    mean = (w[:, None] * x).sum(0)
    cov = (w[:, None, None] * torch.einsum("bi,bj->bij", x - mean, x - mean)).sum(0)
    j_star = alpha * (torch.logsumexp(logw, 0) - math.log(n))
    ess = 1.0 / (w**2).sum()
    return mean, cov, float(j_star), float(ess)


@pytest.mark.parametrize(
    "reward,alpha",
    [
        (QuadraticReward([1.0, 0.5], 1.0), 1.0),
        (QuadraticReward([0.0, -1.0], 2.0), 0.5),
        (LinearReward([0.5, -0.3]), 1.0),
        (LinearReward([1.0, 1.0]), 2.0),
    ],
)
def test_exact_tilt_matches_importance_sampling(gmm2d, reward, alpha):
    reward.center = reward.center.double() if hasattr(reward, "center") else None
    reward.direction = reward.direction.double() if hasattr(reward, "direction") else None
    target = gmm2d.exact_target(reward, alpha)
    mean, cov, j_star, ess = _importance_estimates(gmm2d.data, reward, alpha, 400_000, seed=1)
    assert ess > 10_000  # the check below is meaningful only with many effective samples
    se = torch.sqrt(torch.diagonal(target.mixture.covariance()) / ess)
    assert torch.all((mean - target.mixture.mean()).abs() < 5 * se + 1e-3)
    assert torch.allclose(cov, target.mixture.covariance(), atol=0.03)
    assert abs(j_star - target.optimal_objective) < 0.02 * max(1.0, abs(target.optimal_objective))


def test_tilted_target_is_normalised_and_agrees_with_density_ratio(gmm3d):
    """p_tar(x) = exp(r/alpha) p(x) / C pointwise, with C = exp(J*/alpha)."""
    reward = QuadraticReward([0.5, 0.0, -0.5], 1.5)
    reward.center = reward.center.double()
    alpha = 0.7
    target = gmm3d.exact_target(reward, alpha)
    x = torch.randn(50, 3, dtype=torch.float64)
    lhs = target.mixture.log_prob(x)
    rhs = reward(x) / alpha + gmm3d.data.log_prob(x) - target.log_normaliser
    assert torch.allclose(lhs, rhs, atol=1e-10)


def _reverse_conditional_mean(mix: GaussianMixture, ab: float, ab_next: float, x: torch.Tensor) -> torch.Tensor:
    """E[y_{s'} | y_s = x] of the forward-diffused mixture, written out from the joint Gaussians (no chain coefficients).

    Per component c (mean m, std v0): y_{s'} = a' x0 + sqrt(1 - a'^2) e1, y_s = sqrt(ab/ab') y_{s'} + sqrt(1 - ab/ab') e2,
    so Var y_{s'} = a'^2 v0^2 + 1 - a'^2 =: v', Var y_s = a^2 v0^2 + 1 - a^2 =: v, Cov = sqrt(ab/ab') v', and
    E[y_{s'} | y_s = x, c] = a' m + sqrt(ab/ab') v'/v (x - a m); the components are weighted by w_c N(x; a m, v I).
    """
    a, a_next = math.sqrt(ab), math.sqrt(ab_next)
    out, logw = [], []
    for w, m, sd in zip(mix.weights, mix.means, mix.stds):
        v_next, v = ab_next * sd**2 + 1 - ab_next, ab * sd**2 + 1 - ab
        out.append(a_next * m + math.sqrt(ab / ab_next) * v_next / v * (x - a * m))  # (B, D)
        dist = torch.distributions.MultivariateNormal(a * m, v * torch.eye(x.shape[1], dtype=torch.float64))
        logw.append(torch.log(w) + dist.log_prob(x))  # (B,)
    resp = torch.softmax(torch.stack(logw, -1), -1)  # (B, C)
    return (resp[..., None] * torch.stack(out, 1)).sum(1)  # (B, D)


def test_optimal_control_is_the_target_chain(gmm2d):
    """delta*_k turns the pretrained mean into E_tar[x_{k+1} | x_k]: the DDPM posterior mean with the exact score is the
    exact reverse conditional mean of the forward-diffused target (Tweedie), checked against the joint Gaussians."""
    reward = QuadraticReward([1.0, 0.0], 1.0)
    reward.center = reward.center.double()
    oc = gmm2d.optimal_control(reward, 1.0)
    ab = gmm2d.coefficients.alpha_bar
    x = 1.5 * torch.randn(32, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for k in [0, 10, 30, 49]:
        want = _reverse_conditional_mean(oc.target.mixture, ab[k], ab[k + 1], x)
        assert torch.allclose(gmm2d.mean(k, x) + oc(k, x), want, rtol=1e-9, atol=1e-10), k
        # and without the control, the pretrained mean is that of the pretrained mixture
        assert torch.allclose(gmm2d.mean(k, x), _reverse_conditional_mean(gmm2d.data, ab[k], ab[k + 1], x), rtol=1e-9, atol=1e-10)
    for k in [0, 10, 25]:
        # the continuous-time control u* = sigma^2 (score_tar - score) gives delta = u* dt to first order
        # in the step (mean_score_k = beta(s_k) dt_k + O(dt^2); not on the last steps, where beta varies
        # by a large factor within one step)
        delta_cont = oc.drift(gmm2d.time(k), x) * gmm2d.dt(k)
        assert torch.allclose(oc(k, x), delta_cont, rtol=0.1, atol=1e-3)


def test_optimal_initial_distribution_matches_density_ratio(gmm2d):
    """With a small beta_max, a(T) is not tiny and nu* = nu_ini q_tar/q differs from nu_ini."""
    from rlft.schedule import VPSchedule

    model = GMMModel(gmm2d.data, num_steps=20, schedule=VPSchedule(beta_min=0.1, beta_max=2.0))
    reward = LinearReward([1.5, 0.0])
    reward.direction = reward.direction.double()
    oc = model.optimal_control(reward, 1.0)
    oc.num_proposals = 200
    x0, log_ratio = oc.init_sample(20_000, torch.Generator().manual_seed(3))
    # exact mean of nu* by quadrature on a grid
    grid = torch.linspace(-6, 6, 241, dtype=torch.float64)
    xx = torch.cartesian_prod(grid, grid)
    log_nu = -0.5 * (xx**2).sum(-1) + oc._log_ratio(xx)
    w = torch.softmax(log_nu, 0)
    exact_mean = (w[:, None] * xx).sum(0)
    assert exact_mean[0] > 0.2  # nu* really differs from nu_ini here
    assert torch.allclose(x0.double().mean(0), exact_mean, atol=0.04)
    # mean log ratio estimates KL(nu* || nu_ini) = E_nu*[log nu*/nu_ini] >= 0
    log_z = torch.logsumexp(log_nu, 0) + 2 * math.log(grid[1] - grid[0]) - math.log(2 * math.pi)
    exact_kl = float((w * (oc._log_ratio(xx) - log_z)).sum())
    assert abs(float(log_ratio.double().mean()) - exact_kl) < 0.03


def test_bad_mixtures_are_rejected():
    with pytest.raises(ValueError, match="sum to 1"):
        GaussianMixture.create([0.5, 0.6], [[0.0], [1.0]], [1.0, 1.0])
    with pytest.raises(ValueError, match="stds must be > 0"):
        GaussianMixture.create([0.5, 0.5], [[0.0], [1.0]], [1.0, 0.0])
    with pytest.raises(ValueError, match="one entry per component"):
        GaussianMixture.create([1.0], [[0.0], [1.0]], [1.0, 1.0])


def test_tilt_without_closed_form_raises(gmm2d):
    from rlft.rewards.builtin import DistanceToModeReward

    with pytest.raises(NotImplementedError, match="closed-form"):
        gmm2d.exact_target(DistanceToModeReward(model=gmm2d), 1.0)
