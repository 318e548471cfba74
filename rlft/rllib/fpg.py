"""f-policy-gradient (f-PG): fine-tune from target samples alone through a discriminator (Agarwal et al. 2023;
BOOST §4.2, Alg. 6, eq. 4.7-4.8; MATH.md §5), on a drift env or a restart env.

Minimise D_f(p_pi || p_*) over state-visitation distributions. With D_f(p || q) = E_q[f(p/q)] (`rlft.divergences`),

    grad D_f(p_pi || p_*) = E_pi[ sum_t grad log pi(a_t|s_t) * sum_t f'(p_pi(s_t) / p_*(s_t)) ]            (eq. 4.7)

so PPO (eq. 4.8: clipped importance ratio) ascends the return of the per-step reward r_t = -f'(ratio(s_{t+1})).
The ratio comes from a discriminator trained by logistic loss on agent states (label 1) against expert states
(label 0): D = sigmoid(logit) -> D / (1 - D) = p_pi / p_* at the optimum, so ratio = exp(logit) ("logit form",
clipped to |logit| <= logit_clip). Expert states: target samples diffused by the model's forward kernel to the
level of each agent state (drift env: level k of x_k; restart env: the current noise level), so the
discriminator compares p_pi(x | level) with p_*(x | level) at the levels the agent visits. The target samples
(`rlft.rllib.expert`, `learner.expert`): the exact tilted target where the task has one, otherwise ("snis", any
reward) pretrained samples resampled with weights exp(r/alpha), refused when their effective sample size is too small.

Names: f-PG's f is `fpg_divergence`, the distance of the policy to the TARGET p_* (known by samples). It is not
rlft's `divergence` (ELEGANT, the f_regularised reward), which is the regulariser D_f(p || p_pre) to the PRETRAINED
model; f-PG can add that regulariser's KL form too (`kl_penalty: true`, with the task's alpha, as PPO+KL).

Each iteration (`FPG.training_step`, the override): sample -> `num_disc_updates` discriminator steps on the sampled
states (every Learner, `foreach_learner`) -> PPO update whose rewards `rlft.rllib.connectors.FPGRewardConnector` has
relabelled (before GAE) -> weight sync. The discriminator is a second, learner-only RLModule
(`rlft.rllib.modules.DiscriminatorModule`): checkpointed with the algorithm, its own Adam, never shipped to
EnvRunners. Restart-specific reward shaping lives in `rlft.rllib.restart`.

`FPGLearnerAdapter` is the `rlft.learners.Learner` registered as ``learner: {type: fpg, env: drift | restart | ID}``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from ray.rllib.algorithms.ppo import PPO, PPOConfig
from ray.rllib.connectors.common.numpy_to_tensor import NumpyToTensor
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.multi_rl_module import MultiRLModuleSpec
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.execution.rollout_ops import synchronous_parallel_sample
from ray.rllib.utils.metrics import (
    ALL_MODULES, ENV_RUNNER_RESULTS, ENV_RUNNER_SAMPLING_TIMER, LEARNER_RESULTS, LEARNER_UPDATE_TIMER,
    NUM_ENV_STEPS_SAMPLED_LIFETIME, NUM_MODULE_STEPS_TRAINED_LIFETIME, SYNCH_WORKER_WEIGHTS_TIMER, TIMERS,
)

from rlft.config import ConfigError, TaskConfig
from rlft.divergences import get_divergence
from rlft.models.base import DiffusionModel
from rlft.rewards.base import Reward
from rlft.rllib.adapter import EnvSpec, PPOOptions, RLlibLearner
from rlft.rllib.connectors import FPGRewardConnector, FPGRewardSpec, level_of
from rlft.rllib.expert import (  # noqa: F401  (ExpertStates, level_kernels, expert_samples: f-PG's public names)
    EXPERT_ESS, EXPERT_TYPES, SNIS_MIN_ESS, SNIS_PRETRAINED_SAMPLES, ExpertStates, build_expert, expert_samples,
    level_kernels,
)
from rlft.rllib.keys import (
    ALPHA, CENTER, DISC_ACCURACY, DISC_BATCH_SIZE, DISC_LOSS, DISCRIMINATOR, EVENT_DIM, EXPERT_DATA,
    EXPERT_ENERGY_DISTANCE, FPG_COEFF, FPG_DIVERGENCE, HIDDEN, INIT_DENOISE_PROB, KERNEL_SCALES, KERNEL_STDS, LOGIT_CLIP,
    LOGITS, NFE_COST, NUM_DISC_UPDATES, NUM_LAYERS, NUM_STEPS, SEED, SHAPING, SHAPING_COEFF,
)
from rlft.rllib.modules import (
    DiscriminatorModule, DriftPolicyModule, RestartPolicyModule, drift_control, drift_model_config, drift_spaces,
    restart_spaces,
)
from rlft.rllib.ppo_kl import PPOKLLearner
from rlft.rllib.restart import SHAPINGS
from rlft.sampling import Control

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class FPGOptions(PPOOptions):
    """f-PG (`learner: {type: fpg, ...}`): PPO on -f'(p_pi / p_*) rewards from a discriminator against expert samples."""

    lr: float = 3e-4
    """Adam learning rate of the policy and value networks."""
    fpg_divergence: str = "kl"
    """f of D_f(p_pi || p_*), the distance to the target (`rlft.divergences.get_divergence`: kl, js, chi2, gamma:0.5, ...)."""
    expert: str | dict[str, Any] | None = None
    """Where the target samples come from (`expert_samples`): "exact" (the exact tilted target: Gaussian-mixture models
    with a linear/quadratic reward), "snis" (pretrained samples resampled with weights exp(r/alpha): any reward),
    {type: gmm, weights, means, stds} or {type: file, path}; default "exact" where the task has one, else "snis"."""
    num_expert_samples: int = 20000
    """Size of the expert set."""
    expert_samples: int = SNIS_PRETRAINED_SAMPLES
    """"snis": pretrained samples drawn and weighted by exp(r/alpha) (the effective sample size grows with it)."""
    min_expert_ess: float = SNIS_MIN_ESS
    """"snis": the smallest effective sample size accepted as a target (fewer: a ConfigError with the fix)."""
    fpg_coeff: float = 1.0
    """Reward scale: r = fpg_coeff * -f'(exp(clip(logit)))."""
    logit_clip: float = 5.0
    """|logit| is clipped to this before exp (bounds the ratio)."""
    center_reward: bool | None = None
    """Use -(f'(ratio) - f'(1)) (`fpg_reward`); default True on drift envs, False on restart envs."""
    num_disc_updates: int = 50
    """Discriminator steps per iteration."""
    disc_batch_size: int = 512
    """Agent and expert states per discriminator step (each)."""
    disc_lr: float = 1e-3
    """Adam learning rate of the discriminator."""
    disc_hidden: int = 64
    """Width of the discriminator MLP."""
    disc_num_layers: int = 2
    """Hidden layers of the discriminator MLP."""
    kl_penalty: bool = False
    """Also penalise the KL to the pretrained model with the task's alpha, as PPO+KL does (drift envs)."""
    shaping: Literal["none", "terminal", "time_weighted", "level_aware"] | None = None
    """How -f' becomes a reward (`rlft.rllib.restart`); default "none" on drift envs, "terminal" on restart envs."""
    shaping_coeff: float = 1.0
    """Weight of the time cost ("time_weighted") or of the per-level term ("level_aware")."""
    nfe_cost: float = 0.0
    """Restart envs: cost per effective NOISE action (each adds one network evaluation)."""
    budget: int | None = None
    """Restart envs: RL steps per episode L (>= num_steps; default 2 num_steps)."""
    init_denoise_prob: float = 0.5
    """Restart envs: the untrained policy's P(DENOISE)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            get_divergence(self.fpg_divergence)
        except ValueError as err:
            raise ConfigError(f"learner.fpg_divergence: {err}") from None
        for name in ("fpg_coeff", "logit_clip", "disc_lr"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"learner.{name} must be > 0 (got {getattr(self, name)}); use e.g. {name}: {getattr(FPGOptions, name)}")
        for name in ("num_expert_samples", "expert_samples", "disc_batch_size", "disc_hidden", "disc_num_layers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"learner.{name} must be >= 1 (got {getattr(self, name)}); use e.g. {name}: {getattr(FPGOptions, name)}")
        if not self.min_expert_ess >= 1:
            raise ConfigError(f"learner.min_expert_ess must be >= 1 (got {self.min_expert_ess}); use e.g. min_expert_ess: 200")
        kind = self.expert if self.expert is None or isinstance(self.expert, str) else self.expert.get("type")
        if kind is not None and kind not in EXPERT_TYPES:
            raise ConfigError(f"learner.expert must be one of {list(EXPERT_TYPES)} or a mapping with such a type "
                              f"(got {kind!r}); leave it out for exact where the task has an exact target, else snis")
        if self.num_disc_updates < 0:
            raise ConfigError(f"learner.num_disc_updates must be >= 0 (got {self.num_disc_updates}); use e.g. 50")
        if self.nfe_cost < 0:
            raise ConfigError(f"learner.nfe_cost must be >= 0 (got {self.nfe_cost}); use 0 for no NFE cost")
        if not 0.0 < self.init_denoise_prob < 1.0:
            raise ConfigError(f"learner.init_denoise_prob must be in (0, 1) (got {self.init_denoise_prob}); use e.g. 0.5")
        if self.shaping is not None and self.shaping not in SHAPINGS:
            raise ConfigError(f"learner.shaping must be one of {list(SHAPINGS)} (got {self.shaping!r})")


# -- the RLlib learner and algorithm ----------------------------------------------------------------------------


def reward_spec(cfg: dict[str, Any]) -> FPGRewardSpec:
    """The reward connector's settings from a learner_config_dict (`FPGLearnerAdapter` writes it)."""
    return FPGRewardSpec(cfg[FPG_DIVERGENCE], cfg[FPG_COEFF], cfg[LOGIT_CLIP], cfg[CENTER], cfg[EVENT_DIM], cfg[NUM_STEPS],
                         cfg[SHAPING], cfg[SHAPING_COEFF], cfg[NFE_COST])


