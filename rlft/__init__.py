"""rlft: fine-tune pretrained diffusion models with reinforcement learning and stochastic control, on Ray."""

from rlft.config import ConfigError, TaskConfig, load_task
from rlft.models import ControlledChain, DiffusionModel, GaussianMixture, GMMModel, build_model
from rlft.rewards import Reward, RewardError, build_reward, evaluate, register_reward
from rlft.sampling import Rollout, rollout, sample, step_kl, transition
from rlft.schedule import VPSchedule

__version__ = "0.1.0"

__all__ = [
    "ConfigError", "TaskConfig", "load_task", "ControlledChain", "DiffusionModel", "GaussianMixture", "GMMModel", "build_model",
    "Reward", "RewardError", "build_reward", "evaluate", "register_reward", "Rollout", "rollout", "sample",
    "step_kl", "transition", "VPSchedule", "load",
]


def __getattr__(name: str):
    """`rlft.load` (a fine-tuned sampler from a checkpoint, `rlft.api.load`), imported on first use."""
    if name == "load":
        from rlft.api import load

        return load
    raise AttributeError(f"module 'rlft' has no attribute {name!r}")
