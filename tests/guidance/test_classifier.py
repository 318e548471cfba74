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


def _old_classifier_logits(state: dict, x: torch.Tensor, noise_std: torch.Tensor, num_frequencies: int, depth: int):
    """The classifier as written before the shared `rlft.models.nets` builder: its own MLP and noise features."""
    freqs = math.pi * 2.0 ** torch.arange(num_frequencies, dtype=x.dtype)
    ang = noise_std[:, None] * freqs[None]
    h = torch.cat([x.reshape(x.shape[0], -1), torch.sin(ang), torch.cos(ang)], dim=-1)
    for i in range(depth):
        h = torch.nn.functional.silu(h @ state[f"net.{2 * i}.weight"].T + state[f"net.{2 * i}.bias"])
    return (h @ state[f"net.{2 * depth}.weight"].T + state[f"net.{2 * depth}.bias"]).squeeze(-1)


def test_classifier_keeps_its_parameter_layout_and_features(tmp_path):
    """A classifier saved before the shared MLP builder loads into today's and gives the same logits."""
    from rlft import checkpoint

    config = ClassifierConfig((2, 3), hidden=16, depth=2, num_frequencies=4)
    torch.manual_seed(0)
    saved = NoisyClassifier(config).double()
    checkpoint.save_module(tmp_path / "clf.safetensors", saved)
    state = checkpoint.load_tensors(tmp_path / "clf.safetensors")
    assert sorted(state) == ["net.0.bias", "net.0.weight", "net.2.bias", "net.2.weight", "net.4.bias", "net.4.weight"]
    assert state["net.0.weight"].shape == (16, 6 + 8) and state["net.4.weight"].shape == (1, 16)
    loaded = NoisyClassifier(config).double()
    checkpoint.load_module(tmp_path / "clf.safetensors", loaded)
    x = torch.randn(5, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    n = torch.rand(5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, n), _old_classifier_logits(state, x, n, 4, 2), rtol=1e-12, atol=1e-12)


def test_guidance_runs_on_a_fine_tuned_sampler(gmm2d):
    """A ControlledChain (the exact optimal chain) is guided like the chain of its target: same score, same c_s."""
    from rlft.models.base import ControlledChain

    reward, alpha = LinearReward([0.8, -0.2]), 0.7
    reward.direction = reward.direction.double()
    oc = gmm2d.optimal_control(reward, alpha)
    tuned = ControlledChain(gmm2d, oc)
    target_chain = GMMModel(oc.target.mixture, num_steps=gmm2d.num_steps, schedule=gmm2d.schedule).to(dtype=torch.float64)
    guide = LinearReward([0.0, 1.0])
    x = torch.randn(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for k in (0, 20, gmm2d.num_steps - 1):
        torch.testing.assert_close(ExpectedRewardGuidance(tuned, guide, 0.5)(k, x),
                                   ExpectedRewardGuidance(target_chain, guide, 0.5)(k, x), rtol=1e-7, atol=1e-9)
    clf = NoisyClassifier(ClassifierConfig((2,), hidden=8, depth=1)).double()
    torch.testing.assert_close(ClassifierGuidance(tuned, clf, 2.0)(5, x), ClassifierGuidance(gmm2d, clf, 2.0)(5, x))