class FPGLearner(PPOKLLearner):
    """PPO(+KL) learner with the f-PG reward connector and the discriminator's update."""

    def build(self) -> None:
        super().build()
        cfg = self.config.learner_config_dict
        self.expert = ExpertStates(torch.as_tensor(np.asarray(cfg[EXPERT_DATA], dtype=np.float32)), cfg[KERNEL_SCALES], cfg[KERNEL_STDS])
        self._disc_generator = torch.Generator().manual_seed(int(cfg.get(SEED, 0)))
        if self._learner_connector is not None:  # first after NumpyToTensor: it replaces the rewards (KL comes after)
            self._learner_connector.insert_after(NumpyToTensor, FPGRewardConnector(spec=reward_spec(cfg)))

    def update_discriminator(self, agent_obs: np.ndarray) -> dict[str, float]:
        """`num_disc_updates` logistic-regression steps: agent states (label 1) vs expert states at the same levels."""
        cfg = self.config.learner_config_dict
        disc, opt = self.module[DISCRIMINATOR], self.get_optimizer(DISCRIMINATOR)
        agent = torch.as_tensor(agent_obs, dtype=torch.float32)
        D, K, n = int(cfg[EVENT_DIM]), int(cfg[NUM_STEPS]), int(cfg[DISC_BATCH_SIZE])
        losses, accs = [], []
        for _ in range(int(cfg[NUM_DISC_UPDATES])):
            a = agent[torch.randint(0, agent.shape[0], (n,), generator=self._disc_generator)]
            levels = level_of(agent[torch.randint(0, agent.shape[0], (n,), generator=self._disc_generator)], D, K)
            e = torch.zeros_like(a)
            e[:, :D] = self.expert.sample(levels, self._disc_generator)
            e[:, D] = levels.float() / K
            a, e = a.to(self._device), e.to(self._device)
            la, le = disc({Columns.OBS: a})[LOGITS], disc({Columns.OBS: e})[LOGITS]  # __call__: DDP-safe
            loss = F.binary_cross_entropy_with_logits(la, torch.ones_like(la)) + F.binary_cross_entropy_with_logits(le, torch.zeros_like(le))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            accs.append(0.5 * float((la > 0).float().mean() + (le < 0).float().mean()))
        return {DISC_LOSS: float(np.mean(losses)), DISC_ACCURACY: float(np.mean(accs))}


