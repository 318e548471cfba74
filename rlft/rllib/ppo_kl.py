"""PPO with a KL penalty to the pretrained model on a drift env (ELEGANT App. E.3, eq. 22-23; DPOK; DDPO).

Objective (MATH.md §2, §5):  J = E[r(x_K)] - alpha * E[sum_k KL_k],   KL_k = |delta_k|^2 / (2 s_k^2)   (closed form,
`rlft.sampling.step_kl`, never a sample estimate). PPO's clipped surrogate (eq. 22) runs on the transition ratio
N(a; delta_theta, s_k^2) / N(a; delta_old, s_k^2) (`rlft.rllib.modules.DriftPolicyModule`).

KL_k is a function of the STATE x_k (and theta), not of the sampled action, so its gradient has two parts (MATH.md §5b):
the score-function part (each step's log-prob times the reward-to-go, which includes the FUTURE KL terms) and the
direct part d KL_k / d theta at fixed x_k. As a reward alone the direct part is lost (E[grad log pi(a|x) c(x)] = 0)
and the KL grows without bound (measured: path KL 0 -> 68 in 20 iterations at alpha = 1); as a loss term alone (DPOK)
the score-function part misses the future KL terms: biased (exact dJ/dtheta -22.73 on a linear-Gaussian chain,
that estimator -13.45 +- 0.02). So both, as eq. 23 writes the penalty with u(t, x_t; theta):

    grad J = E[sum_k grad log pi(a_k|x_k) A~_k]  -  alpha E[sum_k grad_theta KL_k(theta)]

    A~:           GAE of the rewards r_k - alpha KL_k(delta_behaviour)  (`KLPenaltyConnector`, before GAE; delta from the
                  batch's ACTION_DIST_INPUTS)                            -> -22.75 +- 0.04 on that chain
    direct term:  loss += (alpha / sigma_A) * mean_k KL_k(delta_theta)   (`KLLossScaleConnector` after GAE: sigma_A =
                  std of the raw advantages; RLlib's GAE standardises advantages, so dividing by it keeps alpha the
                  same trade-off between reward and KL as in J)

`kl_mode: loss` (the DPOK partial gradient) was removed for that bias; `kl_mode: reward` is the only mode.
gamma = 1, entropy_coeff = 0 (the std is fixed), use_kl_loss = False (PPO's own KL is old-vs-new policy, not the KL to
the pretrained model), normalize_actions = False (the action space is unbounded).

Layout as RLlib's `algorithms/ppo/`: `PPOKLOptions` (config) -> `PPOKLLearner` (learner: connectors, loss term) ->
`DriftPolicyModule` (module) -> `KLPenaltyConnector` (relabelling). `PPOKL` is the `rlft.learners.Learner` registered
as ``learner: {type: ppo_kl}``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ray.rllib.algorithms.ppo import PPOConfig
from ray.rllib.algorithms.ppo.torch.ppo_torch_learner import PPOTorchLearner
from ray.rllib.connectors.common.numpy_to_tensor import NumpyToTensor
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.rl_module import RLModuleSpec

from rlft.conditions import conditions_of
from rlft.config import ConfigError, TaskConfig, model_config_to_dict
from rlft.models.base import DiffusionModel
from rlft.rewards.base import Reward
from rlft.rllib.adapter import EnvSpec, PPOOptions, RLlibLearner
from rlft.rllib.connectors import KLLossScaleConnector, KLPenaltyConnector, kl_from_dist_inputs
from rlft.rllib.env_runner import env_class
from rlft.rllib.keys import ALPHA, KL_LOSS_COEFF, KL_TO_PRETRAINED, LORA, MODEL
from rlft.rllib.modules import (
    MEAN_SCALES, DriftPolicyModule, LoRAUNetPolicyModule, drift_control, drift_model_config, drift_spaces,
)
from rlft.sampling import Control

#: why `kl_mode: loss` is gone (the ConfigError a config naming it gets)
KL_MODE_LOSS_REMOVED = (
    "learner.kl_mode 'loss' was removed: it is DPOK's partial gradient, which drops the future KL terms from the "
    "reward-to-go and is biased (MATH.md §5b: -13.45 +- 0.02 against the exact dJ/dtheta = -22.73 on a linear-Gaussian "
    "chain); use kl_mode: reward (the default, unbiased: -22.75 +- 0.04)"
)


@dataclass(frozen=True)
class PPOKLOptions(PPOOptions):
    """PPO + KL to the pretrained model (`learner: {type: ppo_kl, ...}`); the KL weight is the task's alpha."""

    lr: float = 1e-3
    """Adam learning rate of the policy and value networks."""
    kl_mode: str = "reward"
    """How the KL enters: "reward" (eq. 22-23: a reward penalty before GAE plus the direct term), the only mode."""
    mean_scale: Literal["std", "variance", "one"] = "std"
    """delta_k = c_k * net with c_k = s_k ("std"), s_k^2 ("variance") or 1 ("one") (`rlft.rllib.modules`)."""
    policy: Literal["mlp", "lora"] = "mlp"
    """"mlp" (`DriftPolicyModule`) or "lora" (a LoRA on the task's diffusers UNet; model.type must be diffusers)."""
    lora_rank: int = 4
    """Rank of the LoRA adapter (policy "lora")."""

    def __post_init__(self) -> None:
        if self.kl_mode == "loss":
            raise ConfigError(KL_MODE_LOSS_REMOVED)
        if self.kl_mode != "reward":
            raise ConfigError(f"learner.kl_mode must be 'reward' (got {self.kl_mode!r}); leave it out (reward is the default)")
        if self.mean_scale not in MEAN_SCALES:
            raise ConfigError(f"learner.mean_scale must be one of {list(MEAN_SCALES)} (got {self.mean_scale!r})")
        if self.lora_rank < 1:
            raise ConfigError(f"learner.lora_rank must be >= 1 (got {self.lora_rank}); use e.g. lora_rank: 4")
        super().__post_init__()
        from envs.drift import DenoisingDriftEnv

        if not issubclass(env_class(self.env), DenoisingDriftEnv):
            raise ConfigError(
                f"learner.env {self.env!r} is a {env_class(self.env).__name__}; ppo_kl needs a drift env (the action is the "
                "displacement a_k, so the KL to the pretrained model is closed-form): use env: drift or an id whose batched "
                "class subclasses envs.DenoisingDriftEnv")


