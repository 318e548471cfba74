"""rlft/Restart-v0 and the fixed-K restart sampler: exact ODE/restart reproduction, NFE bookkeeping, autoreset."""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

import envs
from envs.restart import BUDGET_EXHAUSTED, NFE, RestartEnv, RestartSingleEnv
from rlft.config import DEFAULT_TASK
from rlft.guidance.restart import DENOISE, NOISE, RestartSchedule, jump_kernel, restart_sample, run_actions
from rlft.models.gmm import GaussianMixture, GMMModel
from rlft.rewards import evaluate
from rlft.rewards.builtin import QuadraticReward

REWARD = QuadraticReward([1.0, 0.5])
SMALL_TASK = {**DEFAULT_TASK, "num_steps": 8}


@pytest.fixture
def gmm32() -> GMMModel:
    """2-D, 3-component mixture, K = 10, float32."""
    return GMMModel(GaussianMixture.create([0.5, 0.3, 0.2], [[1.5, 0.5], [-1.0, 1.0], [0.0, -1.5]], [0.4, 0.3, 0.5]), 10)


def ode_reference(model, n, seed):
    """The deterministic ODE (DDIM eta = 0) sampler as a naive loop."""
    gen = torch.Generator().manual_seed(seed)
    x = model.prior_sample(n, gen)
    for k in range(model.num_steps):
        x = model.ode_step(k, x)
    return x


@pytest.mark.filterwarnings("error", "ignore:.*infinity.*:UserWarning")
def test_check_env_passes_on_single_form():
    env = gym.make(envs.RESTART_ENV_ID, task=SMALL_TASK, budget=12)
    check_env(env.unwrapped, skip_render_check=True)
    assert isinstance(env.unwrapped, RestartSingleEnv)


def test_spaces_and_observation_layout(gmm32):
    env = RestartEnv(gmm32, REWARD, num_envs=4, budget=15)
    assert env.single_observation_space.shape == (5,) and env.single_action_space == gym.spaces.Discrete(2)
    assert env.action_space.shape == (4,) and env.observation_space.shape == (4, 5)
    np.testing.assert_array_equal(env.single_observation_space.low[2:], 0)
    np.testing.assert_array_equal(env.single_observation_space.high[2:], 1)
    obs, info = env.reset(seed=0)
    np.testing.assert_array_equal(obs[:, 2:], 0)
    obs, *_ = env.step(np.array([DENOISE, DENOISE, NOISE, NOISE]))
    np.testing.assert_allclose(obs[:, 2], [0.1, 0.1, 0, 0])  # level / K
    np.testing.assert_allclose(obs[:, 3], [1 / 25, 1 / 25, 0, 0])  # NFE / (K + L)
    np.testing.assert_allclose(obs[:, 4], 1 / 15)  # steps / L
    np.testing.assert_allclose(obs[:, :2], env.x.numpy())


def test_always_denoise_reproduces_the_ode_sampler_exactly(gmm32):
    env = RestartEnv(gmm32, REWARD, num_envs=5)
    env.reset(seed=7)
    for k in range(gmm32.num_steps):
        obs, reward, term, trunc, info = env.step(np.full(5, DENOISE))
        assert term.all() == (k == gmm32.num_steps - 1) and not trunc.any() and (reward == 0).all()
    assert torch.equal(env.x, ode_reference(gmm32, 5, 7))
    np.testing.assert_array_equal(info[NFE], gmm32.num_steps)
    assert not info[BUDGET_EXHAUSTED].any()
    assert torch.equal(restart_sample(gmm32, 5, seed=7, progress=False).x, env.x)  # R = 0 is the ODE sampler


@pytest.mark.parametrize("schedule", [RestartSchedule(3, 6, 2), RestartSchedule(0, 9, 1), RestartSchedule(5, 7, 3)])
def test_fixed_restart_schedule_through_env_reproduces_restart_sampler(gmm32, schedule):
    actions = schedule.actions(gmm32.num_steps)
    assert len(actions) == gmm32.num_steps + 2 * schedule.num_restarts * (schedule.clean_level - schedule.noisy_level)
    env = RestartEnv(gmm32, REWARD, num_envs=4, budget=len(actions))
    env.reset(seed=3)
    for t, a in enumerate(actions):
        _, _, term, _, info = env.step(np.full(4, a))
        assert term.all() == (t == len(actions) - 1)
    ref = restart_sample(gmm32, 8, schedule, seed=3, batch_size=4, progress=False)
    assert torch.equal(env.x, ref.x[:4])
    np.testing.assert_array_equal(info[NFE], schedule.nfe(gmm32.num_steps))
    assert ref.nfe == gmm32.num_steps + schedule.num_restarts * (schedule.clean_level - schedule.noisy_level)
    env.step(np.zeros(4, dtype=np.int64))  # autoreset: the next batch continues the same stream
    for a in actions:
        env.step(np.full(4, a))
    assert torch.equal(env.x, ref.x[4:])


