"""The extension example (envs/example_custom.py + tune_configs/custom_env_example.yaml) end to end from YAML."""

from __future__ import annotations

from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

from envs import DenoisingDriftEnv, RestartEnv, build_task_objects
from envs.restart import NFE
from rlft.config import load_task
from rlft.guidance.restart import DENOISE
from rlft.rewards import evaluate
from rlft.sampling import sample

YAML = Path(__file__).resolve().parents[2] / "tune_configs" / "custom_env_example.yaml"


def ring(x: torch.Tensor, radius: float = 1.5, scale: float = 2.0) -> np.ndarray:
    """RingReward written out independently."""
    return (-scale * (x.double().pow(2).sum(-1).sqrt() - radius) ** 2).numpy()


def test_yaml_reward_runs_in_the_env_and_the_core_sampler():
    task = load_task(YAML)
    assert task.reward["type"] == "envs.example_custom:RingReward"
    env = DenoisingDriftEnv.from_config({"task": str(YAML), "num_envs": 4, "device": "cpu", "seed": 0})
    assert type(env.reward).__name__ == "RingReward" and env.num_steps == task.num_steps == 50
    env.reset()
    for _ in range(env.num_steps):
        obs, reward, term, _, _ = env.step(env.pretrained_action())
    assert term.all()
    np.testing.assert_allclose(reward, ring(env.x), rtol=1e-5)

    _, model, reward_fn = build_task_objects(task)
    out = sample(model, 4, seed=0, batch_size=4, progress=False)
    assert torch.equal(out.x, env.x)  # same chain, same seed
    np.testing.assert_allclose(evaluate(reward_fn, out.x).numpy(), ring(out.x), rtol=1e-5)

    vec = gym.make_vec("rlft/DenoisingDrift-v0", num_envs=2, task=task)  # a TaskConfig works too
    vec.reset(seed=1)
    vec.step(np.zeros((2, 2), np.float32))


def test_custom_restart_step_reward_by_import_path():
    env = RestartEnv(task=YAML, num_envs=3, step_reward="envs.example_custom:quality_minus_nfe")
    env.reset(seed=0)
    for _ in range(env.num_steps):
        _, reward, term, _, info = env.step(np.full(3, DENOISE))
    assert term.all()
    np.testing.assert_allclose(reward, ring(env.x) - 0.01 * info[NFE], rtol=1e-5)


@pytest.mark.filterwarnings("error", "ignore:.*infinity.*:UserWarning", "ignore:.*symmetric and normalized space.*:UserWarning")
def test_new_env_id_registered_by_the_user_module():
    env = gym.make("envs.example_custom:example/RingDrift-v0")  # "module:id" imports the module first
    check_env(env.unwrapped, skip_render_check=True)
    vec = gym.make_vec("example/RingDrift-v0", num_envs=8)
    obs, _ = vec.reset(seed=0)
    assert obs.shape == (8, 3) and vec.unwrapped.num_steps == 50
    assert type(vec.unwrapped.reward).__name__ == "RingReward"


def _small(learner: dict) -> dict:
    return {"learner": {"episodes_per_iteration": 8, "num_envs": 8, "minibatch_size": 64, "num_epochs": 1,
                        "save_rllib_checkpoint": False, **learner}, "num_steps": 6}


def _build(task):
    from rlft.learners import build_learner

    _, model, reward = build_task_objects(task)
    return build_learner(task, model, reward)


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_ppo_kl_trains_on_the_users_env_id_from_yaml(ray_session):
    """`learner.env: "envs.example_custom:example/RingDrift-v0"` in the YAML: a remote EnvRunner (a fresh process)
    imports the user's module, builds the user's env with the YAML's task, and PPO+KL trains on its rewards."""
    task = load_task(YAML, overrides={**_small({}), "run": {"num_env_runners": 1, "cpus_per_env_runner": 0.5}})
    assert task.learner["type"] == "ppo_kl" and task.learner["env"] == "envs.example_custom:example/RingDrift-v0"
    learner = _build(task)
    try:
        remote = learner.algo.env_runner_group.foreach_env_runner(
            lambda r: (type(r.env.unwrapped).__name__, type(r.env.unwrapped.reward).__name__, r.env.unwrapped.num_steps),
            local_env_runner=False)
        assert remote == [("RingDriftEnv", "RingReward", 6)]
        before = learner.module_state()
        metrics = learner.train_iteration()
        metrics = learner.train_iteration()
        assert learner.iteration == 2 and learner.reward_queries == 16
        assert metrics["episode_return_mean"] < 0 and metrics["kl_to_pretrained"] > 0  # ring reward <= 0; policy moved
        after = learner.module_state()
        assert any(not np.array_equal(before[k], after[k]) for k in before)
        # the returns the learner saw are the user's reward of the final states
        episodes = learner.algo.env_runner_group.foreach_env_runner(lambda r: r.sample(num_episodes=8), local_env_runner=False)[0]
        for e in episodes:
            x_K = torch.tensor(e.get_observations()[-1][:2], dtype=torch.float64)[None]
            np.testing.assert_allclose(e.get_rewards()[-1], ring(x_K)[0], rtol=1e-4)
    finally:
        learner.algo.stop()


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_fpg_trains_on_the_users_env_id(ray_session):
    """f-PG on the same env id (local EnvRunner), with expert samples on the ring's circle (the reward is unused)."""
    expert = {"type": "gmm", "weights": [0.5, 0.5], "means": [[1.5, 0.0], [-1.5, 0.0]], "stds": [0.2, 0.2]}
    learner = {"type": "fpg", "env": "envs.example_custom:example/RingDrift-v0", "expert": expert, "num_expert_samples": 500,
               "num_disc_updates": 5}
    task = load_task(YAML, overrides=_small(learner))  # a new learner.type replaces the YAML's learner section whole
    learner = _build(task)
    try:
        assert type(learner.algo.env_runner.env.unwrapped).__name__ == "RingDriftEnv"
        metrics = learner.train_iteration()
        assert learner.reward_queries == 0 and 0.0 <= metrics["disc_accuracy"] <= 1.0 and np.isfinite(metrics["disc_loss"])
        assert learner.control()(2, torch.zeros(3, 2), None).shape == (3, 2)
    finally:
        learner.algo.stop()