class PPOKLLearner(PPOTorchLearner):
    """PPO's torch learner plus the KL to the pretrained model (reward penalty and direct loss term, module doc)."""

    def build(self) -> None:
        super().build()  # prepends AddOneTsToEpisodesAndTruncate, appends GAE
        alpha = float(self.config.learner_config_dict.get(ALPHA, 0.0))
        if self._learner_connector is not None and alpha > 0:
            self._learner_connector.insert_after(NumpyToTensor, KLPenaltyConnector(alpha=alpha))
            self._learner_connector.append(KLLossScaleConnector(alpha=alpha))  # after GAE: the direct term's scale

    def compute_loss_for_module(self, *, module_id, config, batch, fwd_out):
        loss = super().compute_loss_for_module(module_id=module_id, config=config, batch=batch, fwd_out=fwd_out)
        if not isinstance(self.module[module_id].unwrapped(), DriftPolicyModule):
            return loss
        kl = kl_from_dist_inputs(fwd_out[Columns.ACTION_DIST_INPUTS])  # (N,) of the current policy
        mask = batch[Columns.LOSS_MASK]
        kl_mean = kl[mask].sum() / mask.sum().clamp_min(1)
        self.metrics.log_value((module_id, KL_TO_PRETRAINED), kl_mean.detach(), window=1)
        if KL_LOSS_COEFF in batch:  # the direct gradient of alpha * KL_k(theta) (eq. 23)
            loss = loss + (batch[KL_LOSS_COEFF] * kl)[mask].sum() / mask.sum().clamp_min(1)
        return loss


class PPOKL(RLlibLearner):
    """PPO + KL penalty (ELEGANT App. E.3) on a drift env, as ``learner: {type: ppo_kl, ...}`` (`PPOKLOptions`).

    With the defaults (256 trajectories per iteration) it closes >= 70 % of the gap to J* on the 2-D Gaussian-mixture
    tasks at alpha = 1 within 3-4 iterations (a few seconds of training on 2 CPU cores) and ~93 % after 60
    (`rlft bench rllib`).
    """

    Options = PPOKLOptions

    def __init__(self, task: TaskConfig, model: DiffusionModel, reward: Reward, options: PPOKLOptions | None = None) -> None:
        super().__init__(task, model, reward, options)
        o = self.options
        extra = {}
        self.module_class = DriftPolicyModule
        if o.policy == "lora":
            if getattr(task.model, "type", None) != "diffusers":
                raise ConfigError(f"learner.policy 'lora' needs model.type diffusers (got {getattr(task.model, 'type', None)!r}); "
                                  "use policy: mlp for other models")
            extra = {MODEL: model_config_to_dict(task.model), LORA: {"rank": int(o.lora_rank)}}
            self.module_class = LoRAUNetPolicyModule
        self.model_config = drift_model_config([model.std(k) for k in range(model.num_steps)], hidden=o.hidden,
                                               num_layers=o.num_layers, mean_scale=o.mean_scale, **extra)
        self.conditions = conditions_of(task)  # a conditional task: the env draws training conditions into the obs
        self.env = EnvSpec.of(o.env, task, model, **({"conditions": task.conditions} if self.conditions is not None else {}))
        self.build()
        obs_space, act_space = drift_spaces(model, self.conditions)
        self._control_module = self.module_class(observation_space=obs_space, action_space=act_space, inference_only=True,
                                                 model_config=self.model_config)

    def build_config(self) -> PPOConfig:
        config = self.base_config(PPOConfig(), self.env, self.model.num_steps)
        config.rl_module(rl_module_spec=RLModuleSpec(module_class=self.module_class, model_config=self.model_config))
        config.learners(learner_class=PPOKLLearner, learner_config_dict={ALPHA: self.task.alpha})
        return config

    def control(self) -> Control:
        self._control_module.set_state(self.module_state())
        return drift_control(self._control_module, self.model.num_steps)
