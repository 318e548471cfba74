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