def test_nfe_levels_and_budget_bookkeeping_match_a_naive_loop(gmm32):
    """Random policies on a batch at mixed levels: every counter equals a per-trajectory reference loop."""
    K, L, B = gmm32.num_steps, 14, 6
    rng = np.random.default_rng(0)
    env = RestartEnv(gmm32, REWARD, num_envs=B, budget=L)
    env.reset(seed=0)
    level, steps, nfe = np.zeros(B, int), np.zeros(B, int), np.zeros(B, int)
    done = np.zeros(B, bool)
    ended = exhausted_count = 0
    for _ in range(60):
        a = (rng.random(B) < 0.85).astype(np.int64)
        obs, reward, term, _, info = env.step(a)
        for i in range(B):
            if done[i]:  # NEXT_STEP autoreset of this sub-env
                level[i] = steps[i] = nfe[i] = 0
                done[i] = False
                assert not term[i] and reward[i] == 0
                continue
            if a[i] == DENOISE:
                level[i], nfe[i] = level[i] + 1, nfe[i] + 1
            elif level[i] > 0:
                level[i] -= 1
            steps[i] += 1
            exhausted = steps[i] == L and level[i] < K
            if exhausted:
                nfe[i] += K - level[i]
                level[i] = K
            assert info[BUDGET_EXHAUSTED][i] == exhausted
            done[i] = level[i] == K
            ended, exhausted_count = ended + done[i], exhausted_count + exhausted
        np.testing.assert_array_equal(term, done)
        np.testing.assert_array_equal(info[NFE], nfe)
        np.testing.assert_array_equal(env.level, level)
        np.testing.assert_allclose(obs[:, 2], level / K)
    assert ended > exhausted_count > 0  # both ways of ending occurred


def test_mixed_levels_step_each_group_with_its_own_level(gmm2d):
    """Two sub-envs at different levels: each moves with model.ode_step of its own level (float64, exact)."""
    env = RestartEnv(gmm2d, REWARD, num_envs=2)
    env.reset(seed=1)
    x0 = env.x.clone()
    env.step(np.array([DENOISE, NOISE]))  # levels (1, 0): NOISE at level 0 is a no-op
    assert torch.equal(env.x[1], x0[1]) and env.nfe.tolist() == [1, 0] and env.steps.tolist() == [1, 1]
    env.step(np.array([DENOISE, DENOISE]))  # one call at level 1, one at level 0
    assert torch.allclose(env.x[0], gmm2d.ode_step(1, gmm2d.ode_step(0, x0[:1]))[0], rtol=0, atol=1e-13)
    assert torch.allclose(env.x[1], gmm2d.ode_step(0, x0[1:])[0], rtol=0, atol=1e-13)
    state = env.generator.get_state()
    x_before = env.x.clone()
    env.step(np.array([NOISE, NOISE]))  # levels (2, 1) -> (1, 0): one draw per level, increasing level order
    gen = torch.Generator().set_state(state)
    ref1 = gmm2d.noise_step(0, x_before[1:], gen)  # level 1 first
    ref0 = gmm2d.noise_step(1, x_before[:1], gen)
    assert torch.equal(env.x[1:], ref1) and torch.equal(env.x[:1], ref0)


def test_budget_exhaustion_finishes_with_ode_steps(gmm32):
    K = gmm32.num_steps
    env = RestartEnv(gmm32, REWARD, num_envs=2, budget=K + 2)
    env.reset(seed=4)
    actions = [DENOISE] * 4 + [NOISE] * 2 + [DENOISE] * 5 + [NOISE]  # K + 2 steps, ends at level 2
    for t, a in enumerate(actions):
        _, _, term, _, info = env.step(np.full(2, a))
        assert term.all() == (t == len(actions) - 1)
    assert info[BUDGET_EXHAUSTED].all() and (env.level == K).all()
    np.testing.assert_array_equal(info[NFE], K + 3)  # NFE = K + effective NOISE actions
    gen = torch.Generator().manual_seed(4)
    x, level, nfe = run_actions(gmm32, gmm32.prior_sample(2, gen), actions, generator=gen)
    x, _, _ = run_actions(gmm32, x, [DENOISE] * (K - level), level)
    assert torch.equal(env.x, x) and nfe + K - level == K + 3


