"""Group-relative policy optimisation (GRPO) with the exact KL to the pretrained model, on a drift env.

Flow-GRPO (Liu et al. 2025, eq. 4-6) / DanceGRPO: G trajectories per condition, no critic; every step of trajectory i
gets the group-relative advantage (MATH.md "GRPO"; `rlft.rllib.connectors.group_advantages`)

    A_i = R_i - mean_g R                              (default; learner.normalize_std: true divides by std_g R + eps)

and PPO's clipped ratio of transition densities N(a; delta_theta, s_k^2) / N(a; delta_old, s_k^2) (eq. 22). The KL to
the pretrained chain enters as PPO+KL's does (`rlft.rllib.ppo_kl`, MATH.md §5b), so the surrogate gradient is that of
J = E[r(x_K)] - alpha E[sum_k KL_k], KL_k = |delta_k|^2 / (2 s_k^2):

    R_i          = r_i - alpha sum_k KL_k(delta_behaviour)   (`KLPenaltyConnector`: the score part sees the future KL)
    direct term  : loss += alpha (G - 1) / (G scale_g) * mean_k KL_k(delta_theta)   (`GroupAdvantageConnector`)

Flow-GRPO puts the KL in the loss only (DPOK's partial gradient, biased: MATH.md §5b); here both parts are kept. The
mean baseline holds R_i itself, so E[(R_i - mean_g R) grad log pi] = (G - 1) / G E[R_i grad log pi]; the direct term
carries the same factor, and with normalize_std off the loss gradient is -(G - 1) / (G K) dJ/dtheta
(tests/rllib/test_grpo.py pins it against the closed form of a linear-Gaussian chain). With normalize_std on, each
group's gradient is divided by its std: the per-condition scale changes, the trade-off alpha does not.

Groups: G consecutive episodes of the batch (`GroupAdvantageConnector`); the EnvRunners stay batched (each round of
num_envs sub-envs is num_envs / G whole groups), so episodes_per_iteration and num_envs must be multiples of G, and
one Learner (RLlib shards episodes across Learners without regard to groups).

Layout: `GRPOOptions` (config) -> `GRPOLearner` (PPO+KL's learner, GAE replaced by the group connector, no critic) ->
`DriftPolicyModule` without its value network. `GRPO` is the `rlft.learners.Learner` of ``learner: {type: grpo}``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ray.rllib.algorithms.ppo import PPOConfig
from ray.rllib.connectors.learner import GeneralAdvantageEstimation

from rlft.config import ConfigError, TaskConfig
from rlft.models.base import DiffusionModel
from rlft.rewards.base import Reward
from rlft.rllib.adapter import _fail
from rlft.rllib.connectors import GroupAdvantageConnector, KLLossScaleConnector
from rlft.rllib.keys import ALPHA, GROUP_SIZE, NORMALIZE_STD, STD_EPS, VALUE_NET
from rlft.rllib.ppo_kl import PPOKL, PPOKLLearner, PPOKLOptions


@dataclass(frozen=True)
class GRPOOptions(PPOKLOptions):
    """GRPO (`learner: {type: grpo, ...}`): PPO+KL's settings without the critic, plus the group's; alpha is the task's.

    lambda_ is unused (no GAE); gamma must be 1 (R_i is the undiscounted episode return, as J is defined).
    """

    group_size: int = 16
    """G: trajectories per group (per condition); episodes_per_iteration and num_envs must be multiples of G."""
    normalize_std: bool = False
    """Divide each group's centred returns by its std (+ std_eps), as Flow-GRPO does; false (default): the mean
    baseline alone, whose surrogate gradient is (G - 1) / G of dJ/dtheta. Measured on the 2-D mixture (alpha 1, 256
    episodes per iteration, same seed): false 0.908 / 0.907 / 0.923 of the gap at iteration 75 / 100 / 125, true
    0.901 / 0.895 / 0.818 (small-std groups get large steps)."""
    std_eps: float = 1e-4
    """Added to the group's std before dividing (a group of equal returns gets advantage 0)."""
    episodes_per_iteration: int = 256
    """Trajectories per iteration, all EnvRunners together (a multiple of group_size)."""
    lr_final: float | None = 1e-4
    """lr of the last of run.iterations, reached linearly from lr (null: lr throughout). With a constant lr the
    iterate keeps moving by the gradient noise: on tune_configs/conditional_gmm.yaml (100 iterations, seed 0,
    1000 samples per condition, s.e. of the mean training gap closure ~0.01) the training gap closure read
    .848/.865/.835/.855/.871 at iterations 20/40/60/80/100 at lr 1e-3, and .838/.867/.856/.876/.892 with this
    decay (2000-sample final evaluation 0.892); at 512 episodes per iteration 0.899 either way."""

    def __post_init__(self) -> None:
        if self.group_size < 2:
            _fail("group_size", self.group_size, "must be >= 2 (a group's mean is the baseline)", "use e.g. group_size: 16")
        if self.lr_final is not None and self.lr_final > self.lr:
            _fail("lr_final", self.lr_final, f"must be <= lr = {self.lr} (the schedule decays)", f"use lr_final: {self.lr / 10:g} or null")
        if not self.std_eps > 0:
            _fail("std_eps", self.std_eps, "must be > 0", "use std_eps: 1e-4")
        if self.gamma != 1.0:
            _fail("gamma", self.gamma, "must be 1.0 for grpo (R_i is the undiscounted return of J)", "leave gamma out")
        for name in ("episodes_per_iteration", "num_envs"):
            value = getattr(self, name)
            if value % self.group_size:
                _fail(name, value, f"must be a multiple of group_size = {self.group_size} (every group is group_size "
                      "consecutive trajectories of one batch)",
                      f"use {name}: {max(1, round(value / self.group_size)) * self.group_size}")
        super().__post_init__()


