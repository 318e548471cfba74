"""f-PG's "snis" expert (`rlft.rllib.expert`): self-normalised importance resampling of pretrained samples with
weights exp(r/alpha) matches the exact tilted target's first two moments, Kish's effective sample size matches its
closed form, and a set whose ESS is too small to be a target is refused with the fix."""

from __future__ import annotations

import pytest
import torch

from rlft.config import DEFAULT_TASK, ConfigError, task_from_dict
from rlft.learners import check_learner_spec
from rlft.models import build_model
from rlft.models.gmm import GaussianMixture
from rlft.rewards import build_reward
from rlft.rllib.expert import (
    EXPERT_ESS, EXPERT_ESS_FRACTION, effective_sample_size, expert_kind, snis_expert, snis_resample,
)

N_PRE, N_OUT = 200_000, 200_000


def _moments_within(x_pre: torch.Tensor, log_w: torch.Tensor, y: torch.Tensor, target: GaussianMixture, label: str) -> None:
    """Mean and second moment E[x x^T] of the resampled y against the exact mixture's, within 3 standard errors.

    s.e.^2 of a resampled average of f = SNIS variance sum_i wbar_i^2 (f_i - mu_f)^2 (delta method) + resampling
    variance Var_w(f) / n."""
    wbar = torch.softmax(log_w, 0)  # (N,)
    mu, cov = target.mean(), target.covariance()
    exact = {"mean": mu, "second moment": cov + torch.outer(mu, mu)}
    D = x_pre.shape[1]
    feats = {"mean": (x_pre, y), "second moment": ((x_pre[:, :, None] * x_pre[:, None, :]).reshape(-1, D * D),
                                                   (y[:, :, None] * y[:, None, :]).reshape(-1, D * D))}
    for name, (f_pre, f_y) in feats.items():
        mu_w = (wbar[:, None] * f_pre).sum(0)
        var_w = (wbar[:, None] * (f_pre - mu_w) ** 2).sum(0)
        se = torch.sqrt((wbar[:, None] ** 2 * (f_pre - mu_w) ** 2).sum(0) + var_w / y.shape[0])
        err = (f_y.mean(0) - exact[name].reshape(-1)).abs() / se
        assert (err < 3).all(), f"{label} {name}: {f_y.mean(0).tolist()} vs exact {exact[name].reshape(-1).tolist()} ({err.tolist()} s.e.)"


@pytest.mark.parametrize("case", [
    dict(weights=[0.3, 0.7], means=[[-1.0], [1.5]], stds=[0.5, 0.4], center=[0.5], alpha=0.5),
    dict(weights=[0.25] * 4, means=[[2, 2], [-2, 2], [2, -2], [-2, -2]], stds=[0.4] * 4, center=[1.0, 1.5], alpha=1.0),
], ids=["1d", "2d"])
def test_snis_resampling_matches_the_exact_tilted_target(case):
    """p_pre a GMM, r quadratic: resampled draws ~ p_tar ∝ exp(r/alpha) p_pre, a GMM in closed form (`tilt`)."""
    data = GaussianMixture.create(case["weights"], case["means"], case["stds"])
    model = build_model(task_from_dict({**DEFAULT_TASK, "model": {"type": "gmm", "weights": case["weights"],
                                        "means": case["means"], "stds": case["stds"]}}).model, 10)
    reward = build_reward({"type": "quadratic", "center": case["center"], "scale": 1.0}, model=model)
    target, _ = data.tilt(reward, case["alpha"])
    g = torch.Generator().manual_seed(11)
    x_pre = data.sample(N_PRE, g)  # (N, D) exact pretrained samples, float64
    log_w = reward(x_pre).double() / case["alpha"]
    y = snis_resample(x_pre, log_w, N_OUT, g)
    _moments_within(x_pre, log_w, y, target, f"{x_pre.shape[1]}-D")
    assert (y.mean(0) - data.mean()).abs().max() > 0.2  # the tilt moves the mean: the check above is not vacuous


