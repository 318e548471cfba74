"""rlft/DenoisingDrift-v0: gymnasium API, exact agreement with the core sampler, log-densities, autoreset, errors."""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

import envs
from envs.drift import INIT_KL, LOG_PROB_PRETRAINED, STD, TRUE_REWARD, DenoisingDriftEnv, DenoisingDriftSingleEnv
from rlft.config import DEFAULT_TASK, ConfigError
from rlft.models.gmm import GaussianMixture, GMMModel
from rlft.rewards import Reward, evaluate
from rlft.rewards.builtin import QuadraticReward
from rlft.sampling import rollout, sample

REWARD = QuadraticReward([1.0, 0.5], scale=1.5)
SMALL_TASK = {**DEFAULT_TASK, "num_steps": 10}


@pytest.fixture
def gmm32() -> GMMModel:
    """2-D, 3-component mixture, K = 12, float32 (the library default dtype)."""
    return GMMModel(GaussianMixture.create([0.5, 0.3, 0.2], [[1.5, 0.5], [-1.0, 1.0], [0.0, -1.5]], [0.4, 0.3, 0.5]), 12)


def run_pretrained(env: DenoisingDriftEnv, episodes: int) -> list[np.ndarray]:
    """Steps `episodes` full episodes with the pretrained policy; returns the final observations' x per episode."""
    out = []
    for _ in range(episodes):
        for k in range(env.num_steps):
            obs, reward, term, trunc, info = env.step(env.pretrained_action())
            assert term.all() == (k == env.num_steps - 1) and not trunc.any()
        out.append(env.x.clone())
        obs, reward, term, trunc, info = env.step(env.pretrained_action())  # autoreset step
    return out


#: check_env's advice for bounded, normalised boxes does not apply: states and displacements are unbounded.
UNBOUNDED_BOX_WARNINGS = (
    "ignore:.*infinity.*:UserWarning",
    "ignore:.*symmetric and normalized space.*:UserWarning",
)


@pytest.mark.filterwarnings("error", *UNBOUNDED_BOX_WARNINGS)
def test_check_env_passes_on_single_form():
    env = gym.make(envs.DRIFT_ENV_ID, task=SMALL_TASK)
    check_env(env.unwrapped, skip_render_check=True)
    assert isinstance(env.unwrapped, DenoisingDriftSingleEnv)


def test_spaces_shapes_and_bounds(gmm32):
    env = DenoisingDriftEnv(gmm32, REWARD, num_envs=5)
    assert env.single_observation_space.shape == (3,) and env.single_observation_space.dtype == np.float32
    assert env.observation_space.shape == (5, 3) and env.action_space.shape == (5, 2)
    assert np.isneginf(env.single_observation_space.low[:2]).all() and env.single_observation_space.low[2] == 0
    assert env.single_observation_space.high[2] == 1 and np.isinf(env.single_action_space.high).all()
    obs, info = env.reset(seed=0)
    assert obs.dtype == np.float32 and obs in env.observation_space and info == {}
    assert env.metadata["autoreset_mode"] == gym.vector.AutoresetMode.NEXT_STEP


def test_pretrained_actions_reproduce_core_sampler_exactly(gmm32):
    """Same seed -> the same samples as rlft.sampling.sample, batch after batch (autoreset included)."""
    env = DenoisingDriftEnv(gmm32, REWARD, num_envs=6)
    env.reset(seed=11)
    got = torch.cat(run_pretrained(env, 2))
    ref = sample(gmm32, 12, seed=11, batch_size=6, progress=False).x
    assert torch.equal(got, ref)


def test_float64_model_and_initial_distribution_reproduce_sampler(gmm2d):
    """A learned initial law nu (here the exact optimal one) enters as in `sample(init=...)`; its KL is in info."""
    init = gmm2d.optimal_control(REWARD, alpha=1.0)
    init.num_proposals = 8
    env = DenoisingDriftEnv(gmm2d, REWARD, num_envs=4, init=init)
    _, info = env.reset(seed=3)
    got = run_pretrained(env, 1)[0]
    ref = sample(gmm2d, 4, init=init, seed=3, batch_size=4, progress=False)
    assert torch.equal(got, ref.x)
    np.testing.assert_allclose(info[INIT_KL], ref.init_kl.numpy(), rtol=1e-12)


