"""`rlft/Restart-v0`: denoise or re-noise, one level at a time (BOOST §4.3, MATH.md §5; Xu et al. 2023).

State: x at noise level l (0 = noisiest/prior ... K = data, as in `rlft.models.base`), the RL steps used t and the
network evaluations used (NFE). Actions (`rlft.guidance.restart`):

    0 = NOISE:   x_{l-1} = scale_{l-1} x_l + std_{l-1} eps   (``model.noise_step``, the forward kernel; 0 NFE)
    1 = DENOISE: x_{l+1} = ode_step_l(x_l)                     (``model.ode_step``, DDIM eta = 0; 1 NFE)

NOISE at level 0 (already the noisiest level) is a no-op that costs one step of the budget and no NFE: the
action space stays Discrete(2) everywhere, so no masking is needed, and a policy that keeps noising at level 0
just burns its budget. An episode terminates when l reaches K, or when the step budget L is spent: the
remaining levels are then finished with ODE steps (counted in NFE; ``info["budget_exhausted"]`` is True), so every
episode ends with a sample at level K. Hence NFE = K + (number of effective NOISE actions).

Observation (float32 Box): [x flattened (D), l/K, NFE/(K+L), t/L, conditioning (C, conditional models only)];
the last three are in [0, 1] and make the state Markov (BOOST §4.3.3 asks for that).
Reward: pluggable per-step reward ``step_reward(step: RestartStep, reward) -> (B,)``: "zero" (default; an f-PG
learner relabels rewards itself), "terminal" (the task's sample-quality reward r(x_K) when the episode ends),
or your own function / "module:attr" path. Info: ``nfe`` (B,) and ``budget_exhausted`` (B,).

Batched: B sub-envs at different levels step in one call, one network call per distinct level (never a
Python loop over sub-envs). NEXT_STEP autoreset. Random draws, all from the env's generator: x_0 for the
sub-envs that reset (in index order), then the noise of the NOISE actions, one draw per level in increasing
level order. Sub-envs that move in lockstep therefore reproduce `rlft.guidance.restart.restart_sample` exactly.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import gymnasium as gym
import numpy as np
import torch

from envs.base import COMMON_CONFIG_KEYS, BatchedDiffusionEnv, Cond, SingleTrajectoryEnv
from rlft.config import TaskConfig
from rlft.guidance.restart import DENOISE, NOISE
from rlft.models.base import DiffusionModel
from rlft.rewards import Reward, check_reward_values, evaluate
from rlft.sampling import InitialDistribution

ENV_ID = "rlft/Restart-v0"
#: Info keys.
NFE = "nfe"
BUDGET_EXHAUSTED = "budget_exhausted"
INIT_KL = "init_kl"


@dataclass(frozen=True)
class RestartStep:
    """What a step did, for the per-step reward (numpy arrays are (B,), on the CPU)."""

    x: torch.Tensor  # states after the step, (B, *event)
    level: np.ndarray  # levels after the step (K for terminated sub-envs)
    steps: np.ndarray  # RL steps used so far in the episode
    nfe: np.ndarray  # network evaluations used so far
    action: np.ndarray  # the actions taken (ignored where not `active`)
    active: np.ndarray  # False for sub-envs that were autoreset this step (their reward is forced to 0)
    terminated: np.ndarray  # episode ended at this step (at level K)
    budget_exhausted: np.ndarray  # ended because the budget ran out (levels finished with ODE steps)


class StepReward(Protocol):
    """A per-step reward of the restart env: (step, task reward) -> (B,) values (zeroed where not active)."""

    def __call__(self, step: RestartStep, reward: Reward | Callable) -> torch.Tensor | np.ndarray: ...


def zero_step_reward(step: RestartStep, reward: Reward | Callable) -> np.ndarray:
    """0 everywhere: learners that relabel rewards (f-PG's -f'(ratio)) use this."""
    return np.zeros(len(step.level), dtype=np.float32)


def terminal_step_reward(step: RestartStep, reward: Reward | Callable) -> np.ndarray:
    """The task's sample-quality reward r(x_K) on the step an episode ends, 0 before."""
    out = np.zeros(len(step.level), dtype=np.float32)
    done = np.flatnonzero(step.terminated)
    if len(done):
        out[done] = evaluate(reward, step.x[torch.as_tensor(done, device=step.x.device)]).detach().cpu().float().numpy()
    return out


