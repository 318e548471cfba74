"""PPO with a KL penalty to the pretrained model on the drift env (ELEGANT App. E.3, eq. 22-23; DPOK; DDPO).

Objective (MATH.md §2, §5):  J = E[r(x_K)] - alpha * E[sum_k KL_k],   KL_k = |delta_k|^2 / (2 s_k^2)   (closed form,
`rlft.sampling.step_kl`, never a sample estimate). PPO's clipped surrogate (eq. 22) runs on the transition ratio
N(a; delta_theta, s_k^2) / N(a; delta_old, s_k^2) (`rlft.rllib.module.DriftPolicyModule`).

The closed-form KL_k is a function of the STATE x_k (and theta), not of the sampled action, so as a reward alone its
REINFORCE gradient at step k vanishes (E[grad log pi(a|x) c(x)] = 0): PPO then only sees its effect on later states
and the KL grows without bound (measured: path KL 0 -> 68 in 20 iterations at alpha = 1). Eq. 23 writes the
penalty with u(t, x_t; theta), i.e. differentiated, and so do we:

    grad J = E[sum_k grad log pi(a_k|x_k) A~_k]  -  alpha E[sum_k grad_theta KL_k(theta)]

    kl_mode="reward" (eq. 22-23, default): A~ from rewards r_k - alpha KL_k(delta_behaviour) through GAE
                     (`KLPenaltyConnector`, before GAE, delta from the batch's ACTION_DIST_INPUTS), PLUS the direct term
    kl_mode="loss"   (DPOK): A~ from the task reward only, plus the direct term
    direct term:     loss += (alpha / sigma_A) * mean_k KL_k(delta_theta)   (`KLLossScaleConnector` after GAE:
                     sigma_A = std of the raw advantages; RLlib's GAE standardises advantages, so dividing by it
                     keeps alpha the same trade-off between reward and KL as in J)

gamma = 1, entropy_coeff = 0 (the std is fixed), use_kl_loss = False (PPO's own KL is old-vs-new policy, not the KL to
the pretrained model), normalize_actions = False (the action space is unbounded).

Layout as RLlib's `algorithms/ppo/`: `ppo_kl_config` (config) -> `PPOKLLearner` (learner: connectors, loss term) ->
`DriftPolicyModule` (module) -> `KLPenaltyConnector` (relabelling). `PPOKL` is the `rlft.learners.Learner` adapter
registered as ``learner: {type: ppo_kl}``; `RLlibLearner` is the adapter base f-PG shares.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Literal

import gymnasium as gym
import numpy as np
import torch
from ray.rllib.algorithms.ppo import PPOConfig
from ray.rllib.algorithms.ppo.torch.ppo_torch_learner import PPOTorchLearner
from ray.rllib.connectors.common.numpy_to_tensor import NumpyToTensor
from ray.rllib.connectors.connector_v2 import ConnectorV2
from ray.rllib.core import COMPONENT_LEARNER, COMPONENT_RL_MODULE, DEFAULT_MODULE_ID
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.evaluation.postprocessing import Postprocessing
from ray.rllib.utils.metrics import WEIGHTS_SEQ_NO

from rlft.config import ConfigError, TaskConfig
from rlft.learners import Learner, register_learner
from rlft.models.base import DiffusionModel
from rlft.rewards.base import Reward
from rlft.rllib.env_runner import DRIFT_ENV, VECTORIZE_MODE, BulkEnvRunner
from rlft.rllib.module import MEAN_SCALES, DriftPolicyModule, LoRAUNetPolicyModule, drift_control, drift_model_config
from rlft.sampling import Control, step_kl

#: learner_config_dict keys and metric keys (constants, STYLE.md)
ALPHA, KL_MODE = "alpha", "kl_mode"
KL_TO_PRETRAINED = "kl_to_pretrained"  # mean per-step KL of the batch (learner metric)
PATH_KL = "path_kl"  # mean per-episode sum of KL_k (behaviour policy)
KL_LOSS_COEFF = "kl_loss_coeff"  # batch column: alpha / sigma_A (loss mode)
KL_MODES = ("reward", "loss")
METRICS_LOGGER = "metrics_logger"  # the Learner state's metric windows (not saved)


def _unwrapped(module):
    """The RLModule inside a DDP wrapper (num_learners > 1), else the module itself."""
    return module.unwrapped() if hasattr(module, "unwrapped") else module


def kl_from_dist_inputs(dist_inputs: torch.Tensor) -> torch.Tensor:
    """Per-step KL to the pretrained chain from ACTION_DIST_INPUTS = [delta, log s_k] (B, 2D), shape (B,)."""
    delta, log_std = dist_inputs.chunk(2, dim=-1)
    return step_kl(delta, torch.exp(log_std[:, 0]))


class KLPenaltyConnector(ConnectorV2):
    """Learner connector (batch level, after NumpyToTensor, before GAE): rewards -= alpha * KL_k(behaviour delta)."""

    def __init__(self, input_observation_space=None, input_action_space=None, *, alpha: float, **kwargs: Any) -> None:
        super().__init__(input_observation_space, input_action_space, **kwargs)
        self.alpha = float(alpha)

    def __call__(self, *, rl_module, batch, episodes, metrics=None, **kwargs):
        for mid, mb in batch.items():
            if Columns.ACTION_DIST_INPUTS not in mb or not isinstance(_unwrapped(rl_module[mid]), DriftPolicyModule):
                continue
            mask = mb[Columns.LOSS_MASK].float()
            cost = kl_from_dist_inputs(mb[Columns.ACTION_DIST_INPUTS]) * mask  # (N,), 0 on the bootstrap steps
            mb[Columns.REWARDS] = mb[Columns.REWARDS] - self.alpha * cost
            if metrics is not None:
                num_episodes = max(1.0, float(mb[Columns.TERMINATEDS].float().sum() + mb[Columns.TRUNCATEDS].float().sum()))
                metrics.log_value((mid, PATH_KL), float(cost.sum()) / num_episodes, window=1)
        return batch


class KLLossScaleConnector(ConnectorV2):
    """Learner connector after GAE (loss mode): adds the column alpha / sigma_A, sigma_A = std of raw advantages."""

    def __init__(self, input_observation_space=None, input_action_space=None, *, alpha: float, **kwargs: Any) -> None:
        super().__init__(input_observation_space, input_action_space, **kwargs)
        self.alpha = float(alpha)

    def __call__(self, *, rl_module, batch, episodes, **kwargs):
        for mid, mb in batch.items():
            if Postprocessing.VALUE_TARGETS not in mb or not isinstance(_unwrapped(rl_module[mid]), DriftPolicyModule):
                continue
            mask = mb[Columns.LOSS_MASK]
            with torch.no_grad():
                raw = mb[Postprocessing.VALUE_TARGETS] - _unwrapped(rl_module[mid]).compute_values(mb)  # A = targets - V
            sigma = float(raw[mask].std()) if int(mask.sum()) > 1 else 1.0
            mb[KL_LOSS_COEFF] = torch.full_like(raw, self.alpha / max(sigma, 1e-4))
        return batch


class PPOKLLearner(PPOTorchLearner):
    """PPO's torch learner plus the KL to the pretrained model (reward penalty or loss term, see the module doc)."""

    def build(self) -> None:
        super().build()  # prepends AddOneTsToEpisodesAndTruncate, appends GAE
        cfg = self.config.learner_config_dict
        alpha, mode = float(cfg.get(ALPHA, 0.0)), cfg.get(KL_MODE, "reward")
        if mode not in KL_MODES:
            raise ValueError(f"learner_config_dict[{KL_MODE!r}] must be one of {list(KL_MODES)} (got {mode!r})")
        if self._learner_connector is not None and alpha > 0:
            if mode == "reward":
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
        if KL_LOSS_COEFF in batch:  # the direct gradient of alpha * KL_k(theta) (eq. 23 / DPOK)
            loss = loss + (batch[KL_LOSS_COEFF] * kl)[mask].sum() / mask.sum().clamp_min(1)
        return loss