def test_info_log_density_matches_torch_normal_and_reward_on_last_step(gmm2d):
    env = DenoisingDriftEnv(gmm2d, REWARD, num_envs=4)
    env.reset(seed=0)
    gen = torch.Generator().manual_seed(5)
    for k in range(gmm2d.num_steps):
        a = 3.0 * torch.randn((4, 2), generator=gen, dtype=torch.float64)
        x_prev = env.x.clone()
        obs, reward, term, _, info = env.step(a.numpy())
        std = gmm2d.std(k)
        ref = torch.distributions.Normal(torch.zeros((), dtype=torch.float64), torch.tensor(std, dtype=torch.float64))
        np.testing.assert_allclose(info[LOG_PROB_PRETRAINED], ref.log_prob(a).sum(-1).numpy(), rtol=1e-12)
        np.testing.assert_array_equal(info[STD], np.full(4, std))
        assert torch.allclose(env.x, gmm2d.mean(k, x_prev) + a, atol=1e-12)  # the action convention
        np.testing.assert_allclose(obs[:, 2], (k + 1) / gmm2d.num_steps, rtol=1e-6)
        if k < gmm2d.num_steps - 1:
            assert not term.any() and (reward == 0).all()
    assert term.all()
    np.testing.assert_allclose(reward, evaluate(REWARD, env.x).numpy(), rtol=1e-12)
    np.testing.assert_allclose(obs[:, :2], env.x.numpy(), rtol=1e-6)
    assert TRUE_REWARD not in info


class NoisyReward(Reward):
    """A nominal reward r = r* + 1 whose genuine reward r* is known."""

    def __call__(self, x):
        return self.true_reward(x) + 1.0

    def true_reward(self, x):
        return -x.pow(2).sum(-1)


def test_true_reward_in_info_on_last_step(gmm32):
    env = DenoisingDriftEnv(gmm32, NoisyReward(), num_envs=3)
    env.reset(seed=1)
    for _ in range(gmm32.num_steps):
        _, reward, term, _, info = env.step(env.pretrained_action())
    np.testing.assert_allclose(info[TRUE_REWARD], -env.x.pow(2).sum(-1).numpy(), rtol=1e-6)
    np.testing.assert_allclose(reward, info[TRUE_REWARD] + 1.0, rtol=1e-6)


def test_next_step_autoreset_ignores_actions(gmm32):
    env = DenoisingDriftEnv(gmm32, REWARD, num_envs=3)
    env.reset(seed=2)
    for _ in range(gmm32.num_steps):
        env.step(env.pretrained_action())
    state = env.generator.get_state()
    obs, reward, term, trunc, info = env.step(np.full((3, 2), 1e6, dtype=np.float32))  # ignored
    gen = torch.Generator().set_state(state)
    np.testing.assert_array_equal(obs[:, :2], gmm32.prior_sample(3, gen).numpy())
    assert (obs[:, 2] == 0).all() and (reward == 0).all() and not term.any() and not trunc.any()
    assert env.k == 0 and LOG_PROB_PRETRAINED not in info
    obs, reward, term, _, _ = env.step(np.zeros((3, 2), dtype=np.float32))  # a normal step again
    assert np.allclose(obs[:, 2], 1 / gmm32.num_steps) and not term.any()


def test_seeding_is_reproducible(gmm32):
    def trajectory(seed):
        env = DenoisingDriftEnv(gmm32, REWARD, num_envs=2)
        obs = [env.reset(seed=seed)[0]]
        for _ in range(3):
            obs.append(env.step(env.pretrained_action())[0])
        obs.append(env.reset()[0])  # an unseeded reset continues the same stream
        return np.stack(obs)

    np.testing.assert_array_equal(trajectory(4), trajectory(4))
    assert not np.array_equal(trajectory(4), trajectory(5))
    a, b = DenoisingDriftEnv(gmm32, REWARD, seed=9), DenoisingDriftEnv(gmm32, REWARD, seed=9)
    np.testing.assert_array_equal(a.reset()[0], b.reset()[0])  # constructor seed for the first reset


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.zeros((3, 3), np.float32), r"shape \(4, 2\)"),
        (np.zeros((4,), np.float32), r"shape \(4, 2\)"),
        (np.array([[0, 0], [0, np.nan], [0, 0], [0, 0]], np.float32), "NaN/inf .*sub-env 1"),
        (np.array([[0, 0], [0, 0], [np.inf, 0], [0, 0]], np.float64), "NaN/inf .*sub-env 2"),
        (np.array([["a", "b"]] * 4), "real numbers"),
    ],
)
def test_invalid_actions_raise_clear_errors(gmm32, bad, match):
    env = DenoisingDriftEnv(gmm32, REWARD, num_envs=4)
    env.reset(seed=0)
    with pytest.raises(ValueError, match=match):
        env.step(bad)