def test_snis_expert_on_the_chain_matches_the_exact_tilted_target():
    """`snis_expert` (the pretrained CHAIN's samples, K = 100, reward weights, resampling) on the 2-D task: its draws
    match the SNIS estimate of the same chain draws within 3 s.e. of resampling, and the exact tilted target within
    0.03 (the K = 100 chain's own discretisation bias: its marginal is not exactly p_pre, measured 0.012-0.016)."""
    task = task_from_dict(dict(DEFAULT_TASK, seed=3))
    model = build_model(task.model, task.num_steps)
    reward = build_reward(task.reward, model=model)
    n_pre = 40_000
    y, figures = snis_expert(task, model, reward, n=n_pre, seed=5, num_pretrained=n_pre, min_ess=10)
    # the same pretrained draws and weights snis_expert used (seeded)
    import rlft.sampling as sampling

    x_pre = sampling.sample(model, n_pre, seed=5, progress=False).x.double()
    log_w = reward(x_pre.float()).double() / task.alpha
    assert figures[EXPERT_ESS] == pytest.approx(effective_sample_size(log_w), rel=1e-5)
    assert figures[EXPERT_ESS_FRACTION] == pytest.approx(figures[EXPERT_ESS] / n_pre)
    wbar = torch.softmax(log_w, 0)
    mu_w = (wbar[:, None] * x_pre).sum(0)  # the SNIS estimate of the tilted mean from these draws
    sd_w = ((wbar[:, None] * (x_pre - mu_w) ** 2).sum(0)).sqrt()
    y = y.double()
    assert ((y.mean(0) - mu_w).abs() < 3 * sd_w / n_pre ** 0.5).all(), (y.mean(0), mu_w)
    exact = model.exact_target(reward, task.alpha).mixture
    assert (y.mean(0) - exact.mean()).abs().max() < 0.03, (y.mean(0), exact.mean())
    second = exact.covariance() + torch.outer(exact.mean(), exact.mean())
    assert ((y.T @ y) / y.shape[0] - second).abs().max() < 0.06, ((y.T @ y) / y.shape[0], second)


def test_effective_sample_size_closed_forms():
    assert effective_sample_size(torch.zeros(37)) == pytest.approx(37.0, rel=1e-12)  # equal weights: N
    w = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    assert effective_sample_size(w.log()) == pytest.approx(100.0 / 30.0, rel=1e-12)  # (sum w)^2 / sum w^2
    # invariant to a common factor, stable where exp(log w) overflows float64 (r/alpha ~ 1e3)
    assert effective_sample_size(w.log() + 1000.0) == pytest.approx(100.0 / 30.0, rel=1e-12)
    assert effective_sample_size(w.log() - 1000.0) == pytest.approx(100.0 / 30.0, rel=1e-12)
    assert effective_sample_size(torch.tensor([0.0, -800.0, -900.0])) == pytest.approx(1.0, rel=1e-12)  # one dominates
    # k equal weights among N, the rest negligible: k
    log_w = torch.full((100,), -1e4, dtype=torch.float64)
    log_w[:7] = 3.0
    assert effective_sample_size(log_w) == pytest.approx(7.0, rel=1e-12)
    # random weights against the naive float64 formula
    w = torch.rand(1000, generator=torch.Generator().manual_seed(0), dtype=torch.float64) ** 3
    assert effective_sample_size(w.log()) == pytest.approx(float(w.sum() ** 2 / (w ** 2).sum()), rel=1e-10)


def test_a_too_small_ess_is_refused_with_the_threshold_and_the_fix():
    task = task_from_dict(dict(DEFAULT_TASK, alpha=0.002, num_steps=20))  # exp(r/0.002): a few samples carry all weight
    model = build_model(task.model, task.num_steps)
    reward = build_reward(task.reward, model=model)
    with pytest.raises(ConfigError) as err:
        snis_expert(task, model, reward, n=100, seed=0, num_pretrained=2000, min_ess=200)
    msg = str(err.value)
    for words in ("effective sample size", "of 2000 pretrained samples", "min_expert_ess = 200", "learner.expert_samples",
                  "raise alpha", "learner.expert: {type: file"):
        assert words in msg, msg


def test_expert_option_parses_and_defaults_to_exact_only_where_the_task_has_one():
    _, options = check_learner_spec({"type": "fpg", "expert": "snis", "expert_samples": 1000, "min_expert_ess": 50})
    assert (options.expert, options.expert_samples, options.min_expert_ess) == ("snis", 1000, 50.0)
    for bad, words in (({"expert": "bogus"}, "learner.expert must be one of"), ({"expert_samples": 0}, "learner.expert_samples"),
                       ({"min_expert_ess": 0.5}, "learner.min_expert_ess must be >= 1")):
        with pytest.raises(ConfigError, match=words):
            check_learner_spec({"type": "fpg", **bad})
    task = task_from_dict(DEFAULT_TASK)
    model = build_model(task.model, 10)
    assert expert_kind(None, model, build_reward(task.reward, model=model)) == {"type": "exact"}
    ring = build_reward({"type": "envs.example_custom:RingReward", "radius": 1.5, "scale": 2.0}, model=model)
    assert expert_kind(None, model, ring) == {"type": "snis"}
    assert expert_kind({"type": "file", "path": "x.npy"}, model, ring) == {"type": "file", "path": "x.npy"}