# -- the Learner-protocol adapter ---------------------------------------------------------------------------


def task_mapping(task: TaskConfig) -> dict[str, Any]:
    """The task as the plain mapping the envs rebuild model and reward from (on every EnvRunner)."""
    return {"model": dataclasses.asdict(task.model), "reward": dict(task.reward), "alpha": task.alpha,
            "num_steps": task.num_steps, "seed": task.seed}


class RLlibLearner(Learner):
    """Base adapter: an RLlib Algorithm behind `rlft.learners.Learner` (train_iteration = one `algo.train()`).

    Subclasses implement `build_config()`. Resources come from the task's `run:` section
    (`rlft.run_config.RunConfig`: num_env_runners, num_envs_per_env_runner, cpus_per_env_runner, num_learners,
    gpus_per_learner); `num_envs` here is the default when `run.num_envs_per_env_runner` is not set.

    Checkpoints: `save_checkpoint` writes (1) ``weights.safetensors`` + ``state.json``: every learner tensor (the
    RLModules and the Adam moments) and the counters, data only; (2) ``rllib/``: RLlib's own
    `Algorithm.save_to_path`, which PICKLES (class_and_ctor_args.pkl, *state.pkl: cloudpickle; RLlib's msgpack
    option needs `msgpack_numpy`). `load_checkpoint` reads only (1) and never unpickles; pass
    ``trust_pickles=True`` to restore (2) with `Algorithm.restore_from_path` instead.
    """

    WEIGHTS_FILE, STATE_FILE, RLLIB_DIR = "weights.safetensors", "state.json", "rllib"

    def __init__(self, task: TaskConfig, model: DiffusionModel, reward: Reward, *, episodes_per_iteration: int,
                 num_envs: int, fast_env_runner: bool, trust_pickles: bool, save_rllib_checkpoint: bool) -> None:
        super().__init__(task, model, reward)
        from rlft.run_config import run_config_of

        self.run = run_config_of(task)
        explicit = "num_envs_per_env_runner" in (task.run or {})
        self.num_envs = self.run.num_envs_per_env_runner if explicit else int(num_envs)
        runners = max(1, self.run.num_env_runners)
        if episodes_per_iteration < 1 or num_envs < 1:
            raise ConfigError(f"learner.episodes_per_iteration and learner.num_envs must be >= 1 "
                              f"(got {episodes_per_iteration}, {num_envs})")
        rounds = max(1, math.ceil(episodes_per_iteration / (self.num_envs * runners)))
        self.episodes_per_iteration = rounds * self.num_envs * runners  # whole rounds of every EnvRunner
        self.fast_env_runner = bool(fast_env_runner)
        self.trust_pickles = bool(trust_pickles)
        self.save_rllib_checkpoint = bool(save_rllib_checkpoint)
        self.algo = None
        self.last_result: dict[str, Any] = {}

    # -- to implement -------------------------------------------------------------------------------------
    def build_config(self) -> PPOConfig:
        raise NotImplementedError

    # -- shared config pieces -----------------------------------------------------------------------------
    def base_config(self, config: PPOConfig, env: str, env_config: dict[str, Any], steps_per_episode: int) -> PPOConfig:
        """Environment, EnvRunners, learners and seed from the run section; batch = whole rounds of episodes."""
        run = self.run
        config = (
            config.environment(env, env_config={**env_config, "device": "cpu"}, normalize_actions=False, clip_actions=False)
            .env_runners(
                num_env_runners=run.num_env_runners, num_envs_per_env_runner=self.num_envs,
                num_cpus_per_env_runner=run.cpus_per_env_runner, gym_env_vectorize_mode=VECTORIZE_MODE,
                env_runner_cls=BulkEnvRunner if self.fast_env_runner else None,
                # truncate_episodes: RLlib's own runner re-seeds its env at every sample() call in complete_episodes
                # mode (same x_0 every iteration); the batch is whole rounds, so no episode is cut here either
                rollout_fragment_length="auto", batch_mode="truncate_episodes",
            )
            .learners(num_learners=run.num_learners, num_gpus_per_learner=run.gpus_per_learner if run.num_learners else 0)
            .debugging(seed=self.task.seed, log_level="ERROR")
            .reporting(metrics_num_episodes_for_smoothing=self.episodes_per_iteration)
        )
        config.train_batch_size_per_learner = max(1, self.episodes_per_iteration * steps_per_episode // max(1, run.num_learners))
        return config

    def build(self) -> None:
        self.config = self.build_config()
        self.algo = self.config.build_algo()

    # -- Learner protocol ---------------------------------------------------------------------------------
    def train_iteration(self) -> dict[str, float]:
        result = self.algo.train()
        self.last_result = result
        self.iteration += 1
        runners = result.get("env_runners", {})
        episodes = int(runners.get("num_episodes", self.episodes_per_iteration))
        self.reward_queries += episodes  # one terminal reward per episode
        out = {"episode_return_mean": float(runners.get("episode_return_mean", float("nan"))), "episodes": float(episodes)}
        for key, value in (result.get("learners", {}).get(DEFAULT_MODULE_ID, {}) or {}).items():
            if isinstance(value, (int, float, np.floating, np.integer)):
                out[key] = float(value)
        return out

    def module_state(self, module_id: str = DEFAULT_MODULE_ID) -> dict[str, np.ndarray]:
        """The current weights of one RLModule, from the (local or first remote) Learner."""
        path = f"{COMPONENT_LEARNER}/{COMPONENT_RL_MODULE}/{module_id}"
        return self.algo.learner_group.get_state(components=path)[COMPONENT_LEARNER][COMPONENT_RL_MODULE][module_id]

    # -- checkpoints: data, not pickles -------------------------------------------------------------------
    def save_checkpoint(self, directory: str) -> None:
        from safetensors.numpy import save_file

        state = self.algo.learner_group.get_state(components=COMPONENT_LEARNER)[COMPONENT_LEARNER]
        state.pop(METRICS_LOGGER, None)  # running metric windows: not needed to resume
        tensors, meta = _flatten(state)
        save_file(tensors, os.path.join(directory, self.WEIGHTS_FILE))
        info = {"format": "rlft-rllib", "version": 1, "learner": type(self).__name__, "iteration": self.iteration,
                "reward_queries": self.reward_queries, "learner_state": meta,
                "sampled_lifetime": self._sampled_lifetime()}
        with open(os.path.join(directory, self.STATE_FILE), "w") as f:
            json.dump(info, f)
        if self.save_rllib_checkpoint:
            self.algo.save_to_path(os.path.join(directory, self.RLLIB_DIR))

    def load_checkpoint(self, directory: str) -> None:
        from safetensors.numpy import load_file

        with open(os.path.join(directory, self.STATE_FILE)) as f:
            info = json.load(f)
        if info.get("learner") != type(self).__name__:
            raise ValueError(f"checkpoint {directory} was written by {info.get('learner')}, not {type(self).__name__}")
        if self.trust_pickles:
            self.algo.restore_from_path(os.path.join(directory, self.RLLIB_DIR))
        else:
            state = _unflatten(load_file(os.path.join(directory, self.WEIGHTS_FILE)), info["learner_state"])
            # RLlib only accepts weights newer than its own (weights_seq_no): mark the loaded ones newest, so
            # that the Learner takes them and the sync below reaches every EnvRunner
            current = self.algo.learner_group.get_state(components=COMPONENT_LEARNER)[COMPONENT_LEARNER]
            state[WEIGHTS_SEQ_NO] = max(int(state.get(WEIGHTS_SEQ_NO, 0)), int(current.get(WEIGHTS_SEQ_NO, 0))) + 1
            self.algo.learner_group.set_state({COMPONENT_LEARNER: state})
            self.algo.env_runner_group.sync_weights(from_worker_or_learner_group=self.algo.learner_group, inference_only=True)
        self.iteration = int(info["iteration"])
        self.reward_queries = int(info["reward_queries"])

    def _sampled_lifetime(self) -> int:
        try:
            return int(self.algo.metrics.peek(("env_runners", "num_env_steps_sampled_lifetime"), default=0))
        except Exception:  # metrics layout differs across RLlib versions: the counter is informative only
            return 0


def _flatten(state: Any, prefix: str = "") -> tuple[dict[str, np.ndarray], Any]:
    """Splits a nested state into safetensors arrays (keyed by path) and a JSON skeleton referencing them."""
    tensors: dict[str, np.ndarray] = {}

    def walk(node: Any, path: str) -> Any:
        if isinstance(node, dict):
            return {"__dict__": [[json.dumps(k), walk(v, f"{path}/{k}")] for k, v in node.items()]}
        if isinstance(node, (list, tuple)):
            return {"__list__": [walk(v, f"{path}/{i}") for i, v in enumerate(node)]}
        if isinstance(node, torch.Tensor):
            node = node.detach().cpu().numpy()
        if isinstance(node, np.ndarray):
            tensors[path] = np.ascontiguousarray(node)
            return {"__tensor__": path}
        if isinstance(node, (np.floating, np.integer, np.bool_)):
            return node.item()
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        raise TypeError(f"cannot store {type(node).__name__} at {path} as data (safetensors/JSON)")

    return tensors, walk(state, prefix)


def _unflatten(tensors: dict[str, np.ndarray], meta: Any) -> Any:
    if isinstance(meta, dict) and "__dict__" in meta:
        return {json.loads(k): _unflatten(tensors, v) for k, v in meta["__dict__"]}
    if isinstance(meta, dict) and "__list__" in meta:
        return [_unflatten(tensors, v) for v in meta["__list__"]]
    if isinstance(meta, dict) and "__tensor__" in meta:
        return tensors[meta["__tensor__"]]
    return meta


def drift_spaces(model: DiffusionModel) -> tuple[gym.spaces.Box, gym.spaces.Box]:
    """The drift env's single observation and action spaces for a model (without building an env)."""
    D, C = model.event_dim, (math.prod(model.cond_shape) if model.cond_shape else 0)
    obs = gym.spaces.Box(-np.inf, np.inf, (D + 1 + C,), np.float32)
    return obs, gym.spaces.Box(-np.inf, np.inf, (D,), np.float32)


@register_learner("ppo_kl")
class PPOKL(RLlibLearner):
    """PPO + KL penalty (ELEGANT App. E.3) on `rlft/DenoisingDrift-v0`, as ``learner: {type: ppo_kl, ...}``.

    With the defaults (256 trajectories per iteration) it closes >= 70 % of the gap to J* on the 2-D Gaussian-mixture
    tasks at alpha = 1 within 3-4 iterations (a few seconds of training on 2 CPU cores) and ~93 % after 60
    (`rlft bench rllib`).
    """

    def __init__(
        self,
        task: TaskConfig,
        model: DiffusionModel,
        reward: Reward,
        *,
        kl_mode: Literal["reward", "loss"] = "reward",
        episodes_per_iteration: int = 256,
        num_envs: int = 256,
        lr: float = 1e-3,
        num_epochs: int = 4,
        minibatch_size: int = 4096,
        clip_param: float = 0.2,
        lambda_: float = 0.95,
        hidden: int = 64,
        num_layers: int = 2,
        mean_scale: Literal["std", "variance", "one"] = "std",
        policy: Literal["mlp", "lora"] = "mlp",
        lora_rank: int = 4,
        grad_clip: float | None = None,
        fast_env_runner: bool = True,
        trust_pickles: bool = False,
        save_rllib_checkpoint: bool = True,
    ) -> None:
        """
        Args:
            kl_mode: "reward" (eq. 22-23: alpha KL_k also subtracted from each step's reward before GAE) or "loss"
                (DPOK: the directly differentiated KL term only).
            episodes_per_iteration: trajectories per PPO iteration (rounded up to whole rounds of all EnvRunners).
            num_envs: trajectories each EnvRunner simulates at once (when run.num_envs_per_env_runner is unset).
            lr, num_epochs, minibatch_size, clip_param, lambda_, grad_clip: PPO's (global) settings.
            hidden, num_layers, mean_scale: the policy/value MLPs and delta's scale (`rlft.rllib.module`).
            policy: "mlp" (`DriftPolicyModule`) or "lora" (`LoRAUNetPolicyModule`: a rank-`lora_rank` LoRA on the
                task's diffusers UNet; model.type must be diffusers).
            fast_env_runner: sample with `BulkEnvRunner` (else RLlib's SingleAgentEnvRunner).
            trust_pickles, save_rllib_checkpoint: checkpoint formats (see `RLlibLearner`).
        """
        super().__init__(task, model, reward, episodes_per_iteration=episodes_per_iteration, num_envs=num_envs,
                         fast_env_runner=fast_env_runner, trust_pickles=trust_pickles,
                         save_rllib_checkpoint=save_rllib_checkpoint)
        if kl_mode not in KL_MODES:
            raise ConfigError(f"learner.kl_mode must be one of {list(KL_MODES)} (got {kl_mode!r})")
        if mean_scale not in MEAN_SCALES:
            raise ConfigError(f"learner.mean_scale must be one of {list(MEAN_SCALES)} (got {mean_scale!r})")
        for name, value in (("lr", lr), ("clip_param", clip_param)):
            if not value > 0:
                raise ConfigError(f"learner.{name} must be > 0 (got {value})")
        if not 0.0 <= lambda_ <= 1.0:
            raise ConfigError(f"learner.lambda_ must be in [0, 1] (got {lambda_})")
        self.hyper = dict(kl_mode=kl_mode, lr=lr, num_epochs=num_epochs, minibatch_size=minibatch_size,
                          clip_param=clip_param, lambda_=lambda_, grad_clip=grad_clip)
        extra: dict[str, Any] = {}
        self.module_class = DriftPolicyModule
        if policy == "lora":
            if getattr(task.model, "type", None) != "diffusers":
                raise ConfigError(f"learner.policy 'lora' needs model.type diffusers (got {getattr(task.model, 'type', None)!r}); "
                                  "use policy: mlp for other models")
            m = task.model
            extra = {"chain": {"path": m.path, "num_steps": model.num_steps, "scheduler": m.scheduler, "eta": m.eta,
                               "subfolder_unet": m.subfolder_unet, "subfolder_scheduler": m.subfolder_scheduler},
                     "lora": {"rank": int(lora_rank)}}
            self.module_class = LoRAUNetPolicyModule
        elif policy != "mlp":
            raise ConfigError(f"learner.policy must be 'mlp' or 'lora' (got {policy!r})")
        self.model_config = drift_model_config([model.std(k) for k in range(model.num_steps)], hidden=hidden,
                                               num_layers=num_layers, mean_scale=mean_scale, **extra)
        self.build()
        obs_space, act_space = drift_spaces(model)
        self._control_module = self.module_class(observation_space=obs_space, action_space=act_space, inference_only=True,
                                                 model_config=self.model_config)

    def build_config(self) -> PPOConfig:
        h = self.hyper
        config = self.base_config(PPOConfig(), DRIFT_ENV, {"task": task_mapping(self.task)}, self.model.num_steps)
        config.rl_module(rl_module_spec=RLModuleSpec(module_class=self.module_class, model_config=self.model_config))
        config.learners(learner_class=PPOKLLearner, learner_config_dict={ALPHA: self.task.alpha, KL_MODE: h["kl_mode"]})
        config.training(
            gamma=1.0, lambda_=h["lambda_"], lr=h["lr"], num_epochs=h["num_epochs"],
            minibatch_size=min(h["minibatch_size"], config.train_batch_size_per_learner), clip_param=h["clip_param"],
            entropy_coeff=0.0, use_kl_loss=False, vf_clip_param=1e8, grad_clip=h["grad_clip"],
        )
        return config

    def control(self) -> Control:
        self._control_module.set_state(self.module_state())
        return drift_control(self._control_module, self.model.num_steps)
