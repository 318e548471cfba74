"""The f-regularised reward r_f = log (f')^{-1}((r - lambda)/alpha) (TANG Cor. 4.4): built from YAML, lambda
against its KL closed form, and lambda solved once on the driver (`prepare_reward_spec`) so that building the
reward from the prepared spec draws no pretrained sample."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rlft import registry
from rlft.config import ConfigError
from rlft.rewards import FRegularisedReward, Reward, build_reward, prepare_reward_spec
from rlft.rewards import f_regularised as fr
from rlft.sampling import sample

BASE = {"type": "quadratic", "center": [1.0, 1.0], "scale": 2.0}


class CountingQuadratic(Reward):
    """-|x - c|^2 that counts the samples it is evaluated on."""

    calls = 0

    def __init__(self, center: list[float]) -> None:
        self.center = torch.tensor(center)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        type(self).calls += x.shape[0]
        return -(x - self.center.to(x)).pow(2).sum(-1)


@pytest.fixture
def counting(monkeypatch):
    monkeypatch.setitem(registry._OBJECTS["reward"], "counting_quadratic_test", CountingQuadratic)
    CountingQuadratic.calls = 0
    return {"type": "counting_quadratic_test", "center": [0.5, -0.5]}


def test_f_regularised_reward_from_the_registry(gmm2d):
    alpha = 0.5
    spec = {"type": "f_regularised", "base": BASE, "divergence": "kl", "alpha": alpha, "num_samples": 256, "seed": 4}
    reward = build_reward(spec, model=gmm2d)
    assert isinstance(reward, FRegularisedReward) and reward.has_true_reward and reward.name == "f_regularised"
    x = sample(gmm2d, 256, seed=4, progress=False).x
    r = reward.base(x)
    # KL: lambda = alpha (log mean exp(r/alpha) - 1), so r_f = r/alpha - lambda/alpha - 1
    assert reward.lambda_ == pytest.approx(float(alpha * (torch.logsumexp(r / alpha, 0) - math.log(256)) - alpha), abs=1e-8)
    torch.testing.assert_close(reward(x) - r / alpha, torch.full_like(r, -reward.lambda_ / alpha - 1.0))
    torch.testing.assert_close(reward.true_reward(x), r)
    with pytest.raises(Exception, match=r"reward.base.foo"):
        build_reward({**spec, "base": {"type": "quadratic", "center": [0.0, 0.0], "foo": 1}}, model=gmm2d)


@pytest.mark.parametrize("divergence", ["kl", "chi2", "gamma:0.5"])
def test_a_prepared_spec_builds_the_same_reward_without_drawing_a_pretrained_sample(gmm2d, counting, monkeypatch, divergence):
    spec = {"type": "f_regularised", "base": counting, "divergence": divergence, "alpha": 0.7, "num_samples": 512, "seed": 3}
    solved_here = build_reward(spec, model=gmm2d)
    assert CountingQuadratic.calls == 512  # a plain build evaluates r on num_samples pretrained samples

    CountingQuadratic.calls = 0
    prepared = prepare_reward_spec(spec, gmm2d, alpha=1.0)
    assert CountingQuadratic.calls == 512 and "lambda_" not in spec  # solved once, the input left as it was
    assert prepared == {**spec, "lambda_": solved_here.lambda_}  # the same rollouts and seed as a plain build
    prepared = json.loads(json.dumps(prepared))  # it crosses to Ray workers as plain data

    CountingQuadratic.calls = 0
    monkeypatch.setattr(fr, "sample", lambda *a, **k: pytest.fail("a prepared spec drew pretrained samples"))
    on_worker = build_reward(prepared, model=gmm2d)
    without_model = build_reward(prepared)  # lambda_ given: the model is not even needed
    assert CountingQuadratic.calls == 0
    x = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(on_worker(x), solved_here(x), rtol=0, atol=0)
    torch.testing.assert_close(without_model(x), solved_here(x), rtol=0, atol=0)
    assert prepare_reward_spec(prepared, gmm2d) == prepared  # preparing twice solves nothing


def test_prepare_leaves_other_rewards_alone_and_checks_the_task_alpha(gmm2d, counting):
    assert prepare_reward_spec(BASE, gmm2d, alpha=0.3) is BASE
    assert prepare_reward_spec(counting, gmm2d, alpha=0.3) is counting and CountingQuadratic.calls == 0
    spec = {"type": "f_regularised", "base": counting, "divergence": "kl", "alpha": 0.5}
    with pytest.raises(ConfigError, match=r"alpha must be 1 with reward.type 'f_regularised' \(got 0.3\).*reward.alpha"):
        prepare_reward_spec(spec, gmm2d, alpha=0.3)
    with pytest.raises(ValueError, match=r"needs the task's model.*prepare_reward_spec"):
        build_reward(spec)
