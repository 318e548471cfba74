"""Guidance controls: shapes, the exact optimal control in the Gaussian case, and the direction they move r."""

from __future__ import annotations

import math

import pytest
import torch

from rlft.guidance.classifier import (
    ClassifierConfig, ClassifierGuidance, ExpectedRewardGuidance, NoisyClassifier, train_noisy_classifier,
)
from rlft.models.gmm import GMMModel
from rlft.rewards.builtin import LinearReward
from rlft.sampling import sample


def _gaussian(num_steps: int = 30) -> GMMModel:
    return GMMModel.create([1.0], [[0.5, -0.3]], [0.6], num_steps=num_steps).to(dtype=torch.float64)


def test_controls_return_displacements_of_the_state_shape(gmm2d):
    x = torch.randn(7, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    clf = NoisyClassifier(ClassifierConfig((2,), hidden=8, depth=1)).double()
    for control in (ClassifierGuidance(gmm2d, clf, gamma=2.0), ExpectedRewardGuidance(gmm2d, LinearReward([1.0, 0.0]), 0.5)):
        for k in (0, 25, gmm2d.num_steps - 1):
            delta = control(k, x, None)
            assert delta.shape == x.shape and delta.dtype == x.dtype and torch.isfinite(delta).all()
    with torch.no_grad():  # the sampler runs controls under no_grad: they must still differentiate
        assert ExpectedRewardGuidance(gmm2d, LinearReward([1.0, 0.0]), 0.5)(3, x).abs().sum() > 0


def test_tweedie_control_is_the_exact_optimal_control_for_gaussian_data_and_a_linear_reward():
    # For Gaussian data and r = b.x, log E[exp(r(x0)/alpha) | x_t] = b.E[x0 | x_t]/alpha + const, so TANG's
    # approximation (eq. 3.28) with Tweedie's E[x0 | x_t] is the exact control (eq. 3.27) of the chain.
    model, reward, alpha = _gaussian(), LinearReward([0.7, -0.4]), 0.3
    exact = model.optimal_control(reward, alpha)
    approx = ExpectedRewardGuidance(model, reward, alpha)
    x = 2.0 * torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for k in range(0, model.num_steps, 7):
        torch.testing.assert_close(approx(k, x), exact(k, x), rtol=1e-9, atol=1e-12)


def test_tweedie_control_differs_from_the_optimum_on_a_mixture_but_raises_the_reward(gmm2d):
    reward, alpha = LinearReward([1.0, 0.5]), 0.5
    x = torch.randn(32, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    assert not torch.allclose(ExpectedRewardGuidance(gmm2d, reward, alpha)(10, x), gmm2d.optimal_control(reward, alpha)(10, x))
    pre = sample(gmm2d, 2000, seed=3, progress=False)
    guided = sample(gmm2d, 2000, control=ExpectedRewardGuidance(gmm2d, reward, alpha), seed=3, progress=False)
    target = gmm2d.exact_target(reward, alpha).mixture.mean()
    r_pre, r_guided, r_target = float(reward(pre.x).mean()), float(reward(guided.x).mean()), float(reward(target[None]))
    assert r_pre < r_guided and guided.kl.mean() > 0
    assert r_guided < r_target + 0.3  # a sensible tilt, not a runaway


def test_classifier_guidance_moves_samples_into_the_labelled_region():
    model = _gaussian(num_steps=30)
    gen = torch.Generator().manual_seed(4)
    x0 = model.data.sample(4000, gen)
    threshold = float(torch.quantile(x0[:, 0], 0.9))
    labels = (x0[:, 0] >= threshold).double()  # "top 10 %" of r(x) = x_0
    clf, info = train_noisy_classifier(x0, labels, model.schedule, steps=800, batch_size=256, hidden=32, depth=2, lr=1e-2, seed=0)
    assert abs(info["positive_rate"] - 0.1) < 0.01 and info["accuracy_clean"] > 0.93
    clf = clf.double()
    frac = {}
    for gamma in (0.0, 3.0):
        out = sample(model, 2000, control=ClassifierGuidance(model, clf, gamma), seed=5, progress=False)
        frac[gamma] = float((out.x[:, 0] >= threshold).double().mean())
        if gamma == 0.0:
            assert float(out.kl.abs().max()) == 0.0
    assert abs(frac[0.0] - 0.1) < 0.03 and frac[3.0] > 0.3


def test_guidance_rejects_what_it_cannot_use(gmm2d):
    clf = NoisyClassifier(ClassifierConfig((2,)))
    with pytest.raises(TypeError, match="CoefficientChain"):
        ClassifierGuidance(object(), clf, 1.0)  # anything that is not a chain
    with pytest.raises(ValueError, match="gamma"):
        ClassifierGuidance(gmm2d, clf, -1.0)
    with pytest.raises(ValueError, match="alpha must be > 0"):
        ExpectedRewardGuidance(gmm2d, LinearReward([1.0, 0.0]), 0.0)
    reward = LinearReward([1.0, 0.0])
    reward.differentiable = False
    with pytest.raises(ValueError, match="differentiable"):
        ExpectedRewardGuidance(gmm2d, reward, 1.0)
    with pytest.raises(ValueError, match="labels must be 0 or 1"):
        train_noisy_classifier(torch.zeros(4, 2), torch.tensor([0.0, 2.0, 1.0, 0.0]), steps=1)
    with torch.no_grad():
        assert math.isfinite(float(clf(torch.zeros(3, 2), torch.full((3,), 0.5)).sum()))
