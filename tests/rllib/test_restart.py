"""Restart sampling: the fixed-K sampler equals the restart env under the same schedule, and the learned-policy
sampler reproduces the ODE sampler for an always-denoise policy and exhausts its budget for an always-noise one."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from ray.rllib.core.columns import Columns

from rlft.guidance.restart import RestartSchedule, restart_sample
from rlft.models.gmm import GaussianMixture, GMMModel
from rlft.rllib.modules import RestartPolicyModule
from rlft.rllib.restart import policy_restart_sample, restart_actions_match_env


@pytest.fixture
def model():
    mix = GaussianMixture.create([0.55, 0.15, 0.3], [[2.0, 2.0], [-2.0, 2.0], [0.0, -2.0]], 0.4)
    return GMMModel(mix, num_steps=8).to(dtype=torch.float64)


@pytest.mark.parametrize("schedule", [RestartSchedule(2, 5, 2), RestartSchedule(0, 7, 1), RestartSchedule()])
def test_fixed_restart_sampler_matches_the_env(model, schedule):
    ref, env_x = restart_actions_match_env(model, schedule, n=64, seed=4)
    assert env_x is not None
    assert torch.allclose(ref, env_x, atol=1e-12)


class _Fixed(RestartPolicyModule):
    """A restart policy that always takes one action."""

    def __init__(self, action: int, event_dim: int) -> None:
        super().__init__(observation_space=gym.spaces.Box(-np.inf, np.inf, (event_dim + 3,), np.float32),
                         action_space=gym.spaces.Discrete(2), inference_only=True, model_config={"event_dim": event_dim})
        self.action = action

    def _forward(self, batch, **kwargs):
        logits = torch.full((batch[Columns.OBS].shape[0], 2), -1e9)
        logits[:, self.action] = 0.0
        return {Columns.ACTION_DIST_INPUTS: logits}


def test_always_denoise_policy_is_the_ode_sampler(model):
    out = policy_restart_sample(model, _Fixed(1, 2), 32, budget=16, seed=9)
    ref = restart_sample(model, 32, None, seed=9, batch_size=32, progress=False).x
    assert torch.allclose(out.x, ref, atol=1e-12)
    assert (out.nfe == 8).all() and (out.steps == 8).all() and out.noise_actions.sum() == 0
    figs = out.figures()
    assert figs["restart/nfe_mean"] == 8 and figs["restart/noise_fraction"] == 0 and figs["restart/budget_exhausted_fraction"] == 0


def test_always_noise_policy_burns_the_budget(model):
    """NOISE at level 0 is a no-op: the policy sits at the prior until the budget runs out, then the env finishes with
    K ODE steps, so the samples are again the ODE sampler's and NFE = K."""
    out = policy_restart_sample(model, _Fixed(0, 2), 32, budget=12, seed=9)
    ref = restart_sample(model, 32, None, seed=9, batch_size=32, progress=False).x
    assert torch.allclose(out.x, ref, atol=1e-12)
    assert (out.steps == 12).all() and out.budget_exhausted.all() and (out.nfe == 8).all()
    figs = out.figures()
    assert figs["restart/noise_fraction"] == 1.0 and figs["restart/effective_noise_fraction"] == 0.0
    assert figs["restart/level_mean"] == 0.0
