"""RLlib's SingleAgentEnvRunner steps the batched envs through their registered ids (vector_entry_point, NEXT_STEP)."""

from __future__ import annotations

import numpy as np
import pytest

import envs
from rlft.config import DEFAULT_TASK

pytest.importorskip("ray.rllib")

TASK = {**DEFAULT_TASK, "num_steps": 6}


@pytest.mark.parametrize("env_id, extra", [(envs.DRIFT_ENV_ID, {}), (envs.RESTART_ENV_ID, {"budget": 9, "step_reward": "terminal"})])
def test_env_runner_collects_complete_episodes(env_id, extra):
    from ray.rllib.algorithms.ppo import PPOConfig
    from ray.rllib.env.single_agent_env_runner import SingleAgentEnvRunner

    config = (
        PPOConfig()
        .environment(env_id, env_config={"task": TASK, "device": "cpu", **extra}, normalize_actions=False)
        .env_runners(num_env_runners=0, num_envs_per_env_runner=8, gym_env_vectorize_mode="vector_entry_point")
    )
    runner = SingleAgentEnvRunner(config=config)
    try:
        episodes = runner.sample(num_timesteps=200, random_actions=True)
    finally:
        runner.stop()
    done = [e for e in episodes if e.is_done]
    assert len(done) >= 8
    for e in done:
        rewards = np.asarray(e.get_rewards())
        assert (rewards[:-1] == 0).all() and rewards[-1] != 0  # r(x_K) on the last step only
        if env_id == envs.DRIFT_ENV_ID:
            assert len(e) == TASK["num_steps"]
            assert np.isfinite(e.get_infos()[-1]["log_prob_pretrained"])
        else:
            assert TASK["num_steps"] <= len(e) <= 9 and e.get_infos()[-1]["nfe"] >= TASK["num_steps"]
        assert e.get_observations()[0][2] == 0  # every episode starts at step / level 0 (the reset obs)