class FPGConfig(PPOConfig):
    """PPOConfig whose algorithm is `FPG` and whose default learner is `FPGLearner`."""

    def __init__(self, algo_class=None) -> None:
        super().__init__(algo_class=algo_class or FPG)

    def get_default_learner_class(self):
        return FPGLearner


class FPG(PPO):
    """PPO with the f-PG discriminator phase between sampling and the policy update (`training_step` override)."""

    @classmethod
    def get_default_config(cls) -> FPGConfig:
        return FPGConfig()

    def training_step(self) -> None:
        with self.metrics.log_time((TIMERS, ENV_RUNNER_SAMPLING_TIMER)):
            episodes, env_runner_results = synchronous_parallel_sample(
                worker_set=self.env_runner_group, max_env_steps=self.config.total_train_batch_size,
                sample_timeout_s=self.config.sample_timeout_s, _uses_new_env_runners=True, _return_metrics=True,
            )
            if not episodes:
                return
            self.metrics.aggregate(env_runner_results, key=ENV_RUNNER_RESULTS)
        # (1) discriminator: the states s_1..s_L each episode visited (s_0 is the prior for agent and expert alike)
        agent_obs = np.concatenate([np.asarray(e.get_observations())[1:] for e in episodes]).astype(np.float32)
        results = self.learner_group.foreach_learner(lambda learner, _o=agent_obs: learner.update_discriminator(_o))
        values = [r.get() for r in results]
        for key in (DISC_LOSS, DISC_ACCURACY):
            self.metrics.log_value((LEARNER_RESULTS, DISCRIMINATOR, key), float(np.mean([v[key] for v in values])), window=1)
        # (2) policy: PPO on the relabelled rewards
        with self.metrics.log_time((TIMERS, LEARNER_UPDATE_TIMER)):
            learner_results = self.learner_group.update(
                episodes=episodes,
                timesteps={
                    NUM_ENV_STEPS_SAMPLED_LIFETIME: self.metrics.peek((ENV_RUNNER_RESULTS, NUM_ENV_STEPS_SAMPLED_LIFETIME)),
                    NUM_MODULE_STEPS_TRAINED_LIFETIME: self.metrics.peek(
                        (LEARNER_RESULTS, ALL_MODULES, NUM_MODULE_STEPS_TRAINED_LIFETIME), default=0),
                },
                num_epochs=self.config.num_epochs, minibatch_size=self.config.minibatch_size,
                shuffle_batch_per_epoch=self.config.shuffle_batch_per_epoch,
            )
            self.metrics.aggregate(learner_results, key=LEARNER_RESULTS)
        # (3) weights to the EnvRunners (the policy only: the discriminator is learner-only)
        with self.metrics.log_time((TIMERS, SYNCH_WORKER_WEIGHTS_TIMER)):
            self.env_runner_group.sync_weights(
                from_worker_or_learner_group=self.learner_group, policies=[DEFAULT_MODULE_ID], inference_only=True
            )