def test_single_env_errors_and_end_of_episode(gmm32):
    env = DenoisingDriftSingleEnv(model=gmm32, reward=REWARD)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(np.zeros(2, np.float32))
    env.reset(seed=0)
    with pytest.raises(ValueError, match="NaN"):
        env.step(np.array([np.nan, 0.0], np.float32))
    for _ in range(gmm32.num_steps):
        obs, reward, term, trunc, info = env.step(env.pretrained_action())
    assert term and isinstance(reward, float) and reward != 0.0
    with pytest.raises(RuntimeError, match="reset"):
        env.step(np.zeros(2, np.float32))


def test_construction_from_config_dict_and_gym_make_vec():
    env = DenoisingDriftEnv.from_config({"task": SMALL_TASK, "num_envs": 4, "device": "cpu", "seed": 0})
    assert env.num_envs == 4 and env.num_steps == 10 and env.reward.center.tolist() == [1.0, 1.5]
    obs, _ = env.reset()
    vec = gym.make_vec(envs.DRIFT_ENV_ID, num_envs=4, task=SMALL_TASK, seed=0)
    assert isinstance(vec.unwrapped, DenoisingDriftEnv)
    np.testing.assert_array_equal(vec.reset()[0], obs)
    with pytest.raises(ConfigError, match="env_config.bogus is not a known key"):
        DenoisingDriftEnv.from_config({"task": SMALL_TASK, "bogus": 1})
    with pytest.raises(ConfigError, match="needs a 'task'"):
        DenoisingDriftEnv.from_config({"num_envs": 2})
    with pytest.raises(ConfigError, match="alpha"):
        DenoisingDriftEnv.from_config({"task": {**SMALL_TASK, "alpha": -1.0}})
    with pytest.raises(ValueError, match="num_envs"):
        DenoisingDriftEnv(task=SMALL_TASK, num_envs=0)


class ConditionalGMM(GMMModel):
    """A GMM chain whose mean is shifted by a 1-D conditioning c (a stand-in conditional model)."""

    cond_shape = (1,)

    def mean(self, k, x, cond=None):
        return super().mean(k, x) + 0.1 * cond


def test_conditioning_reaches_model_and_observation(gmm32):
    model = ConditionalGMM(gmm32.data, num_steps=4)
    with pytest.raises(ValueError, match="conditional"):
        DenoisingDriftEnv(model, REWARD)
    env = DenoisingDriftEnv(model, REWARD, num_envs=3, cond=torch.tensor([[1.0], [2.0], [3.0]]))
    assert env.single_observation_space.shape == (4,)
    obs, _ = env.reset(seed=0)
    np.testing.assert_array_equal(obs[:, 3], [1.0, 2.0, 3.0])
    x0 = env.x.clone()
    env.step(np.zeros((3, 2), np.float32))
    assert torch.allclose(env.x, GMMModel.mean(model, 0, x0) + 0.1 * torch.tensor([[1.0], [2.0], [3.0]]))
    drawn = DenoisingDriftEnv(model, REWARD, num_envs=3, cond=lambda n, g: torch.rand((n, 1), generator=g))
    assert drawn.reset(seed=0)[0][:, 3].std() > 0


def test_differentiable_rollout_is_the_env_transition(gmm2d):
    """rollout (reparameterised noise, control as a callable) = the env driven by a = delta + s eps, and
    autograd through it matches a finite difference."""
    B, K = 3, gmm2d.num_steps
    noise = torch.randn((B, K, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    theta = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)

    def control(k, x, cond):
        return theta * torch.tanh(x) * gmm2d.dt(k)

    env = DenoisingDriftEnv(gmm2d, REWARD, num_envs=B)
    env.reset(seed=1)
    x0 = env.x.clone()
    with torch.no_grad():
        for k in range(K):
            env.step((control(k, env.x, None) + gmm2d.std(k) * noise[:, k]).numpy())
    out = rollout(gmm2d, x0, control, noise=noise)
    assert torch.allclose(out.x, env.x, atol=1e-12)

    (grad,) = torch.autograd.grad(REWARD(out.x).sum(), theta)
    eps = 1e-6
    with torch.no_grad():
        f = [REWARD(rollout(gmm2d, x0, lambda k, x, c, t=t: t * torch.tanh(x) * gmm2d.dt(k), noise=noise).x).sum()
             for t in (0.3 + eps, 0.3 - eps)]
    assert grad.abs() > 1e-3
    assert math.isclose(grad.item(), ((f[0] - f[1]) / (2 * eps)).item(), rel_tol=1e-6)
