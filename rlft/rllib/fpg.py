"""f-policy-gradient (f-PG): fine-tune from target samples alone through a discriminator (Agarwal et al. 2023;
BOOST §4.2, Alg. 6, eq. 4.7-4.8; MATH.md §5), on the drift env and the restart env.

Minimise D_f(p_pi || p_*) over state-visitation distributions. With D_f(p || q) = E_q[f(p/q)] (`rlft.divergences`),

    grad D_f(p_pi || p_*) = E_pi[ sum_t grad log pi(a_t|s_t) * sum_t f'(p_pi(s_t) / p_*(s_t)) ]            (eq. 4.7)

so PPO (eq. 4.8: clipped importance ratio) ascends the return of the per-step reward r_t = -f'(ratio(s_{t+1})).
The ratio comes from a discriminator trained by logistic loss on agent states (label 1) against expert states
(label 0): D = sigmoid(logit) -> D / (1 - D) = p_pi / p_* at the optimum, so ratio = exp(logit) ("logit form",
clipped to |logit| <= logit_clip). Expert states: target samples diffused by the model's forward kernel to the
level of each agent state (drift env: level k of x_k; restart env: the current noise level), so the
discriminator compares p_pi(x | level) with p_*(x | level) at the levels the agent visits.

Each iteration (`FPG.training_step`, the override): sample -> `num_disc_updates` discriminator steps on the sampled
states (every Learner, `foreach_learner`) -> PPO update whose rewards `FPGRewardConnector` has relabelled (batch
level, before GAE; the state after step t is the batch's next row, the extra bootstrap row included) -> weight sync.
The discriminator is a second, learner-only RLModule: checkpointed with the algorithm, its own Adam, never shipped to
EnvRunners. Restart-specific reward shaping lives in `rlft.rllib.restart`.

`FPGLearnerAdapter` is the `rlft.learners.Learner` registered as ``learner: {type: fpg, env: drift | restart}``.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from ray.rllib.algorithms.ppo import PPO, PPOConfig
from ray.rllib.connectors.common.numpy_to_tensor import NumpyToTensor
from ray.rllib.connectors.connector_v2 import ConnectorV2
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.multi_rl_module import MultiRLModuleSpec
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.core.rl_module.torch.torch_rl_module import TorchRLModule
from ray.rllib.execution.rollout_ops import synchronous_parallel_sample
from ray.rllib.utils.metrics import (
    ALL_MODULES, ENV_RUNNER_RESULTS, ENV_RUNNER_SAMPLING_TIMER, LEARNER_RESULTS, LEARNER_UPDATE_TIMER,
    NUM_ENV_STEPS_SAMPLED_LIFETIME, NUM_MODULE_STEPS_TRAINED_LIFETIME, SYNCH_WORKER_WEIGHTS_TIMER, TIMERS,
)

from rlft.config import ConfigError, TaskConfig
from rlft.divergences import get_divergence
from rlft.learners import register_learner
from rlft.models.base import DiffusionModel
from rlft.rewards.base import Reward
from rlft.rllib.env_runner import DRIFT_ENV, RESTART_ENV
from rlft.rllib.module import DriftPolicyModule, RestartPolicyModule, drift_control, drift_model_config, mlp, time_features
from rlft.rllib.ppo_kl import ALPHA, KL_MODE, PPOKLLearner, RLlibLearner, drift_spaces, task_mapping
from rlft.sampling import Control

DISCRIMINATOR = "discriminator"
#: learner_config_dict keys (constants, STYLE.md)
DIVERGENCE, FPG_COEFF, LOGIT_CLIP = "divergence", "fpg_coeff", "logit_clip"
NUM_DISC_UPDATES, DISC_BATCH_SIZE = "num_disc_updates", "disc_batch_size"
EXPERT_DATA, KERNEL_SCALES, KERNEL_STDS = "expert_data", "kernel_scales", "kernel_stds"
EVENT_DIM, NUM_STEPS, SHAPING, SHAPING_COEFF, NFE_COST = "event_dim", "num_steps", "shaping", "shaping_coeff", "nfe_cost"
CENTER = "center_reward"
#: metric keys
DISC_LOSS, DISC_ACCURACY, FPG_REWARD = "disc_loss", "disc_accuracy", "fpg_reward_mean"


def fpg_reward(logits: torch.Tensor, divergence: str, logit_clip: float, center: bool = False) -> torch.Tensor:
    """-f'(p_pi / p_*) with the ratio exp(logit) of a discriminator that labels agent states 1, shape of logits.

    center=True returns -(f'(ratio) - f'(1)): 0 where the agent matches the expert. For fixed-length episodes (drift
    env) the shift is a constant return offset, so the policy gradient is unchanged and the value net fits returns
    near 0 instead of -K f'(1); for variable-length episodes (restart env) it changes the optimum (see restart.py).
    """
    div = get_divergence(divergence)
    ratio = torch.exp(logits.clamp(-logit_clip, logit_clip))
    out = -div.f_prime(ratio)
    if center:
        out = out + div.f_prime(torch.ones((), dtype=ratio.dtype, device=ratio.device))
    return out


def level_of(obs: torch.Tensor, event_dim: int, num_steps: int) -> torch.Tensor:
    """The noise level (drift: step k; restart: level l) from an observation's column D = level / K, (B,)."""
    return torch.round(obs[:, event_dim] * num_steps).long().clamp(0, num_steps)