def test_always_noise_burns_the_budget_at_level_zero(gmm32):
    env = RestartEnv(gmm32, REWARD, num_envs=1, budget=11)
    env.reset(seed=0)
    x0 = env.x.clone()
    for _ in range(10):
        _, _, term, _, info = env.step(np.array([NOISE]))
        assert not term[0] and info[NFE][0] == 0
    assert torch.equal(env.x, x0)
    _, _, term, _, info = env.step(np.array([NOISE]))
    assert term[0] and info[BUDGET_EXHAUSTED][0] and info[NFE][0] == gmm32.num_steps
    assert torch.equal(env.x, ode_reference(gmm32, 1, 0))


def test_terminal_and_custom_step_rewards(gmm32):
    env = RestartEnv(gmm32, REWARD, num_envs=3, step_reward="terminal")
    env.reset(seed=0)
    for k in range(gmm32.num_steps):
        _, reward, term, _, _ = env.step(np.full(3, DENOISE))
        if not term.all():
            assert (reward == 0).all()
    np.testing.assert_allclose(reward, evaluate(REWARD, env.x).numpy(), rtol=1e-6)
    _, reward, _, _, _ = env.step(np.full(3, DENOISE))  # autoreset step
    assert (reward == 0).all()

    def level_bonus(step, reward):
        return torch.as_tensor(step.level, dtype=torch.float32)

    env = RestartEnv(gmm32, REWARD, num_envs=2, step_reward=level_bonus)
    env.reset(seed=0)
    _, reward, *_ = env.step(np.array([DENOISE, NOISE]))
    np.testing.assert_array_equal(reward, [1.0, 0.0])
    with pytest.raises(ValueError, match="step_reward must be one of"):
        RestartEnv(gmm32, REWARD, step_reward="nope")
    env = RestartEnv(gmm32, REWARD, num_envs=2, step_reward=lambda step, reward: np.full(2, np.nan))
    env.reset(seed=0)
    with pytest.raises(ValueError, match="NaN"):
        env.step(np.array([DENOISE, DENOISE]))


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.array([0, 1, 1]), r"shape \(2,\)"),
        (np.array([0, 2]), r"in \[0, 2\) \(got 2 for sub-env 1\)"),
        (np.array([-1, 0]), r"got -1 for sub-env 0"),
        (np.array([0.0, 1.0]), "integers"),
        (np.array([0, 1])[:, None], r"shape \(2,\)"),
    ],
)
def test_invalid_actions_raise_clear_errors(gmm32, bad, match):
    env = RestartEnv(gmm32, REWARD, num_envs=2)
    env.reset(seed=0)
    with pytest.raises(ValueError, match=match):
        env.step(bad)


def test_construction_errors_and_config():
    with pytest.raises(ValueError, match="budget must be an integer >= K = 8"):
        RestartEnv(task=SMALL_TASK, budget=5)
    env = RestartEnv.from_config({"task": SMALL_TASK, "num_envs": 3, "budget": 20, "step_reward": "terminal", "device": "cpu"})
    assert env.budget == 20 and env.num_envs == 3
    assert RestartEnv(task=SMALL_TASK).budget == 16  # default 2K
    vec = gym.make_vec(envs.RESTART_ENV_ID, num_envs=3, task=SMALL_TASK)
    assert isinstance(vec.unwrapped, RestartEnv) and vec.action_space.shape == (3,)


def test_restart_schedule_validation_and_jump_kernel(gmm2d):
    with pytest.raises(ValueError, match="noisy_level < clean_level"):
        RestartSchedule(5, 5, 1)
    with pytest.raises(ValueError, match="clean_level must be < K = 50"):
        RestartSchedule(3, 50, 1).actions(gmm2d.num_steps)
    assert RestartSchedule(3, 6, 2).actions(8) == [1] * 6 + [0, 0, 0, 1, 1, 1] * 2 + [1, 1]
    ab = gmm2d.coefficients.alpha_bar
    scale, std = jump_kernel(gmm2d, 10, 30)  # composed adjacent kernels = the one-jump VP kernel
    assert math.isclose(scale, math.sqrt(ab[10] / ab[30]), rel_tol=1e-12)
    assert math.isclose(std, math.sqrt(1 - ab[10] / ab[30]), rel_tol=1e-10)


def test_single_jump_restart_matches_level_by_level_in_law(gmm32):
    """Both noising forms are the same Gaussian kernel: the restarted samples agree in mean and covariance."""
    sched = RestartSchedule(2, 6, 2)
    a = restart_sample(gmm32, 4000, sched, seed=0, progress=False).x.double()
    b = restart_sample(gmm32, 4000, sched, seed=1, single_jump=True, progress=False).x.double()
    assert torch.allclose(a.mean(0), b.mean(0), atol=0.08)
    assert torch.allclose(torch.cov(a.T), torch.cov(b.T), atol=0.12)
    assert not torch.equal(a, restart_sample(gmm32, 4000, sched, seed=0, single_jump=True, progress=False).x.double())
