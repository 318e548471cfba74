"""`rlft/DenoisingDrift-v0`: the denoising chain as a continuous-control environment (MATH.md §5, DDPO/DPOK view).

Action convention (used everywhere in rlft; ELEGANT App. E.3, RAY_NOTES.md §1.0):

    a_k = x_{k+1} - m_k(x_k, c)          the env steps x_{k+1} = m_k(x_k, c) + a_k

so a policy N(delta_theta(x_k, k), s_k^2 I) over a_k IS the fine-tuned transition N(m_k + delta_theta, s_k^2 I),
the pretrained policy is N(0, s_k^2 I), PPO's ratio is the ratio of transition densities, and the per-step KL
to the pretrained chain is |delta_theta|^2 / (2 s_k^2) (`rlft.sampling.step_kl`). The env applies the action with
`rlft.sampling.transition` (delta = a_k, zero noise: the action already carries the step's noise s_k eps_k), the
same function `rlft.sampling.rollout` back-propagates through, so the RL and differentiable learners share
one dynamics.

Observation (float32 Box): [x_k flattened (D), k/K in [0, 1], conditioning flattened (C, conditional models or tasks)].
A conditional task (`rlft.conditions`: ``conditions: {train, eval}``) gives each trajectory a TRAINING condition at
every reset (``group_size`` G: one condition per G consecutive sub-envs, GRPO's groups); held-out ones never
appear. The reward gets the condition (`rlft.rewards.evaluate(reward, x, cond=c)`); the model only when it is
conditional itself.
Action (Box, unbounded): the flattened displacement a_k, shape (D,).
Reward: 0 for k < K-1; r(x_K) (`rlft.rewards.evaluate`, checked) on the step that reaches x_K (terminated).
Info per step: ``log_prob_pretrained`` = log N(a_k; 0, s_k^2 I) (`rlft.sampling.action_log_prob`) and ``std`` = s_k,
so a learner can form the KL penalty without the model; ``true_reward`` r*(x_K) on the last step when the
reward has one; ``init_kl`` at (auto)reset when an initial distribution is given.

Episodes all last K steps, so the B sub-envs run in lockstep and autoreset together (NEXT_STEP: the step after
the terminal one ignores its actions and returns the new x_0 with reward 0).
Random draws, all from the env's generator, in the order `rlft.sampling.sample` makes them: x_0 (B, *event)
at each (auto)reset, then the conditioning (if drawn), and — only when the caller asks for them with
`pretrained_action` — the step noises eps_k (B, *event). A seeded env stepped with `pretrained_action()` thus
reproduces ``sample(model, n, seed=seed, batch_size=B)`` exactly, batch after batch.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

import gymnasium as gym
import numpy as np
import torch

from envs.base import COMMON_CONFIG_KEYS, CONDITION_CONFIG_KEYS, BatchedDiffusionEnv, Cond, SingleTrajectoryEnv
from rlft.conditions import Conditions
from rlft.config import TaskConfig
from rlft.models.base import DiffusionModel
from rlft.rewards import Reward, evaluate
from rlft.sampling import InitialDistribution, action_log_prob, transition

ENV_ID = "rlft/DenoisingDrift-v0"
#: Info keys (constants, STYLE.md).
LOG_PROB_PRETRAINED = "log_prob_pretrained"
STD = "std"
TRUE_REWARD = "true_reward"
INIT_KL = "init_kl"


class DenoisingDriftEnv(BatchedDiffusionEnv):
    """B trajectories of the pretrained chain, controlled through the displacement a_k = x_{k+1} - m_k(x_k)."""

    config_keys = COMMON_CONFIG_KEYS + CONDITION_CONFIG_KEYS

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
        """
        Args:
            model, reward: the pretrained chain and the reward (or give ``task`` instead).
            num_envs: B, the number of trajectories simulated together.
            task: a `TaskConfig`, its mapping, or a task YAML path; builds model and reward.
            init: a learned initial distribution (``init_sample(n, generator) -> (x0, kl)``); the prior when None.
            cond: conditioning for conditional models (see `envs.base.Cond`).
            device: where the model runs ("cpu", "cuda"); the model's device when None.
            seed: seed of the first reset when `reset` gets none (fresh entropy when None).
            conditions: a conditional task's conditions (`rlft.conditions.Conditions` or its mapping); the task's own
                when None. Without ``cond``, each reset draws training conditions from them.
            group_size: G, give each run of G consecutive sub-envs one condition (num_envs a multiple of G).
        """
        super().__init__(model, reward, num_envs=num_envs, task=task, init=init, cond=cond, device=device, seed=seed,
                         conditions=conditions, group_size=group_size)
        self._model_cond = self.model.cond_shape is not None  # else only the reward takes the condition
        B, D, C = self.num_envs, self.event_dim, self.cond_dim
        low = np.concatenate([np.full(D, -np.inf), [0.0], np.full(C, -np.inf)]).astype(np.float32)  # k/K in [0, 1]
        high = np.concatenate([np.full(D, np.inf), [1.0], np.full(C, np.inf)]).astype(np.float32)
        self.single_observation_space = gym.spaces.Box(low, high, dtype=np.float32)
        self.single_action_space = gym.spaces.Box(-np.inf, np.inf, (D,), dtype=np.float32)
        self.observation_space = gym.vector.utils.batch_space(self.single_observation_space, B)
        self.action_space = gym.vector.utils.batch_space(self.single_action_space, B)
        self._stds = [float(self.model.std(k)) for k in range(self.num_steps)]  # s_k, (K,)
        self._zero_noise = torch.zeros((B, *self.event_shape), device=self.device, dtype=self.model.dtype)
        self._np_dtype = self._zero_noise.cpu().numpy().dtype
        # the k/K observation column for every k, built once: an observation is then one torch.cat
        self._time_columns = [
            torch.full((B, 1), k / self.num_steps, device=self.device, dtype=self.model.dtype) for k in range(self.num_steps + 1)
        ]
        self.x: torch.Tensor | None = None  # x_k, (B, *event)
        self.k = 0  # the step all sub-envs are at (lockstep)
        self._needs_reset = False

    # -- gymnasium API -------------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self._seed_generator(seed)
        with torch.inference_mode():
            return self._start_episodes()

    @torch.inference_mode()
    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict]:
        a_np = self._check_box_actions(actions, check_finite=False)
        if self.x is None:
            raise RuntimeError("call reset() before step()")
        B = self.num_envs
        terminated = np.zeros(B, dtype=bool)
        if self._needs_reset:  # NEXT_STEP autoreset: the actions are ignored
            obs, info = self._start_episodes()
            return obs, np.zeros(B, dtype=np.float32), terminated, terminated.copy(), info
        k, std = self.k, self._stds[self.k]
        if a_np.dtype != self._np_dtype or not a_np.flags.writeable:  # torch.from_numpy wants a writable array
            a_np = a_np.astype(self._np_dtype)
        a = torch.from_numpy(a_np)
        a = (a if self.device.type == "cpu" else a.to(self.device)).reshape(B, *self.event_shape)
        log_prob = action_log_prob(a, std).cpu().numpy()  # (B,); not finite when an action is not
        if not np.isfinite(log_prob).all():
            self._raise_if_not_finite(a_np)
        # x_{k+1} = m_k(x_k, c) + a_k: the core transition with delta = a_k and no extra noise
        self.x = transition(self.model, k, self.x, delta=a, noise=self._zero_noise, cond=self.cond if self._model_cond else None)
        self.k = k + 1
        info = {LOG_PROB_PRETRAINED: log_prob, STD: np.full(B, std, dtype=self._np_dtype)}
        if self.k < self.num_steps:
            rewards = np.zeros(B, dtype=self._np_dtype)
        else:
            rewards = evaluate(self.reward, self.x, cond=self.cond).detach().cpu().numpy()
            if getattr(self.reward, "has_true_reward", False):
                info[TRUE_REWARD] = evaluate(self.reward, self.x, true=True, cond=self.cond).detach().cpu().numpy()
            terminated[:] = True
            self._needs_reset = True
        return self._observe(), rewards, terminated, np.zeros(B, dtype=bool), info

    # -- helpers -------------------------------------------------------------------------------------
    def pretrained_action(self) -> np.ndarray:
        """A pretrained-policy action a_k = s_k eps_k, eps_k ~ N(0, I) from the env's generator, shape (B, D).

        Zeros (and no draw) on an autoreset step, whose actions the env ignores; so stepping with this from a
        seeded reset reproduces `rlft.sampling.sample` with the same seed and batch_size = B.
        """
        if self._needs_reset or self.x is None:
            return np.zeros((self.num_envs, self.event_dim), dtype=self._np_dtype)
        eps = torch.randn(self.x.shape, generator=self.generator, device=self.device, dtype=self.model.dtype)
        return (self._stds[self.k] * eps).reshape(self.num_envs, -1).cpu().numpy()

    def _start_episodes(self) -> tuple[np.ndarray, dict]:
        x0, kl = self._draw_initial(self.num_envs)
        self.x, self.k, self._needs_reset = x0, 0, False
        self._draw_cond(None)
        info = {} if kl is None else {INIT_KL: kl.cpu().numpy()}
        return self._observe(), info

    def _observe(self) -> np.ndarray:
        B = self.num_envs
        parts = [self.x.reshape(B, -1), self._time_columns[self.k]]
        if self.cond_dim:
            parts.append(self.cond.reshape(B, -1).to(self.x.dtype))
        # (B, D + 1 + C), a fresh array each step (RLlib keeps references to past observations)
        return torch.cat(parts, dim=1).to(torch.float32).cpu().numpy()


class DenoisingDriftSingleEnv(SingleTrajectoryEnv):
    """`DenoisingDriftEnv` with one trajectory, as a plain `gymnasium.Env` (actions (D,), observations (D+1+C,))."""

    vector_class = DenoisingDriftEnv

    def pretrained_action(self) -> np.ndarray:
        """a_k = s_k eps_k from the env's generator, shape (D,)."""
        return self.vector_env.pretrained_action()[0]
