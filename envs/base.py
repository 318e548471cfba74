"""Shared plumbing of the rlft Gymnasium environments (DESIGN.md "One environment definition serves every learner").

Every rlft environment is a `gymnasium.vector.VectorEnv` that simulates B trajectories of one pretrained chain
in one torch call, with NEXT_STEP autoreset (RAY_NOTES.md §2: after sub-env i reports ``terminated``, the next
`step` ignores action i, returns its reset observation and reward 0), numpy outputs and a torch generator
that makes runs reproducible. This module holds what the drift and restart envs share:

- `BatchedDiffusionEnv`: construction from objects (``model``, ``reward``) or from a task (a `TaskConfig`, its
  mapping, or a YAML path), seeding, conditioning, initial states, and the action checks;
- `SingleTrajectoryEnv`: the plain `gymnasium.Env` over a batch of one, for tools that need one
  (`gymnasium.utils.env_checker.check_env`, SB3-style code);
- `build_task_objects`: TaskConfig -> (model, reward), the one place a config dict becomes objects.

The dynamics themselves are never written here: the envs call `rlft.sampling.transition` and the model's
``ode_step`` / ``noise_step`` (`rlft.models.base.DiffusionModel`), the code every sampler and learner uses.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from rlft.conditions import Conditions, parse_conditions
from rlft.config import ConfigError, TaskConfig, load_task, task_from_dict
from rlft.models import build_model
from rlft.models.base import DiffusionModel
from rlft.rewards import Reward, build_reward
from rlft.sampling import InitialDistribution

#: Conditioning: one vector for all sub-envs (*cond_shape), one per sub-env (B, *cond_shape), or a sampler
#: ``cond(n, generator) -> (n, *cond_shape)`` drawn at every (auto)reset.
Cond = torch.Tensor | Callable[[int, torch.Generator], torch.Tensor]

#: Keys every env config accepts (what RLlib passes as ``env_config``); each env adds its own.
COMMON_CONFIG_KEYS = ("task", "num_envs", "device", "seed", "cond")
#: Keys of an env that draws a conditional task's training conditions (`BatchedDiffusionEnv` ``conditions=``,
#: ``group_size=``; the drift env takes them).
CONDITION_CONFIG_KEYS = ("conditions", "group_size")


def build_task_objects(task: TaskConfig | Mapping | str | os.PathLike) -> tuple[TaskConfig, DiffusionModel, Reward]:
    """Builds the pretrained chain and the reward a task describes.

    Args:
        task: a `TaskConfig`, its mapping (as in YAML / ``rlft.config.DEFAULT_TASK``), or the path of a task YAML.
    Returns:
        (task config, model with K = task.num_steps, reward built with ``model=`` as context).
    """
    if isinstance(task, (str, os.PathLike)):
        cfg = load_task(task)
    elif isinstance(task, TaskConfig):
        cfg = task
    elif isinstance(task, Mapping):
        cfg = task_from_dict(dict(task))
    else:
        raise ConfigError(f"task must be a TaskConfig, a mapping or a YAML path (got {type(task).__name__})")
    model = build_model(cfg.model, num_steps=cfg.num_steps)
    return cfg, model, build_reward(cfg.reward, model=model)


def check_env_config(env_config: Mapping, allowed: tuple[str, ...], env_name: str) -> dict[str, Any]:
    """Rejects unknown env-config keys with the list of valid ones; returns a plain dict (EnvContext -> dict)."""
    if not isinstance(env_config, Mapping):
        raise ConfigError(f"env_config of {env_name} must be a mapping (got {type(env_config).__name__})")
    unknown = sorted(set(env_config) - set(allowed))
    if unknown:
        raise ConfigError(f"env_config.{unknown[0]} is not a known key of {env_name}; valid keys: {sorted(allowed)}")
    if "task" not in env_config:
        raise ConfigError(f"env_config of {env_name} needs a 'task' (a task mapping as in tune_configs/*.yaml, or a YAML path)")
    return dict(env_config)


class BatchedDiffusionEnv(gym.vector.VectorEnv):
    """Base of the batched envs: a pretrained chain, a reward, B trajectories, one torch generator.

    Subclasses define the spaces, `reset` and `step`. Random draws all come from ``self.generator`` (on the
    model's device), in a documented order, so that a seeded env reproduces the core samplers exactly.
    """

    metadata = {"autoreset_mode": gym.vector.AutoresetMode.NEXT_STEP, "render_modes": []}
    #: Keys `from_config` accepts (the constructor's keyword arguments that a YAML / RLlib env_config can hold).
    config_keys: tuple[str, ...] = COMMON_CONFIG_KEYS

    @classmethod
    def from_config(cls, env_config: Mapping) -> "BatchedDiffusionEnv":
        """From a plain config dict, e.g. ``{"task": {...task mapping...}, "num_envs": 256, "device": "cpu"}``
        (what RLlib passes as ``env_config``; an ``EnvContext`` works too)."""
        return cls(**check_env_config(env_config, cls.config_keys, cls.__name__))

    def __init__(
        self,
        model: DiffusionModel | None = None,
        reward: Reward | Callable | None = None,
        *,
        num_envs: int = 1,
        task: TaskConfig | Mapping | str | os.PathLike | None = None,
        init: InitialDistribution | None = None,
        cond: Cond | list | None = None,
        device: str | torch.device | None = None,
        seed: int | None = None,
        conditions: Conditions | Mapping | None = None,
        group_size: int | None = None,
    ) -> None:
        if task is not None:
            if model is not None or reward is not None:
                raise ValueError("give either task=... or model= and reward=, not both")
            self.task, model, reward = build_task_objects(task)
        else:
            self.task = None
            if not isinstance(model, DiffusionModel):
                raise ValueError(
                    f"model must be a rlft DiffusionModel (got {type(model).__name__}); pass model= and reward=, or task="
                )
            if reward is None or not callable(reward):
                raise ValueError(f"reward must be a rlft Reward or a function x -> r (got {type(reward).__name__})")
        if isinstance(num_envs, bool) or not isinstance(num_envs, (int, np.integer)) or num_envs < 1:
            raise ValueError(f"num_envs must be an integer >= 1 (got {num_envs!r})")
        if device is not None and torch.device(device) != model.device:
            model.to(device=device)
        self.model = model
        self.reward = reward.to(model.device) if isinstance(reward, Reward) else reward
        self.init = init
        self.num_envs = int(num_envs)
        self.device = model.device
        self.num_steps = model.num_steps  # K
        self.event_shape = tuple(model.event_shape)
        self.event_dim = model.event_dim  # D
        self.generator = torch.Generator(device=self.device)
        self._default_seed = seed
        self._seeded = False
        self.conditions = self._task_conditions(conditions)
        if cond is None and self.conditions is not None:  # a conditional task: draw its TRAINING conditions
            cond = self._condition_sampler(self.conditions, group_size)
        self.cond_shape = model.cond_shape if model.cond_shape is not None else (
            self.conditions.shape if self.conditions is not None else None)  # a conditional model's, or the reward's
        self._cond_source, self.cond_dim = self._check_cond(cond)
        self.cond: torch.Tensor | None = None  # (B, *cond_shape) of the current episodes
        self._cond_np: np.ndarray | None = None  # (B, C) float32 copy for observations

    # -- seeding and conditioning --------------------------------------------------------------------
    def _seed_generator(self, seed: int | None) -> None:
        """Seeds the torch generator on `reset(seed=...)`; the first unseeded reset uses the constructor seed,
        else fresh OS entropy (so parallel workers differ unless seeded)."""
        if seed is None and not self._seeded:
            seed = self._default_seed
            if seed is None:
                seed = int(np.random.SeedSequence().generate_state(1, np.uint64)[0] >> np.uint64(1))
        if seed is not None:
            if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
                raise ValueError(f"seed must be a non-negative integer or None (got {seed!r})")
            self.generator.manual_seed(int(seed))
            self._seeded = True

    def _task_conditions(self, conditions: Conditions | Mapping | None) -> Conditions | None:
        """`conditions` (parsed with the task's seed when a mapping), else the task's own `conditions:`, else None."""
        if isinstance(conditions, Conditions):
            return conditions
        spec = conditions if conditions is not None else getattr(self.task, "conditions", None)
        return None if spec is None else parse_conditions(dict(spec), int(getattr(self.task, "seed", 0) or 0))

    def _condition_sampler(self, conditions: Conditions, group_size: int | None) -> Callable:
        """cond(n, generator): n training conditions (never held-out ones), one per trajectory, or with group_size G
        n / G distinct ones each given to G consecutive sub-envs (GRPO's groups, `Conditions.groups`)."""
        if group_size is None:
            return lambda n, generator: conditions.sample(n, generator)
        G = int(group_size)
        if G < 1 or self.num_envs % G:
            raise ValueError(f"group_size must divide num_envs = {self.num_envs} (got {group_size}): every reset draws "
                             "num_envs / group_size conditions, each for group_size consecutive sub-envs")
        return lambda n, generator: conditions.groups(n // G, G, generator)[1]

    def _check_cond(self, cond: Cond | list | None) -> tuple[Any, int]:
        cond_shape = self.cond_shape
        if cond_shape is None:
            if cond is not None:
                raise ValueError(f"cond was given but the model {type(self.model).__name__} is unconditional (and the "
                                 "task declares no conditions); pass cond=None")
            return None, 0
        if cond is None:
            raise ValueError(
                f"the model is conditional (cond_shape {tuple(cond_shape)}); pass cond= as a tensor of shape "
                f"{tuple(cond_shape)} or (num_envs, *cond_shape), or a sampler cond(n, generator)"
            )
        if isinstance(cond, (list, tuple, np.ndarray)):
            cond = torch.as_tensor(np.asarray(cond), dtype=self.model.dtype)
        if isinstance(cond, torch.Tensor):
            cond = cond.to(device=self.device)
            if tuple(cond.shape) == tuple(cond_shape):
                cond = cond.expand(self.num_envs, *cond_shape)
            if tuple(cond.shape) != (self.num_envs, *cond_shape):
                raise ValueError(
                    f"cond must have shape {tuple(cond_shape)} or ({self.num_envs}, {', '.join(map(str, cond_shape))}) "
                    f"(got {tuple(cond.shape)})"
                )
        elif not callable(cond):
            raise ValueError(f"cond must be a tensor, a list of numbers or a sampler (n, generator) -> tensor (got {type(cond).__name__})")
        return cond, math.prod(cond_shape)

    def _draw_initial(self, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x_0 for n new episodes, and the initial law's per-sample KL (None for the prior). Draws first."""
        if self.init is None:
            return self.model.prior_sample(n, self.generator), None
        x0, kl = self.init.init_sample(n, self.generator)
        return x0.to(device=self.device, dtype=self.model.dtype), kl.to(device=self.device, dtype=self.model.dtype)

    def _draw_cond(self, idx: np.ndarray | None) -> None:
        """Refreshes the conditioning of the sub-envs `idx` (all when None); draws after the initial states."""
        source = self._cond_source
        if source is None:
            return
        if isinstance(source, torch.Tensor):  # fixed per sub-env: set once
            if self.cond is None:
                self.cond = source.clone()
        else:
            n = self.num_envs if idx is None else len(idx)
            new = source(n, self.generator).to(device=self.device, dtype=self.model.dtype)
            if tuple(new.shape) != (n, *self.cond_shape):
                raise ValueError(
                    f"the cond sampler must return shape ({n}, {', '.join(map(str, self.cond_shape))}) (got {tuple(new.shape)})"
                )
            if idx is None:  # a full reset always comes first
                self.cond = new
            else:
                self.cond[torch.as_tensor(idx, device=self.device)] = new
        self._cond_np = self.cond.reshape(self.num_envs, -1).to(device="cpu", dtype=torch.float32).numpy()

    # -- action checks -------------------------------------------------------------------------------
    def _check_box_actions(self, actions: Any, check_finite: bool = True) -> np.ndarray:
        """(B, D) real actions; returns a numpy array (dtype kept when floating). With check_finite=False the
        caller must call `_raise_if_not_finite` before using them (the drift env folds that check into its
        log-density, which is finite exactly when the action is, barring overflow)."""
        a = actions.detach().cpu().numpy() if isinstance(actions, torch.Tensor) else np.asarray(actions)
        shape = (self.num_envs, self.event_dim)
        if a.shape != shape:
            raise ValueError(
                f"actions must have shape {shape} (num_envs, event_dim: the flattened displacement "
                f"a_k = x_(k+1) - m_k(x_k) per sub-env) (got {a.shape})"
            )
        if a.dtype.kind not in "fiu":
            raise ValueError(f"actions must be real numbers (got dtype {a.dtype})")
        if a.dtype.kind != "f":
            return a.astype(np.float32)
        if check_finite:
            self._raise_if_not_finite(a)
        return a

    def _raise_if_not_finite(self, a: np.ndarray) -> None:
        """Raises naming the first sub-env whose action has a NaN/inf entry."""
        bad = np.flatnonzero(~np.isfinite(a).all(axis=1))
        if len(bad):
            raise ValueError(
                f"actions contain NaN/inf for {len(bad)} of {self.num_envs} sub-envs (first: sub-env {int(bad[0])}, "
                f"values {a[bad[0]].tolist()[:4]}...); the policy must output finite displacements"
            )

    def _check_discrete_actions(self, actions: Any, n: int) -> np.ndarray:
        """(B,) integer actions in [0, n); returns an int64 numpy array."""
        a = actions.detach().cpu().numpy() if isinstance(actions, torch.Tensor) else np.asarray(actions)
        if a.shape != (self.num_envs,):
            raise ValueError(f"actions must have shape ({self.num_envs},), one integer per sub-env (got {a.shape})")
        if a.dtype.kind not in "iu":
            raise ValueError(f"actions must be integers in [0, {n}) (got dtype {a.dtype}, e.g. {a.reshape(-1)[:4].tolist()})")
        bad = np.flatnonzero((a < 0) | (a >= n))
        if len(bad):
            raise ValueError(f"actions must be in [0, {n}) (got {int(a[bad[0]])} for sub-env {int(bad[0])})")
        return a.astype(np.int64, copy=False)

    def close_extras(self, **kwargs: Any) -> None:
        self.cond = None


class SingleTrajectoryEnv(gym.Env):
    """A plain `gymnasium.Env` over a batched env with ``num_envs=1`` (no autoreset: call `reset` after the end).

    Observations, actions and rewards are the batched env's row 0; info values are unbatched the same way.
    """

    metadata = {"render_modes": []}
    vector_class: type[BatchedDiffusionEnv]

    def __init__(self, **kwargs: Any) -> None:
        if kwargs.get("num_envs", 1) != 1:
            raise ValueError(f"the single-trajectory env has num_envs=1 (got {kwargs['num_envs']}); use the vector env")
        kwargs.pop("num_envs", None)
        self.vector_env = self.vector_class(num_envs=1, **kwargs)
        self.observation_space = self.vector_env.single_observation_space
        self.action_space = self.vector_env.single_action_space
        self._over = True

    @classmethod
    def from_config(cls, env_config: Mapping) -> "SingleTrajectoryEnv":
        """From a plain env config (as `BatchedDiffusionEnv.from_config`), with num_envs = 1."""
        cfg = check_env_config(env_config, cls.vector_class.config_keys, cls.__name__)
        return cls(**cfg)

    def __getattr__(self, name: str) -> Any:  # model, reward, generator, ... of the wrapped env
        if name.startswith("_") or name == "vector_env":
            raise AttributeError(name)
        return getattr(self.vector_env, name)

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        if seed is None and not self.vector_env._seeded and self.vector_env._default_seed is None:
            seed = int(self.np_random.integers(2**62))  # reproducible from gym's own seeding
        obs, info = self.vector_env.reset(seed=seed, options=options)
        self._over = False
        return obs[0], _unbatch(info)

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        if self._over:
            raise RuntimeError("the episode has ended (or never started); call reset() before step()")
        obs, reward, terminated, truncated, info = self.vector_env.step(np.asarray(action)[None])
        self._over = bool(terminated[0] or truncated[0])
        return obs[0], float(reward[0]), bool(terminated[0]), bool(truncated[0]), _unbatch(info)

    def close(self) -> None:
        self.vector_env.close()


def _unbatch(info: dict) -> dict:
    return {k: (v[0] if isinstance(v, np.ndarray) else v) for k, v in info.items()}
