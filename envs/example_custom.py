"""A complete extension example: a user reward, a user restart step reward, and a new env id — no library edits.

Copy this file into your own package (any importable module works; ``envs.example_custom`` is just where the
example lives) and name its pieces by import path:

- in a task YAML (`tune_configs/custom_env_example.yaml`)::

      reward: {type: "envs.example_custom:RingReward", radius: 1.5, scale: 2.0}

  the remaining keys are `RingReward`'s constructor arguments, checked against its signature; every learner
  (ELEGANT, PPO+KL, f-PG, ...) and `rlft.sampling.sample` then use it like a built-in reward;
- as the restart env's per-step reward: ``RestartEnv(..., step_reward="envs.example_custom:quality_minus_nfe")``;
- as a Gymnasium id: ``gym.make("envs.example_custom:example/RingDrift-v0")`` imports this module (which registers
  the id) and builds the single-trajectory env; ``gym.make_vec("example/RingDrift-v0", num_envs=256)`` after
  ``import envs.example_custom`` builds the batched one.
"""

from __future__ import annotations

import numpy as np
import torch

from envs import register
from envs.base import SingleTrajectoryEnv
from envs.drift import DenoisingDriftEnv
from envs.restart import RestartStep, terminal_step_reward
from rlft.rewards import Reward

RING_ENV_ID = "example/RingDrift-v0"


class RingReward(Reward):
    """r(x) = -scale (|x| - radius)^2: prefers samples on a circle (sphere) of the given radius.

    A reward is a class with ``__call__(x (B, *event)) -> (B,)`` (a plain function ``f(x)`` works too). Set
    ``differentiable = False`` if its gradient is meaningless, and override ``true_reward`` if you also know a
    genuine reward r* beside this nominal one (the envs then report it in ``info["true_reward"]``).
    """

    def __init__(self, radius: float = 1.0, scale: float = 1.0) -> None:
        if not radius > 0 or not scale > 0:
            raise ValueError(f"radius and scale must be > 0 (got radius={radius}, scale={scale})")
        self.radius = float(radius)
        self.scale = float(scale)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        norm = x.reshape(x.shape[0], -1).norm(dim=1)  # (B,)
        return -self.scale * (norm - self.radius) ** 2


def quality_minus_nfe(step: RestartStep, reward: Reward, nfe_cost: float = 0.01) -> np.ndarray:
    """A restart step reward: the task reward r(x_K) when a sample is finished, minus nfe_cost per network call."""
    return terminal_step_reward(step, reward) - nfe_cost * step.nfe * step.terminated


#: The task the new env id builds when given none: a 2-D mixture of 8 modes on a circle of radius 2.
RING_TASK = {
    "model": {
        "type": "gmm",
        "weights": [0.125] * 8,
        "means": [[round(2 * np.cos(a), 6), round(2 * np.sin(a), 6)] for a in np.linspace(0, 2 * np.pi, 8, endpoint=False)],
        "stds": 0.3,
    },
    "reward": {"type": "envs.example_custom:RingReward", "radius": 1.0, "scale": 2.0},
    "alpha": 1.0,
    "num_steps": 50,
}


class RingDriftEnv(DenoisingDriftEnv):
    """The drift env with `RING_TASK` as its default task (a new env is usually just new defaults or a subclass)."""

    def __init__(self, model=None, reward=None, **kwargs) -> None:
        if model is None and kwargs.get("task") is None:
            kwargs["task"] = RING_TASK
        super().__init__(model, reward, **kwargs)


class RingDriftSingleEnv(SingleTrajectoryEnv):
    """`RingDriftEnv` as a plain `gymnasium.Env`."""

    vector_class = RingDriftEnv


register(RING_ENV_ID, RingDriftSingleEnv, RingDriftEnv)
