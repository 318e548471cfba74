"""The learner protocol every fine-tuning algorithm implements, and `build_learner` through the registry.

A learner owns the trainable parts (control network, LoRA adapter, initial-distribution control, value
network, RLlib algorithm, ...) for one task. The runners (`rlft train`, `rlft sweep`, Ray Jobs) only
call the methods below, so any learner runs under Tune, checkpoints, resumes and reports the same
figures (`rlft.evaluation.evaluate_run`).

Options are typed: each learner class names a frozen dataclass `Options` (one docstring per field); the YAML
`learner:` section minus `type` is parsed into it with path-naming errors (`parse_options`) before Ray starts,
and checks that need the model (its shape, whether it is a diffusers chain) run in the learner's constructor.

Lifecycle: ``learner = build_learner(task, model, reward)`` -> repeated ``train_iteration()`` ->
``evaluate()`` every few iterations -> ``save_checkpoint(dir)`` / ``load_checkpoint(dir)``.
"""

from __future__ import annotations

import abc
import dataclasses
import inspect
from typing import Any, ClassVar

import rlft.registry as registry
from rlft.conditions import conditions_of
from rlft.config import ConfigError, TaskConfig, check_kwargs, from_dict
from rlft.models.base import DiffusionModel
from rlft.rewards.base import Reward
from rlft.sampling import Control, InitialDistribution

DEFAULT_LEARNER = "elegant"


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """A learner without options."""


class Learner(abc.ABC):
    """One fine-tuning algorithm on one task."""

    Options: ClassVar[type] = NoOptions
    """The learner's typed, frozen options (the YAML `learner:` keys besides `type`)."""
    needs_reward: ClassVar[bool] = True
    """False for a learner whose task may leave out `reward:` (it gets reward None): S-MEME, discriminator guidance."""

    def __init__(self, task: TaskConfig, model: DiffusionModel, reward: Reward, options: Any = None) -> None:
        self.task = task
        self.model = model
        self.reward = reward
        self.options = options if options is not None else self.Options()
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
        """The standard figures of `rlft.evaluation.evaluate_run` for the current fine-tuned sampler (per condition,
        with `heldout` and `per_condition`, for a conditional task)."""
        from rlft.evaluation import evaluate_run

        return evaluate_run(
            self.model, self.reward, self.task.alpha, control=self.control(), init=self.init_dist(),
            num_samples=num_samples, seed=self.task.seed + 1 if seed is None else seed, progress=progress,
            conditions=conditions_of(self.task),
        )

    @abc.abstractmethod
    def save_checkpoint(self, directory: str) -> None:
        """Writes weights (safetensors) and state (JSON) into an existing, empty directory."""

    @abc.abstractmethod
    def load_checkpoint(self, directory: str) -> None:
        """Restores exactly what `save_checkpoint` wrote (iteration counter included)."""


def learner_names() -> list[str]:
    """The `learner.type` names rlft knows (a user's own learner is named 'module:Class')."""
    return registry.names("learner")


def resolve_learner(name: str) -> type:
    """The learner class `learner.type` names (imports its module now)."""
    if not isinstance(name, str):
        raise ConfigError(f"learner.type must be a string, one of {learner_names()} (got {name!r})")
    try:
        return registry.resolve("learner", name)
    except registry.RegistryError as err:
        raise ConfigError(f"learner.type: {err}") from None


def _split(spec: dict | None) -> tuple[str, dict[str, Any]]:
    spec = dict(spec or {"type": DEFAULT_LEARNER})
    return spec.pop("type", DEFAULT_LEARNER), spec


def parse_options(cls: type, params: dict[str, Any]) -> Any:
    """The YAML `learner:` keys (without `type`) as `cls.Options`; errors name `learner.<key>`.

    A user's learner without an `Options` dataclass takes its keys as constructor keyword arguments."""
    if _has_options(cls):
        return from_dict(cls.Options, params, "learner")
    return check_kwargs(cls, params, "learner", {"task": None, "model": None, "reward": None})


def _has_options(cls: type) -> bool:
    """True for a learner built as cls(task, model, reward, options): an `Options` dataclass and a named `options`
    parameter (a `**options` catch-all is a plain keyword-argument learner)."""
    if not dataclasses.is_dataclass(getattr(cls, "Options", None)):
        return False
    param = inspect.signature(cls.__init__).parameters.get("options")
    return param is not None and param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY)


def check_learner_spec(spec: dict | None) -> tuple[type, Any]:
    """Resolves `learner.type` and parses its options (no model needed): what runs before Ray starts."""
    name, params = _split(spec)
    cls = resolve_learner(name)
    return cls, parse_options(cls, params)


def check_reward_needed(cls: type, reward_spec: Any) -> None:
    """Refuses a task without `reward:` unless its learner class says `needs_reward = False`."""
    if reward_spec is None and getattr(cls, "needs_reward", True):
        name = getattr(cls, "name", cls.__name__)
        raise ConfigError(f"reward is required for learner {name!r} (the task has no `reward:` key); add one, e.g. "
                          "reward: {type: quadratic, center: [0, 0], scale: 1.0} (only learners that need no reward, "
                          "such as smeme or discriminator_guidance, run without it)")


def build_learner(task: TaskConfig, model: DiffusionModel, reward: Reward | None) -> Learner:
    """Builds the learner `task.learner` names with its parsed options (reward None only where it needs none)."""
    cls, options = check_learner_spec(task.learner)
    check_reward_needed(cls, reward if reward is not None else task.reward)
    if _has_options(cls):
        return cls(task, model, reward, options)
    kwargs = dict(options)
    kwargs.update(task=task, model=model, reward=reward)
    return cls(**kwargs)


def register_learner(name: str):
    """Class decorator: makes `learner: {type: name}` resolve to the class in this process (prefer a line in
    `rlft.registry._TABLE`, which works on every Ray worker without importing the module first)."""

    def wrap(cls):
        if registry.target("learner", name) is None:
            registry.register("learner", name, cls)
        return cls

    return wrap