class ExpertStates:
    """Target samples diffused to any level: x_l = scale_l x_data + std_l eps (forward kernel from level K)."""

    def __init__(self, data: torch.Tensor, scales: list[float], stds: list[float]) -> None:
        self.data = data.float()  # (N, D)
        self.scales = torch.as_tensor(scales, dtype=torch.float32)  # (K+1,)
        self.stds = torch.as_tensor(stds, dtype=torch.float32)  # (K+1,)

    def sample(self, levels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(n, D) expert states at the given levels (n,)."""
        idx = torch.randint(0, self.data.shape[0], (levels.shape[0],), generator=generator)
        noise = torch.randn((levels.shape[0], self.data.shape[1]), generator=generator)
        return self.scales[levels, None] * self.data[idx] + self.stds[levels, None] * noise


def level_kernels(model: DiffusionModel) -> tuple[list[float], list[float]]:
    """(scale_l, std_l) of the forward kernel from level K (data end) up to every level l = 0..K."""
    K = model.num_steps
    scales, stds = [1.0] * (K + 1), [0.0] * (K + 1)
    scale, var = 1.0, 0.0
    for level in range(K - 1, -1, -1):  # compose the adjacent kernels level+1 -> level
        s, sd = model.noise_kernel(level)
        scale, var = s * scale, s * s * var + sd * sd
        scales[level], stds[level] = scale, math.sqrt(var)
    return scales, stds


class DiscriminatorModule(TorchRLModule):
    """logit(x, level) of P(agent | state); learner-only (never on EnvRunners). model_config: event_dim, num_steps,
    hidden, num_layers, num_freqs. Inputs: x = obs[:, :D] and the time features of the level column obs[:, D]."""

    def setup(self) -> None:
        cfg = self.model_config
        self.event_dim, self.num_freqs = int(cfg[EVENT_DIM]), int(cfg.get("num_freqs", 4))
        self.net = mlp(self.event_dim + 1 + 2 * self.num_freqs, int(cfg.get("hidden", 64)), int(cfg.get("num_layers", 2)), 1)

    def _forward(self, batch: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        obs, D = batch[Columns.OBS], self.event_dim
        feats = torch.cat([obs[:, :D], time_features(obs[:, D : D + 1], self.num_freqs)], dim=-1)
        return {"logits": self.net(feats).squeeze(-1)}


class FPGRewardConnector(ConnectorV2):
    """Learner connector (batch level, before GAE): reward of step t = shaped -f'(ratio(s_{t+1})) (`rlft.rllib.restart`)."""

    def __init__(self, input_observation_space=None, input_action_space=None, *, settings: dict[str, Any], **kw: Any) -> None:
        super().__init__(input_observation_space, input_action_space, **kw)
        self.settings = settings

    def __call__(self, *, rl_module, batch, episodes, metrics=None, **kwargs):
        from rlft.rllib.restart import shape_rewards

        s = self.settings
        mb = batch.get(DEFAULT_MODULE_ID)
        if mb is None or Columns.OBS not in mb:
            return batch
        obs, mask = mb[Columns.OBS], mb[Columns.LOSS_MASK]
        with torch.no_grad():
            logits = rl_module[DISCRIMINATOR].forward_inference({Columns.OBS: obs})["logits"]
            g = fpg_reward(logits, s[DIVERGENCE], s[LOGIT_CLIP], s.get(CENTER, False))
        level = level_of(obs, s[EVENT_DIM], s[NUM_STEPS])
        g_next = torch.cat([g[1:], g.new_zeros(1)])  # row t's next state is row t+1 (episodes are contiguous rows)
        level_next = torch.cat([level[1:], level.new_zeros(1)])
        rewards = shape_rewards(
            s.get(SHAPING, "none"), g_next, level, level_next, mb[Columns.ACTIONS], mb[Columns.TERMINATEDS].bool(),
            mask, s[NUM_STEPS], s.get(SHAPING_COEFF, 0.0), s.get(NFE_COST, 0.0),
        )
        mb[Columns.REWARDS] = s[FPG_COEFF] * rewards * mask.float()
        if metrics is not None:
            metrics.log_value((DEFAULT_MODULE_ID, FPG_REWARD), float(g_next[mask].mean()), window=1)
        return batch


class FPGLearner(PPOKLLearner):
    """PPO(+KL) learner with the f-PG reward connector and the discriminator's update."""

    def build(self) -> None:
        super().build()
        cfg = self.config.learner_config_dict
        self.expert = ExpertStates(torch.as_tensor(np.asarray(cfg[EXPERT_DATA], dtype=np.float32)), cfg[KERNEL_SCALES], cfg[KERNEL_STDS])
        self._disc_generator = torch.Generator().manual_seed(int(cfg.get("seed", 0)))
        if self._learner_connector is not None:  # first after NumpyToTensor: it replaces the rewards (KL comes after)
            settings = {k: cfg[k] for k in (DIVERGENCE, FPG_COEFF, LOGIT_CLIP, CENTER, EVENT_DIM, NUM_STEPS, SHAPING, SHAPING_COEFF, NFE_COST)}
            self._learner_connector.insert_after(NumpyToTensor, FPGRewardConnector(settings=settings))

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
            la, le = disc({Columns.OBS: a})["logits"], disc({Columns.OBS: e})["logits"]  # __call__: DDP-safe
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


# -- expert samples -------------------------------------------------------------------------------------------


def expert_samples(spec: dict[str, Any], task: TaskConfig, model: DiffusionModel, reward: Reward, n: int, seed: int) -> torch.Tensor:
    """Samples of the target f-PG matches, (n, D) float32: the only access f-PG has to the target.

    spec: {type: target} (the task's exact tilted target, Gaussian-mixture models with linear/quadratic rewards),
    {type: gmm, weights, means, stds} (an explicit mixture, e.g. the true data of a model with a wrong score), or
    {type: file, path: X.npy} (an (N, D) array).
    """
    from rlft.models.gmm import GaussianMixture

    kind = spec.get("type")
    g = torch.Generator().manual_seed(seed)
    if kind == "target":
        if not hasattr(model, "exact_target") or getattr(reward, "exact_form", None) is None:
            raise ConfigError("learner.expert {type: target} needs a Gaussian-mixture model and a linear/quadratic reward; "
                              "give {type: file, path: samples.npy} or {type: gmm, ...} instead")
        x = model.exact_target(reward, task.alpha).mixture.sample(n, g)
    elif kind == "gmm":
        x = GaussianMixture.create(spec["weights"], spec["means"], spec["stds"]).sample(n, g)
    elif kind == "file":
        data = torch.as_tensor(np.load(spec["path"]), dtype=torch.float32).reshape(-1, model.event_dim)
        x = data[torch.randint(0, data.shape[0], (n,), generator=g)] if data.shape[0] > n else data
    else:
        raise ConfigError(f"learner.expert.type must be one of ['target', 'gmm', 'file'] (got {kind!r})")
    if x.reshape(x.shape[0], -1).shape[1] != model.event_dim:
        raise ConfigError(f"learner.expert samples have {x.reshape(x.shape[0], -1).shape[1]} numbers each; the model's "
                          f"samples have {model.event_dim}")
    return x.reshape(x.shape[0], -1).float()


# -- the Learner-protocol adapter -------------------------------------------------------------------------------


@register_learner("fpg")
class FPGLearnerAdapter(RLlibLearner):
    """f-PG as ``learner: {type: fpg, env: drift | restart, divergence: kl, expert: {type: target}, ...}``.

    env=drift: the drift policy (`DriftPolicyModule`) learns delta so the chain's states match the expert's at every
    level; `control()` gives the fine-tuned sampler. env=restart: f-Restart (BOOST Alg. 7) with the reward shaping of
    `rlft.rllib.restart`; `control()` is None (restart changes which steps run, not the transitions) and `evaluate()`
    reports the learned sampler's quality, NFE and action statistics.
    """

    def __init__(
        self,
        task: TaskConfig,
        model: DiffusionModel,
        reward: Reward,
        *,
        env: Literal["drift", "restart"] = "drift",
        divergence: str = "kl",
        expert: dict[str, Any] | None = None,
        num_expert_samples: int = 20000,
        fpg_coeff: float = 1.0,
        logit_clip: float = 5.0,
        num_disc_updates: int = 50,
        disc_batch_size: int = 512,
        disc_lr: float = 1e-3,
        kl_alpha: float = 0.0,
        center_reward: bool | None = None,
        shaping: Literal["none", "terminal", "time_weighted", "level_aware"] | None = None,
        shaping_coeff: float = 1.0,
        nfe_cost: float = 0.0,
        budget: int | None = None,
        init_denoise_prob: float = 0.5,
        episodes_per_iteration: int = 256,
        num_envs: int = 256,
        lr: float = 3e-4,
        num_epochs: int = 4,
        minibatch_size: int = 4096,
        clip_param: float = 0.2,
        lambda_: float = 0.95,
        hidden: int = 64,
        num_layers: int = 2,
        fast_env_runner: bool = True,
        trust_pickles: bool = False,
        save_rllib_checkpoint: bool = True,
    ) -> None:
        """
        Args:
            env: "drift" (fine-tune the transitions) or "restart" (learn when to re-noise; BOOST §4.3).
            divergence: f by name (`rlft.divergences.get_divergence`: kl, reverse_kl, forward_kl, js, chi2, ...).
            expert: where the target samples come from (`expert_samples`); default {type: target}.
            num_expert_samples: size of the expert set.
            fpg_coeff, logit_clip: reward = fpg_coeff * -f'(exp(clip(logit))).
            center_reward: use -(f'(ratio) - f'(1)) (`fpg_reward`); default True on the drift env, False on restart.
            num_disc_updates, disc_batch_size, disc_lr: the discriminator phase of every iteration.
            kl_alpha: optional KL-to-pretrained penalty (drift env, as PPO+KL); 0 = pure f-PG.
            shaping, shaping_coeff, nfe_cost, budget, init_denoise_prob: restart env (`rlft.rllib.restart`);
                shaping defaults to "none" on the drift env (every step) and "terminal" on the restart env.
            the rest: as `rlft.rllib.ppo_kl.PPOKL`.
        """
        super().__init__(task, model, reward, episodes_per_iteration=episodes_per_iteration, num_envs=num_envs,
                         fast_env_runner=fast_env_runner, trust_pickles=trust_pickles,
                         save_rllib_checkpoint=save_rllib_checkpoint)
        if env not in ("drift", "restart"):
            raise ConfigError(f"learner.env must be 'drift' or 'restart' (got {env!r})")
        try:
            get_divergence(divergence)
        except ValueError as err:
            raise ConfigError(f"learner.divergence: {err}") from None
        for name, value in (("fpg_coeff", fpg_coeff), ("logit_clip", logit_clip), ("disc_lr", disc_lr), ("lr", lr)):
            if not value > 0:
                raise ConfigError(f"learner.{name} must be > 0 (got {value})")
        if num_disc_updates < 0 or disc_batch_size < 1:
            raise ConfigError(f"learner.num_disc_updates must be >= 0 and disc_batch_size >= 1 (got {num_disc_updates}, {disc_batch_size})")
        if kl_alpha < 0 or nfe_cost < 0:
            raise ConfigError(f"learner.kl_alpha and learner.nfe_cost must be >= 0 (got {kl_alpha}, {nfe_cost})")
        self.env = env
        self.budget = budget if budget is not None else 2 * model.num_steps
        if env == "restart" and self.budget < model.num_steps:
            raise ConfigError(f"learner.budget must be >= num_steps = {model.num_steps} (got {self.budget})")
        shaping = shaping or ("none" if env == "drift" else "terminal")
        from rlft.rllib.restart import SHAPINGS

        if shaping not in SHAPINGS:
            raise ConfigError(f"learner.shaping must be one of {list(SHAPINGS)} (got {shaping!r})")
        self.expert_x = expert_samples(expert or {"type": "target"}, task, model, reward, num_expert_samples, task.seed + 7)
        scales, stds = level_kernels(model)
        self.settings = {
            DIVERGENCE: divergence, FPG_COEFF: fpg_coeff, LOGIT_CLIP: logit_clip, NUM_DISC_UPDATES: num_disc_updates,
            CENTER: (env == "drift") if center_reward is None else bool(center_reward),
            DISC_BATCH_SIZE: disc_batch_size, EVENT_DIM: model.event_dim, NUM_STEPS: model.num_steps,
            SHAPING: shaping, SHAPING_COEFF: shaping_coeff, NFE_COST: nfe_cost, EXPERT_DATA: self.expert_x.numpy(),
            KERNEL_SCALES: scales, KERNEL_STDS: stds, ALPHA: kl_alpha, KL_MODE: "reward", "seed": task.seed,
        }
        self.hyper = dict(lr=lr, num_epochs=num_epochs, minibatch_size=minibatch_size, clip_param=clip_param,
                          lambda_=lambda_, disc_lr=disc_lr, init_denoise_prob=init_denoise_prob)
        self.disc_config = {EVENT_DIM: model.event_dim, "hidden": 64, "num_layers": 2}
        if env == "drift":
            self.model_config = drift_model_config([model.std(k) for k in range(model.num_steps)], hidden=hidden, num_layers=num_layers)
        else:
            self.model_config = {EVENT_DIM: model.event_dim, "hidden": hidden, "num_layers": num_layers,
                                 "init_denoise_prob": init_denoise_prob}
        self.build()
        self._local_policy = None

    def build_config(self) -> FPGConfig:
        h = self.hyper
        if self.env == "drift":
            env_name, env_config, steps, module_cls = DRIFT_ENV, {"task": task_mapping(self.task)}, self.model.num_steps, DriftPolicyModule
        else:
            env_name, module_cls = RESTART_ENV, RestartPolicyModule
            env_config, steps = {"task": task_mapping(self.task), "budget": self.budget}, self.budget
        config = self.base_config(FPGConfig(), env_name, env_config, steps)
        if self.env == "restart":  # episodes end before the budget: size the batch by rounds, not by L
            config.train_batch_size_per_learner = max(1, self.episodes_per_iteration * self.model.num_steps // max(1, self.run.num_learners))
        config.rl_module(
            rl_module_spec=MultiRLModuleSpec(rl_module_specs={
                DEFAULT_MODULE_ID: RLModuleSpec(module_class=module_cls, model_config=self.model_config),
                DISCRIMINATOR: RLModuleSpec(module_class=DiscriminatorModule, model_config=self.disc_config, learner_only=True),
            }),
            algorithm_config_overrides_per_module={DISCRIMINATOR: PPOConfig.overrides(lr=h["disc_lr"])},
        )
        config.learners(learner_class=FPGLearner, learner_config_dict=self.settings)
        config.training(
            gamma=1.0, lambda_=h["lambda_"], lr=h["lr"], num_epochs=h["num_epochs"],
            minibatch_size=min(h["minibatch_size"], config.train_batch_size_per_learner), clip_param=h["clip_param"],
            entropy_coeff=0.0, use_kl_loss=False, vf_clip_param=1e8,
        )
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
            if self.env == "drift":
                obs_space, act_space = drift_spaces(self.model)
                cls = DriftPolicyModule
            else:
                import gymnasium as gym

                obs_space = gym.spaces.Box(-np.inf, np.inf, (self.model.event_dim + 3,), np.float32)
                act_space, cls = gym.spaces.Discrete(2), RestartPolicyModule
            self._local_policy = cls(observation_space=obs_space, action_space=act_space, inference_only=True,
                                     model_config=self.model_config)
        self._local_policy.set_state(self.module_state())
        return self._local_policy

    def control(self) -> Control | None:
        if self.env != "drift":
            return None
        return drift_control(self.policy_module(), self.model.num_steps)

    def evaluate(self, num_samples: int = 2000, seed: int | None = None, progress: bool = False) -> dict[str, Any]:
        out = super().evaluate(num_samples=num_samples, seed=seed, progress=progress)
        from rlft import metrics

        seed = self.task.seed + 1 if seed is None else seed
        if self.env == "restart":
            from rlft.rllib.restart import policy_restart_sample

            res = policy_restart_sample(self.model, self.policy_module(), num_samples, self.budget, seed=seed)
            out.update(res.figures())
            x = res.x
        else:
            from rlft.sampling import sample

            x = sample(self.model, num_samples, control=self.control(), seed=seed, progress=progress).x
        out["expert_energy_distance"] = metrics.energy_distance(x.double(), self.expert_x[:num_samples].double())
        return out