# -- the Learner-protocol adapter -------------------------------------------------------------------------------


class FPGLearnerAdapter(RLlibLearner):
    """f-PG as ``learner: {type: fpg, env: drift | restart | ID, fpg_divergence: kl, expert: exact | snis, ...}``.

    Drift envs: the drift policy (`DriftPolicyModule`) learns delta so the chain's states match the expert's at every
    level; `control()` gives the fine-tuned sampler. Restart envs: f-Restart (BOOST Alg. 7) with the reward shaping
    of `rlft.rllib.restart`; `control()` is None (restart changes which steps run, not the transitions) and
    `evaluate()` reports the learned sampler's quality, NFE and action statistics.
    """

    Options = FPGOptions

    def __init__(self, task: TaskConfig, model: DiffusionModel, reward: Reward, options: FPGOptions | None = None) -> None:
        super().__init__(task, model, reward, options)
        from envs.restart import RestartEnv

        o = self.options
        self.restart = issubclass(self.env_class, RestartEnv)
        self.budget = o.budget if o.budget is not None else 2 * model.num_steps
        if self.restart and self.budget < model.num_steps:
            raise ConfigError(f"learner.budget must be >= num_steps = {model.num_steps} (got {self.budget}); "
                              "leave it out for 2 num_steps")
        if o.kl_penalty and self.restart:
            raise ConfigError("learner.kl_penalty needs a drift env (the KL to the pretrained model is over displacements); "
                              "set kl_penalty: false on a restart env")
        self.expert_x, self.expert_figures = build_expert(o, task, model, reward, task.seed + 7)
        if self.expert_figures:
            log.info("f-PG snis expert: ESS %.1f of %d pretrained samples", self.expert_figures[EXPERT_ESS], o.expert_samples)
        scales, stds = level_kernels(model)
        shaping = o.shaping or ("terminal" if self.restart else "none")
        self.settings = {
            FPG_DIVERGENCE: o.fpg_divergence, FPG_COEFF: o.fpg_coeff, LOGIT_CLIP: o.logit_clip,
            CENTER: (not self.restart) if o.center_reward is None else bool(o.center_reward),
            NUM_DISC_UPDATES: o.num_disc_updates, DISC_BATCH_SIZE: o.disc_batch_size, EVENT_DIM: model.event_dim,
            NUM_STEPS: model.num_steps, SHAPING: shaping, SHAPING_COEFF: o.shaping_coeff, NFE_COST: o.nfe_cost,
            EXPERT_DATA: self.expert_x.numpy(), KERNEL_SCALES: scales, KERNEL_STDS: stds,
            ALPHA: task.alpha if o.kl_penalty else 0.0, SEED: task.seed,
        }
        self.disc_config = {EVENT_DIM: model.event_dim, HIDDEN: o.disc_hidden, NUM_LAYERS: o.disc_num_layers}
        if self.restart:
            self.model_config = {EVENT_DIM: model.event_dim, HIDDEN: o.hidden, NUM_LAYERS: o.num_layers,
                                 INIT_DENOISE_PROB: o.init_denoise_prob}
            self.env = EnvSpec.of(o.env, task, model, budget=self.budget)
        else:
            self.model_config = drift_model_config([model.std(k) for k in range(model.num_steps)], hidden=o.hidden,
                                                   num_layers=o.num_layers)
            self.env = EnvSpec.of(o.env, task, model)
        self.build()
        self._local_policy = None

    def build_config(self) -> FPGConfig:
        # restart episodes end before the budget: size the batch by rounds of K steps, not by L
        config = self.base_config(FPGConfig(), self.env, self.model.num_steps)
        module_cls = RestartPolicyModule if self.restart else DriftPolicyModule
        config.rl_module(
            rl_module_spec=MultiRLModuleSpec(rl_module_specs={
                DEFAULT_MODULE_ID: RLModuleSpec(module_class=module_cls, model_config=self.model_config),
                DISCRIMINATOR: RLModuleSpec(module_class=DiscriminatorModule, model_config=self.disc_config, learner_only=True),
            }),
            algorithm_config_overrides_per_module={DISCRIMINATOR: PPOConfig.overrides(lr=self.options.disc_lr)},
        )
        config.learners(learner_class=FPGLearner, learner_config_dict=self.settings)
        return config

    def train_iteration(self) -> dict[str, float]:
        out = super().train_iteration()
        self.reward_queries -= int(out.get("episodes", 0))  # f-PG queries no reward, it only reads expert samples
        disc = self.last_result.get("learners", {}).get(DISCRIMINATOR, {})
        out.update({k: float(disc[k]) for k in (DISC_LOSS, DISC_ACCURACY) if k in disc})
        return out

    def policy_module(self):
        """A local inference copy of the current policy module (weights from the Learner)."""
        if self._local_policy is None:
            if self.restart:
                (obs_space, act_space), cls = restart_spaces(self.model), RestartPolicyModule
            else:
                (obs_space, act_space), cls = drift_spaces(self.model), DriftPolicyModule
            self._local_policy = cls(observation_space=obs_space, action_space=act_space, inference_only=True,
                                     model_config=self.model_config)
        self._local_policy.set_state(self.module_state())
        return self._local_policy

    def control(self) -> Control | None:
        if self.restart:
            return None
        return drift_control(self.policy_module(), self.model.num_steps)

    def evaluate(self, num_samples: int = 2000, seed: int | None = None, progress: bool = False) -> dict[str, Any]:
        out = super().evaluate(num_samples=num_samples, seed=seed, progress=progress)
        import rlft.metrics as metrics

        seed = self.task.seed + 1 if seed is None else seed
        if self.restart:
            from rlft.rllib.restart import policy_restart_sample

            res = policy_restart_sample(self.model, self.policy_module(), num_samples, self.budget, seed=seed)
            out.update(res.figures())
            x = res.x
        else:
            from rlft.sampling import sample

            x = sample(self.model, num_samples, control=self.control(), seed=seed, progress=progress).x
        out[EXPERT_ENERGY_DISTANCE] = metrics.energy_distance(x.double(), self.expert_x[:num_samples].double())
        out.update(self.expert_figures)
        return out