class GRPOLearner(PPOKLLearner):
    """PPO+KL's torch learner with GAE (and its critic-based KL scale) replaced by `GroupAdvantageConnector`."""

    def build(self) -> None:
        super().build()  # AddOneTs..., KLPenaltyConnector (alpha > 0), GAE, KLLossScaleConnector (alpha > 0)
        if self._learner_connector is None:
            return
        cfg = self.config.learner_config_dict
        self._learner_connector.remove(GeneralAdvantageEstimation)
        if float(cfg.get(ALPHA, 0.0)) > 0:
            self._learner_connector.remove(KLLossScaleConnector)
        self._learner_connector.append(GroupAdvantageConnector(
            alpha=float(cfg.get(ALPHA, 0.0)), group_size=int(cfg[GROUP_SIZE]), normalize_std=bool(cfg[NORMALIZE_STD]),
            eps=float(cfg[STD_EPS])))


class GRPO(PPOKL):
    """GRPO with the exact KL to the pretrained model on a drift env, as ``learner: {type: grpo, ...}`` (`GRPOOptions`)."""

    Options = GRPOOptions

    def __init__(self, task: TaskConfig, model: DiffusionModel, reward: Reward, options: GRPOOptions | None = None) -> None:
        from rlft.run_config import run_config_of

        o = options or GRPOOptions()
        run = run_config_of(task)
        if "num_envs_per_env_runner" in (task.run or {}) and run.num_envs_per_env_runner % o.group_size:
            raise ConfigError(f"run.num_envs_per_env_runner must be a multiple of learner.group_size = {o.group_size} "
                              f"(got {run.num_envs_per_env_runner}): each EnvRunner round must hold whole groups")
        if run.num_learners > 1:
            raise ConfigError(f"run.num_learners must be 0 or 1 for grpo (got {run.num_learners}): RLlib shards episodes "
                              "across Learners without regard to groups; use one (GPU) Learner")
        super().__init__(task, model, reward, o)

    def build_config(self) -> PPOConfig:
        self.model_config = {**self.model_config, VALUE_NET: False}  # no critic: the group mean is the baseline
        if self.conditions is not None:  # each group of G consecutive sub-envs shares one training condition
            self.env = dataclasses.replace(self.env, env_kwargs={**self.env.env_kwargs, GROUP_SIZE: self.options.group_size})
        config = super().build_config()
        o = self.options
        config.learners(learner_class=GRPOLearner, learner_config_dict={
            ALPHA: self.task.alpha, GROUP_SIZE: o.group_size, NORMALIZE_STD: o.normalize_std, STD_EPS: o.std_eps})
        config.training(use_critic=False)
        return config
