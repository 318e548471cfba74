"""The Gymnasium environments of rlft: the denoising chain as continuous drift control and as discrete restart.

Importing this package registers both ids with Gymnasium (batched form via ``vector_entry_point``):

    import gymnasium as gym, envs
    vec = gym.make_vec("rlft/DenoisingDrift-v0", num_envs=256, task=task_mapping)   # one torch call per step
    one = gym.make("rlft/Restart-v0", task="tune_configs/custom_env_example.yaml")  # a plain gymnasium.Env

RLlib: ``config.environment("rlft/DenoisingDrift-v0", env_config={"task": {...}, "device": "cpu"})`` with
``config.env_runners(num_envs_per_env_runner=B, gym_env_vectorize_mode="vector_entry_point")``
(RLlib sets num_envs itself there). See envs/README.md for writing your own env or reward.
"""

from __future__ import annotations

import gymnasium as gym

from envs.base import BatchedDiffusionEnv, SingleTrajectoryEnv, build_task_objects
from envs.drift import DenoisingDriftEnv, DenoisingDriftSingleEnv
from envs.restart import RestartEnv, RestartSingleEnv, RestartStep, STEP_REWARDS

DRIFT_ENV_ID = "rlft/DenoisingDrift-v0"
RESTART_ENV_ID = "rlft/Restart-v0"

__all__ = [
    "BatchedDiffusionEnv", "SingleTrajectoryEnv", "build_task_objects", "DenoisingDriftEnv", "DenoisingDriftSingleEnv",
    "RestartEnv", "RestartSingleEnv", "RestartStep", "STEP_REWARDS", "DRIFT_ENV_ID", "RESTART_ENV_ID", "register",
]


def register(env_id: str, single: type[SingleTrajectoryEnv], batched: type[BatchedDiffusionEnv]) -> None:
    """Registers an env id with both entry points (idempotent: a second import does not re-register).

    ``gym.make(env_id, **kwargs)`` builds ``single(**kwargs)``; ``gym.make_vec(env_id, num_envs=B, **kwargs)``
    builds ``batched(num_envs=B, **kwargs)``.
    """
    if env_id in gym.registry:
        return
    gym.register(
        id=env_id,
        entry_point=f"{single.__module__}:{single.__qualname__}",
        vector_entry_point=f"{batched.__module__}:{batched.__qualname__}",
    )


register(DRIFT_ENV_ID, DenoisingDriftSingleEnv, DenoisingDriftEnv)
register(RESTART_ENV_ID, RestartSingleEnv, RestartEnv)
