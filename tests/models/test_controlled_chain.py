"""ControlledChain: a fine-tuned sampler is a model (float64, fixed seeds, on the exact GMM bed)."""

from __future__ import annotations

import math

import pytest
import torch

from rlft.models.base import ControlledChain, DiffusionModel
from rlft.rewards.builtin import LinearReward, QuadraticReward
from rlft.sampling import rollout, sample


def _quadratic(center, scale):
    reward = QuadraticReward(center, scale)
    reward.center = reward.center.double()
    return reward


def _linear(direction):
    reward = LinearReward(direction)
    reward.direction = reward.direction.double()
    return reward


def test_sampling_the_controlled_chain_reproduces_sampling_with_the_control(gmm2d):
    oc = gmm2d.optimal_control(_quadratic([1.0, 0.5], 1.0), 1.0)
    chain = ControlledChain(gmm2d, oc)
    assert isinstance(chain, DiffusionModel) and chain.num_steps == gmm2d.num_steps and chain.dtype == torch.float64
    want = sample(gmm2d, 300, control=oc, seed=7, batch_size=128, progress=False)
    got = sample(chain, 300, seed=7, batch_size=128, progress=False)
    assert torch.equal(got.x, want.x)
    assert torch.equal(got.kl, torch.zeros(300, dtype=torch.float64))  # the chain is its own reference
    assert float(want.kl.mean()) > 0.1  # ... while the control really moved the base chain


def test_init_distribution_draws_the_prior(gmm2d):
    oc = gmm2d.optimal_control(_linear([1.0, 0.0]), 1.0)
    want = sample(gmm2d, 200, control=oc, init=oc, seed=3, batch_size=64, progress=False)
    got = sample(ControlledChain(gmm2d, oc, init=oc), 200, seed=3, batch_size=64, progress=False)
    assert torch.equal(got.x, want.x)
    with pytest.raises(NotImplementedError, match="has no log_prob"):
        ControlledChain(gmm2d, oc, init=oc).prior_log_prob(got.x)
    plain = ControlledChain(gmm2d, oc)
    assert torch.equal(plain.prior_log_prob(got.x), gmm2d.prior_log_prob(got.x))


@pytest.mark.parametrize("reward,alpha", [(_quadratic([1.0, 0.5], 1.0), 1.0), (_linear([0.5, -0.3]), 0.5)])
def test_score_is_the_forward_diffused_tilted_target_score(gmm2d, reward, alpha):
    """Bridge preservation: the optimal controlled chain's score at level k is grad log q_tar,k, computed here by
    autograd of the tilted mixture's diffused log-density (independent of the chain's coefficients)."""
    oc = gmm2d.optimal_control(reward, alpha)
    chain = ControlledChain(gmm2d, oc)
    g = torch.Generator().manual_seed(0)
    for k in [0, 7, gmm2d.num_steps // 2, gmm2d.num_steps - 1]:
        x = (torch.randn((64, 2), generator=g, dtype=torch.float64) * 2).requires_grad_(True)
        target_k = oc.target.mixture.diffuse(gmm2d.coefficients.alpha_bar[k])
        (want,) = torch.autograd.grad(target_k.log_prob(x).sum(), x)
        got = chain.score(k, x.detach())
        assert torch.allclose(got, want, rtol=1e-7, atol=1e-8), k
        assert not torch.allclose(gmm2d.score(k, x.detach()), want, atol=1e-3)  # the base score differs


def test_ode_step_is_the_target_chains_ode_step(gmm2d):
    from rlft.models.gmm import GMMModel

    oc = gmm2d.optimal_control(_quadratic([0.0, -1.0], 2.0), 0.5)
    chain = ControlledChain(gmm2d, oc)
    target_chain = GMMModel(oc.target.mixture, num_steps=gmm2d.num_steps, schedule=gmm2d.schedule).to(dtype=torch.float64)
    x = torch.randn((32, 2), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for k in [0, 20, gmm2d.num_steps - 1]:
        assert torch.allclose(chain.ode_step(k, x), target_chain.ode_step(k, x), rtol=1e-8, atol=1e-10)
        assert chain.std(k) == gmm2d.std(k) and chain.time(k) == gmm2d.time(k) and chain.dt(k) == gmm2d.dt(k)
        assert chain.noise_kernel(k) == gmm2d.noise_kernel(k)


def test_a_controlled_chain_of_a_controlled_chain_adds_both_controls(gmm2d):
    def u1(k, x, cond=None):
        return 0.01 * (k + 1) * torch.tanh(x)

    def u2(k, x, cond=None):
        return -0.02 * x.flip(-1) + 0.003

    inner = ControlledChain(gmm2d, u1)
    outer = ControlledChain(inner, u2)
    x = torch.randn((16, 2), generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    for k in [0, 13, gmm2d.num_steps - 1]:
        c_mean = gmm2d.coefficients.mean_score[k]
        assert torch.allclose(outer.mean(k, x), gmm2d.mean(k, x) + u1(k, x) + u2(k, x), atol=1e-14)
        assert torch.allclose(outer.score(k, x), gmm2d.score(k, x) + (u1(k, x) + u2(k, x)) / c_mean, atol=1e-10)
    # the rollout of the nested chain is the base rollout with the summed control, on common noise
    noise = torch.randn((16, gmm2d.num_steps, 2), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    x0 = gmm2d.prior_sample(16, torch.Generator().manual_seed(6))
    want = rollout(gmm2d, x0, control=lambda k, x, c: u1(k, x) + u2(k, x), noise=noise).x
    assert torch.allclose(rollout(outer, x0, noise=noise).x, want, atol=1e-12)


def test_bad_arguments_are_named(gmm2d):
    with pytest.raises(TypeError, match="base must be a DiffusionModel"):
        ControlledChain(object(), lambda k, x, c: x)
    with pytest.raises(TypeError, match="control must be a callable"):
        ControlledChain(gmm2d, 3.0)
    with pytest.raises(TypeError, match="init must have init_sample"):
        ControlledChain(gmm2d, lambda k, x, c: x, init=object())
    assert math.isfinite(ControlledChain(gmm2d, lambda k, x, c: 0 * x).time(3))