#: Names usable as ``step_reward`` (besides a callable or a "module:attr" import path).
STEP_REWARDS: dict[str, StepReward] = {"zero": zero_step_reward, "terminal": terminal_step_reward}


def resolve_step_reward(spec: str | StepReward) -> StepReward:
    """A step reward from a name in `STEP_REWARDS`, a "module:attr" path, or a callable."""
    if callable(spec):
        return spec
    if isinstance(spec, str) and spec in STEP_REWARDS:
        return STEP_REWARDS[spec]
    if isinstance(spec, str) and ":" in spec:
        module_name, _, attr = spec.partition(":")
        try:
            fn = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"step_reward {spec!r}: cannot load {attr!r} from module {module_name!r} ({err})") from None
        if not callable(fn):
            raise ValueError(f"step_reward {spec!r} is not callable")
        return fn
    raise ValueError(f"step_reward must be one of {sorted(STEP_REWARDS)}, a 'module:function' path or a callable (got {spec!r})")


class RestartEnv(BatchedDiffusionEnv):
    """B restart trajectories: each step either noises up one level or takes one ODE step down."""

    config_keys = COMMON_CONFIG_KEYS + ("budget", "step_reward")

    def __init__(
        self,
        model: DiffusionModel | None = None,
        reward: Reward | Callable | None = None,
        *,
        num_envs: int = 1,
        task: TaskConfig | Mapping | str | os.PathLike | None = None,
        budget: int | None = None,
        step_reward: str | StepReward = "zero",
        init: InitialDistribution | None = None,
        cond: Cond | list | None = None,
        device: str | torch.device | None = None,
        seed: int | None = None,
    ) -> None:
        """
        Args:
            model, reward: the pretrained chain and the task reward (or give ``task`` instead).
            num_envs: B, the number of trajectories simulated together.
            task: a `TaskConfig`, its mapping, or a task YAML path; builds model and reward.
            budget: L, the RL steps per episode (>= K; default 2K).
            step_reward: "zero", "terminal", a "module:function" path or a callable (`StepReward`).
            init, cond, device, seed: as in `envs.drift.DenoisingDriftEnv`.
        """
        super().__init__(model, reward, num_envs=num_envs, task=task, init=init, cond=cond, device=device, seed=seed)
        K = self.num_steps
        budget = 2 * K if budget is None else budget
        if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < K:
            raise ValueError(f"budget must be an integer >= K = {K}, the steps an all-DENOISE episode needs (got {budget!r})")
        self.budget = int(budget)  # L
        self.step_reward = resolve_step_reward(step_reward)
        B, D, C = self.num_envs, self.event_dim, self.cond_dim
        inf_d, inf_c = np.full(D, np.inf), np.full(C, np.inf)
        low = np.concatenate([-inf_d, np.zeros(3), -inf_c]).astype(np.float32)
        high = np.concatenate([inf_d, np.ones(3), inf_c]).astype(np.float32)
        self.single_observation_space = gym.spaces.Box(low, high, dtype=np.float32)
        self.single_action_space = gym.spaces.Discrete(2)
        self.observation_space = gym.vector.utils.batch_space(self.single_observation_space, B)
        self.action_space = gym.vector.utils.batch_space(self.single_action_space, B)
        self.x: torch.Tensor | None = None  # (B, *event)
        self.level = np.zeros(B, dtype=np.int64)  # l in 0..K
        self.steps = np.zeros(B, dtype=np.int64)  # t in 0..L
        self.nfe = np.zeros(B, dtype=np.int64)
        self._done = np.zeros(B, dtype=bool)  # terminated last step: autoreset on the next one

    # -- gymnasium API -------------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self._seed_generator(seed)
        with torch.inference_mode():
            kl = self._start_episodes(None)
        info = {NFE: self.nfe.copy(), BUDGET_EXHAUSTED: np.zeros(self.num_envs, dtype=bool)}
        if kl is not None:
            info[INIT_KL] = kl
        return self._observe(), info

    @torch.inference_mode()
    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict]:
        a = self._check_discrete_actions(actions, 2)
        if self.x is None:
            raise RuntimeError("call reset() before step()")
        K, B = self.num_steps, self.num_envs
        resetting = self._done.copy()
        active = ~resetting
        kl = self._start_episodes(np.flatnonzero(resetting)) if resetting.any() else None
        # 1. the chosen moves, one network call / one noise draw per distinct level
        denoise = active & (a == DENOISE)
        noise = active & (a == NOISE) & (self.level > 0)  # NOISE at level 0: no-op
        self._ode_steps(denoise)  # also counts their NFE and moves their level
        for level in np.unique(self.level[noise]):  # increasing: the documented draw order
            idx = np.flatnonzero(noise & (self.level == level))
            self._apply(idx, lambda x, c: self.model.noise_step(int(level) - 1, x, self.generator))
        self.level -= noise
        self.steps += active
        # 2. episode ends: at level K, or budget spent -> finish the remaining levels with ODE steps
        exhausted = active & (self.steps >= self.budget) & (self.level < K)
        if exhausted.any():
            for level in range(int(self.level[exhausted].min()), K):  # sub-envs merge as they reach each level
                self._ode_steps(exhausted & (self.level == level))
        terminated = active & (self.level == K)
        self._done = terminated.copy()  # callers may keep `terminated`; autoreset edits _done in place
        step = RestartStep(self.x, self.level.copy(), self.steps.copy(), self.nfe.copy(), a, active, terminated, exhausted)
        rewards = check_reward_values(
            torch.as_tensor(self.step_reward(step, self.reward)), B, getattr(self.step_reward, "__name__", "step_reward"),
            "step_reward",
        )
        rewards = np.where(active, rewards.detach().cpu().numpy(), 0).astype(np.float32)
        info = {NFE: self.nfe.copy(), BUDGET_EXHAUSTED: exhausted}
        if kl is not None:
            info[INIT_KL] = kl
        return self._observe(), rewards, terminated, np.zeros(B, dtype=bool), info

    # -- helpers -------------------------------------------------------------------------------------
    def _ode_steps(self, mask: np.ndarray) -> None:
        """One ODE step down for the sub-envs in `mask` (levels < K), one network call per distinct level."""
        for level in np.unique(self.level[mask]):
            idx = np.flatnonzero(mask & (self.level == level))
            self._apply(idx, lambda x, c: self.model.ode_step(int(level), x, c))
        self.level += mask
        self.nfe += mask

    def _apply(self, idx: np.ndarray, fn: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]) -> None:
        """x[idx] <- fn(x[idx], cond[idx]); the whole batch without indexing when idx covers it."""
        if len(idx) == self.num_envs:
            self.x = fn(self.x, self.cond)
            return
        t = torch.as_tensor(idx, device=self.device)
        self.x = self.x.index_copy(0, t, fn(self.x[t], self.cond[t] if self.cond is not None else None))

    def _start_episodes(self, idx: np.ndarray | None) -> np.ndarray | None:
        """New episodes for sub-envs `idx` (all when None); returns the initial law's KL (B,) or None."""
        n = self.num_envs if idx is None else len(idx)
        x0, kl = self._draw_initial(n)
        if n == self.num_envs:
            self.x, idx = x0, None
            rows = slice(None)
        else:
            self.x = self.x.index_copy(0, torch.as_tensor(idx, device=self.device), x0)
            rows = idx
        self.level[rows], self.steps[rows], self.nfe[rows], self._done[rows] = 0, 0, 0, False
        self._draw_cond(idx)
        if kl is None:
            return None
        out = np.zeros(self.num_envs, dtype=np.float32)
        out[rows] = kl.cpu().float().numpy()
        return out

    def _observe(self) -> np.ndarray:
        B, D = self.num_envs, self.event_dim
        obs = np.empty((B, D + 3 + self.cond_dim), dtype=np.float32)  # (B, D + 3 + C)
        obs[:, :D] = self.x.reshape(B, D).cpu().numpy()
        obs[:, D] = self.level / self.num_steps
        obs[:, D + 1] = self.nfe / (self.num_steps + self.budget)
        obs[:, D + 2] = self.steps / self.budget
        if self.cond_dim:
            obs[:, D + 3 :] = self._cond_np
        return obs


class RestartSingleEnv(SingleTrajectoryEnv):
    """`RestartEnv` with one trajectory, as a plain `gymnasium.Env` (action 0 or 1)."""

    vector_class = RestartEnv
