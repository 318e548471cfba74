"""The learner protocol every fine-tuning algorithm implements, and the registry `learner.type` names.

A learner owns the trainable parts (control network, LoRA adapter, initial-distribution control, value
network, RLlib algorithm, ...) for one task. The runners (`rlft train`, `rlft sweep`, Ray Jobs) only
call the methods below, so any learner runs under Tune, checkpoints, resumes and reports the same
figures (`rlft.evaluation.evaluate_run`).

Lifecycle: ``learner = build_learner(task, model, reward)`` -> repeated ``train_iteration()`` ->
``evaluate()`` every few iterations -> ``save_checkpoint(dir)`` / ``load_checkpoint(dir)``.
"""

from __future__ import annotations

import abc
from typing import Any, Callable

from rlft.config import ConfigError, TaskConfig, check_kwargs
from rlft.models.base import DiffusionModel
from rlft.rewards.base import Reward
from rlft.sampling import Control, InitialDistribution


class Learner(abc.ABC):
    """One fine-tuning algorithm on one task."""

    def __init__(self, task: TaskConfig, model: DiffusionModel, reward: Reward) -> None:
        self.task = task
        self.model = model
        self.reward = reward
        self.iteration = 0
        self.reward_queries = 0  # number of reward evaluations so far (sample-efficiency comparisons)

    @abc.abstractmethod
    def train_iteration(self) -> dict[str, float]:
        """One optimisation iteration; returns training metrics (losses, step sizes). Increments `iteration`."""

    @abc.abstractmethod
    def control(self) -> Control | None:
        """The fine-tuned displacement delta_k(x) = control(k, x, cond), or None if only nu is learned."""

    def init_dist(self) -> InitialDistribution | None:
        """The learned initial distribution, or None for the prior nu_ini."""
        return None

    def evaluate(self, num_samples: int = 2000, seed: int | None = None, progress: bool = False) -> dict[str, Any]:
        """The standard figures of `rlft.evaluation.evaluate_run` for the current fine-tuned sampler."""
        from rlft.evaluation import evaluate_run

        return evaluate_run(
            self.model, self.reward, self.task.alpha, control=self.control(), init=self.init_dist(),
            num_samples=num_samples, seed=self.task.seed + 1 if seed is None else seed, progress=progress,
        )

    @abc.abstractmethod
    def save_checkpoint(self, directory: str) -> None:
        """Writes weights (safetensors) and state (JSON) into an existing, empty directory."""

    @abc.abstractmethod
    def load_checkpoint(self, directory: str) -> None:
        """Restores exactly what `save_checkpoint` wrote (iteration counter included)."""


_LEARNERS: dict[str, Callable[..., Learner]] = {}
#: modules that register learners when imported (kept lazy: Ray and RLlib import slowly)
_LEARNER_MODULES: dict[str, str] = {
    "elegant": "rlft.control.elegant",
    "no_kl": "rlft.control.elegant",
    "truncation": "rlft.control.elegant",
    "random_k": "rlft.control.elegant",
    "ppo_kl": "rlft.rllib.ppo_kl",
    "fpg": "rlft.rllib.fpg",
}


def register_learner(name: str) -> Callable:
    """Class decorator: makes `learner: {type: name}` available."""

    def wrap(cls):
        _LEARNERS[name] = cls
        return cls

    return wrap


def learner_names() -> list[str]:
    return sorted(set(_LEARNERS) | set(_LEARNER_MODULES))


def resolve_learner(name: str) -> Callable[..., Learner]:
    if name not in _LEARNERS and name in _LEARNER_MODULES:
        import importlib

        importlib.import_module(_LEARNER_MODULES[name])
    if name not in _LEARNERS and ":" in name:  # a user's own learner, "module:Class" (importable on workers)
        import importlib

        module_name, _, attr = name.partition(":")
        try:
            return getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as err:
            raise ConfigError(f"learner.type {name!r} cannot be imported ({err}); check the 'module:Class' path") from None
    if name not in _LEARNERS:
        raise ConfigError(f"learner.type {name!r} is not a known learner; choose one of {learner_names()}")
    return _LEARNERS[name]


def build_learner(task: TaskConfig, model: DiffusionModel, reward: Reward) -> Learner:
    """Builds the learner `task.learner` names; its other keys go to the learner's constructor, checked."""
    spec = dict(task.learner or {"type": "elegant"})
    cls = resolve_learner(spec.pop("type", "elegant"))
    kwargs = check_kwargs(cls, spec, "learner", {"task": task, "model": model, "reward": reward})
    return cls(**kwargs)
