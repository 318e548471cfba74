"""The chain as code: per-step KL, one transition, batched rollout, seeded sampler."""

from __future__ import annotations

import torch

from rlft.sampling import rollout, sample, step_kl, transition


def test_step_kl_equals_torch_kl_divergence():
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(16, 3, generator=g, dtype=torch.float64)
    delta = torch.randn(16, 3, generator=g, dtype=torch.float64)
    std = 0.37
    p = torch.distributions.Independent(torch.distributions.Normal(mean + delta, std), 1)
    q = torch.distributions.Independent(torch.distributions.Normal(mean, std), 1)
    assert torch.allclose(step_kl(delta, std), torch.distributions.kl_divergence(p, q), atol=1e-12)


def test_batched_rollout_equals_step_by_step_loop(gmm2d):
    """One batched rollout == a per-trajectory Python loop over the same noise and control."""
    g = torch.Generator().manual_seed(1)
    B, K = 8, gmm2d.num_steps
    x0 = torch.randn(B, 2, generator=g, dtype=torch.float64)
    noise = torch.randn(B, K, 2, generator=g, dtype=torch.float64)

    def control(k, x, cond):
        return 0.1 * torch.sin(x + k)

    out = rollout(gmm2d, x0, control, noise=noise, keep_path=True)
    for b in range(B):
        x = x0[b : b + 1]
        kl = 0.0
        for k in range(K):
            mean = gmm2d.coefficients.mean_x[k] * x + gmm2d.coefficients.mean_score[k] * gmm2d.score(k, x)
            delta = 0.1 * torch.sin(x + k)
            std = gmm2d.coefficients.std[k]
            kl += float((delta**2).sum() / (2 * std**2))
            x = mean + delta + std * noise[b : b + 1, k]
            assert torch.allclose(out.path[b, k + 1], x[0], atol=1e-12)
        assert torch.allclose(out.x[b], x[0], atol=1e-12)
        assert abs(float(out.kl[b]) - kl) < 1e-9 * max(1.0, kl)


def test_rollout_is_differentiable_through_control(gmm2d):
    theta = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    x0 = torch.zeros(4, 2, dtype=torch.float64)
    out = rollout(gmm2d, x0, lambda k, x, c: theta.expand_as(x), generator=torch.Generator().manual_seed(0))
    (out.x.sum() + out.kl.sum()).backward()
    assert theta.grad is not None and torch.isfinite(theta.grad).all() and theta.grad.abs().sum() > 0


def test_sampler_is_seeded_and_zero_control_is_pretrained(gmm2d):
    a = sample(gmm2d, 300, seed=5, batch_size=128, progress=False)
    b = sample(gmm2d, 300, seed=5, batch_size=128, progress=False)
    c = sample(gmm2d, 300, control=lambda k, x, cond: torch.zeros_like(x), seed=5, batch_size=128, progress=False)
    d = sample(gmm2d, 300, seed=6, batch_size=128, progress=False)
    assert torch.equal(a.x, b.x) and torch.equal(a.x, c.x)
    assert not torch.equal(a.x, d.x)
    assert float(c.kl.abs().max()) == 0.0


def test_transition_uses_model_mean_and_std(gmm2d):
    x = torch.randn(5, 2, dtype=torch.float64)
    eps = torch.randn(5, 2, dtype=torch.float64)
    delta = torch.full((5, 2), 0.2, dtype=torch.float64)
    expected = gmm2d.mean(3, x) + delta + gmm2d.std(3) * eps
    assert torch.allclose(transition(gmm2d, 3, x, delta, eps), expected)


def test_pretrained_chain_samples_the_data(gmm2d):
    """The K=50 chain reproduces the mixture's mean and covariance (discretisation is accurate)."""
    out = sample(gmm2d, 20_000, seed=0, progress=False)
    x = out.x
    assert torch.allclose(x.mean(0), gmm2d.data.mean(), atol=0.04)
    assert torch.allclose(torch.cov(x.T), gmm2d.data.covariance(), atol=0.06)


def test_noise_kernels_compose_to_the_forward_marginal(gmm2d):
    """Adding noise level by level from data to level 0 gives y_0 = a y_K + sqrt(1 - a^2) eps."""
    c = gmm2d.coefficients
    scale, var = 1.0, 0.0
    for k in reversed(range(gmm2d.num_steps)):
        s, std = gmm2d.noise_kernel(k)
        scale, var = s * scale, s * s * var + std * std
    expected = (c.alpha_bar[0] / c.alpha_bar[-1]) ** 0.5
    assert abs(scale - expected) < 1e-12
    assert abs(var - (1 - expected**2)) < 1e-12
