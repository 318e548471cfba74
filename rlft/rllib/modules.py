"""RLModules of the rlft learners (forward passes only): the drift policy N(delta_theta(x, k), s_k^2 I), its
LoRA-on-UNet variant, the restart policy and f-PG's discriminator (MATH.md §5; ELEGANT App. E.3; BOOST §4.2-4.3).

Drift env (`envs.drift`): the action is a_k = x_{k+1} - m_k(x_k), so a policy N(delta_theta(x_k, k), s_k^2 I) over
a_k IS the fine-tuned transition N(m_k + delta_theta, s_k^2 I) and its log-prob is the transition log-density.

    delta_theta(x, k) = c_k * net_theta(x, k/K, cond)      net's last layer zero-initialised -> delta = 0 at init
    c_k = s_k ("std", default) | s_k^2 ("variance") | 1 ("one")
    std  = s_k, FIXED (a buffer from the model's `std(k)`, never a parameter); k = round(obs[D] * K)

so the untrained policy is exactly the pretrained chain, and with c_k = s_k the per-step KL |delta|^2/(2 s_k^2) is
|net|^2 / 2 and PPO's log-ratio moves by the same amount per unit of net output at every noise level.
`ACTION_DIST_INPUTS` = [delta, log s_k] (RLlib's `TorchDiagGaussian.from_logits` layout).

The value network is separate: `InferenceOnlyAPI` strips it from EnvRunners.
Observation layout (drift env): [x flattened (D), k/K, cond flattened (C)]; restart env: [x (D), l/K, nfe, t, cond].

Notation: K `num_steps`, D `event_dim`, s_k `stds[k]`, delta `delta`.
"""

from __future__ import annotations

import math
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.apis.inference_only_api import InferenceOnlyAPI
from ray.rllib.core.rl_module.apis.value_function_api import ValueFunctionAPI
from ray.rllib.core.rl_module.torch.torch_rl_module import TorchRLModule

from rlft.models.base import DiffusionModel
from rlft.models.nets import linear_time_features, mlp
from rlft.rllib.drift_mean import DEFAULT_HIDDEN, DEFAULT_NUM_FREQS, DEFAULT_NUM_LAYERS, drift_mean_parts
from rlft.rllib.keys import (
    EVENT_DIM, HIDDEN, INIT_DENOISE_PROB, LOGITS, LORA, MEAN_SCALE, MODEL, NUM_FREQS, NUM_LAYERS, NUM_STEPS, STDS,
    VALUE_NET,
)
from rlft.sampling import Control

#: How the network output is scaled into delta_k (see the module docstring).
MEAN_SCALES = ("std", "variance", "one")


def drift_model_config(
    stds: list[float], hidden: int = 64, num_layers: int = 2, mean_scale: str = "std", num_freqs: int = 4, **extra: Any
) -> dict[str, Any]:
    """The (picklable, JSON-able) model_config of `DriftPolicyModule` for a chain with per-step stds s_k (K,)."""
    if mean_scale not in MEAN_SCALES:
        raise ValueError(f"mean_scale must be one of {list(MEAN_SCALES)} (got {mean_scale!r})")
    if hidden < 1 or num_layers < 1:
        raise ValueError(f"hidden and num_layers must be >= 1 (got hidden={hidden}, num_layers={num_layers})")
    if not stds or min(stds) <= 0:
        raise ValueError("stds must be the chain's K per-step stds s_k, all > 0")
    return {STDS: [float(s) for s in stds], NUM_STEPS: len(stds), HIDDEN: int(hidden), NUM_LAYERS: int(num_layers),
            MEAN_SCALE: mean_scale, NUM_FREQS: int(num_freqs), **extra}


def drift_spaces(model: DiffusionModel, conditions: Any = None) -> tuple[gym.spaces.Box, gym.spaces.Box]:
    """The drift env's single observation (D + 1 + C,) and action (D,) spaces for a model (without an env); C is the
    model's cond size, else that of a conditional task's `rlft.conditions.Conditions` (reward-only conditioning)."""
    D = model.event_dim
    C = math.prod(model.cond_shape) if model.cond_shape else (conditions.dim if conditions is not None else 0)
    obs = gym.spaces.Box(-np.inf, np.inf, (D + 1 + C,), np.float32)
    return obs, gym.spaces.Box(-np.inf, np.inf, (D,), np.float32)


def restart_spaces(model: DiffusionModel) -> tuple[gym.spaces.Box, gym.spaces.Discrete]:
    """The restart env's single observation (D + 3,) and action {0: NOISE, 1: DENOISE} spaces (unconditional)."""
    return gym.spaces.Box(-np.inf, np.inf, (model.event_dim + 3,), np.float32), gym.spaces.Discrete(2)


class DriftPolicyModule(TorchRLModule, ValueFunctionAPI, InferenceOnlyAPI):
    """Gaussian policy N(delta_theta(x, k), s_k^2 I) over the drift env's action, plus a separate value network."""

    def setup(self) -> None:
        cfg = self.model_config
        self.event_dim = int(self.action_space.shape[0])  # D
        self.num_steps = int(cfg[NUM_STEPS])  # K
        self.obs_dim = int(self.observation_space.shape[0])
        self.cond_dim = self.obs_dim - self.event_dim - 1  # C
        if self.cond_dim < 0:
            raise ValueError(f"observation size {self.obs_dim} < event_dim + 1 = {self.event_dim + 1}: not a drift-env observation")
        scales, time_table, self.mean_net = drift_mean_parts(cfg, self.event_dim, self.cond_dim)  # rlft.load builds the same
        self.register_buffer("log_stds", torch.log(torch.as_tensor(cfg[STDS], dtype=torch.float32)), persistent=False)
        self.register_buffer("mean_scales", scales, persistent=False)
        self.num_freqs = int(cfg.get(NUM_FREQS, DEFAULT_NUM_FREQS))
        self.register_buffer("time_table", time_table, persistent=False)  # (K+1, 1 + 2F)
        inp = self.event_dim + 1 + 2 * self.num_freqs + self.cond_dim
        hidden, layers = int(cfg.get(HIDDEN, DEFAULT_HIDDEN)), int(cfg.get(NUM_LAYERS, DEFAULT_NUM_LAYERS))
        if not self.inference_only and cfg.get(VALUE_NET, True):  # value_net False: no critic (GRPO)
            self.value_net = mlp(inp, hidden, layers, 1)

    def get_non_inference_attributes(self) -> list[str]:
        return ["value_net"]

    # -- pieces -------------------------------------------------------------------------------------
    def step_index(self, obs: torch.Tensor) -> torch.Tensor:
        """k from the observation's k/K, clamped to [0, K-1] (the terminal obs K/K only feeds the value net)."""
        return torch.round(obs[:, self.event_dim] * self.num_steps).long().clamp(0, self.num_steps - 1)

    def features(self, obs: torch.Tensor) -> torch.Tensor:
        """[x, time features of k/K (a table lookup: k is discrete), cond], (B, D + 1 + 2 F + C)."""
        D = self.event_dim
        k = torch.round(obs[:, D] * self.num_steps).long().clamp(0, self.num_steps)  # the terminal obs has k = K
        return torch.cat([obs[:, :D], self.time_table[k], obs[:, D + 1 :]], dim=-1)

    def delta(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(delta_theta (B, D), log s_k (B,)) for observations (B, obs_dim)."""
        k = self.step_index(obs)
        return self.mean_scales[k, None] * self.mean_net(self.features(obs)), self.log_stds[k]

    # -- RLModule API -------------------------------------------------------------------------------
    def _forward(self, batch: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        mean, log_std = self.delta(batch[Columns.OBS])
        return {Columns.ACTION_DIST_INPUTS: torch.cat([mean, log_std[:, None].expand_as(mean)], dim=-1)}

    def compute_values(self, batch: dict[str, Any], embeddings: Any = None) -> torch.Tensor:
        if "value_net" not in self._modules:
            raise RuntimeError("this drift policy was built without a value network (model_config value_net: False, as "
                               "GRPO builds it); its learner must not ask for values (use_critic=False, no GAE)")
        return self.value_net(self.features(batch[Columns.OBS])).squeeze(-1)


class LoRAUNetPolicyModule(DriftPolicyModule):
    """The drift policy whose mean is a LoRA on a diffusers UNet: delta_k(x) = m_k^LoRA(x) - m_k(x).

    model_config adds ``model``: the task's typed diffusers model config as a mapping (`rlft.config.model_config_to_dict`;
    the module rebuilds the chain with `rlft.models.build_model`, the route every env and learner uses), ``num_steps``
    K, and ``lora``: {"rank": 4, "lora_alpha": None, "target_modules": None}. The base UNet is frozen; only the LoRA
    matrices (B initialised to zero by peft, so delta = 0 at init) and the value net train.

    Limits (RLlib's module model): the module holds its own copy of the UNet (one per EnvRunner and Learner, besides
    the env's), every forward runs the UNet twice (adapters on and off), and `get_state` ships the frozen base weights
    with every weight sync; fine for small UNets, wasteful for large ones, where a custom weight sync of the adapter
    alone would be needed.
    """

    def setup(self) -> None:
        from rlft.config import model_config_from_dict
        from rlft.models import build_model

        cfg = dict(self.model_config)
        steps = int(cfg[NUM_STEPS])
        chain = build_model(model_config_from_dict(cfg[MODEL]), steps)
        lora = dict(cfg.get(LORA) or {})
        chain.add_lora(**{k: v for k, v in lora.items() if v is not None})
        cfg[STDS] = [float(chain.std(k)) for k in range(steps)]
        self.model_config = cfg
        super().setup()
        del self.mean_net  # the LoRA replaces the mean MLP
        self.chain = chain
        self.unet = chain.unet  # registers the UNet (and its LoRA parameters) as a submodule

    def delta(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.step_index(obs)
        x = obs[:, : self.event_dim].reshape(-1, *self.chain.event_shape)
        out = torch.zeros_like(x)
        for level in torch.unique(k).tolist():  # one UNet call per distinct step (the env runs in lockstep)
            rows = (k == level).nonzero().squeeze(-1)
            xs = x[rows]
            out[rows] = self.chain.lora_mean(level, xs) - self.chain.mean(level, xs)
        return out.reshape(obs.shape[0], -1), self.log_stds[k]


class RestartPolicyModule(TorchRLModule, ValueFunctionAPI, InferenceOnlyAPI):
    """Categorical policy over the restart env's {0: NOISE, 1: DENOISE} with a separate value network.

    model_config: event_dim, hidden, num_layers, num_freqs, and ``init_denoise_prob`` (the initial P(DENOISE), set
    through the last layer's bias with zero weights; 0.5 = uniform). Observation: [x (D), l/K, nfe/(K+L), t/L, cond].
    """

    def setup(self) -> None:
        cfg = self.model_config
        self.event_dim = int(cfg[EVENT_DIM])
        self.obs_dim = int(self.observation_space.shape[0])
        self.num_freqs = int(cfg.get(NUM_FREQS, 4))
        hidden, layers = int(cfg.get(HIDDEN, 64)), int(cfg.get(NUM_LAYERS, 2))
        inp = self.obs_dim + 2 * self.num_freqs
        self.logits_net = mlp(inp, hidden, layers, 2, zero_last=True)
        p = float(cfg.get(INIT_DENOISE_PROB, 0.5))
        if not 0.0 < p < 1.0:
            raise ValueError(f"init_denoise_prob must be in (0, 1) (got {p})")
        with torch.no_grad():
            self.logits_net[-1].bias.copy_(torch.tensor([0.0, math.log(p / (1.0 - p))]))
        if not self.inference_only:
            self.value_net = mlp(inp, hidden, layers, 1)

    def get_non_inference_attributes(self) -> list[str]:
        return ["value_net"]

    def features(self, obs: torch.Tensor) -> torch.Tensor:
        D = self.event_dim
        return torch.cat([obs, linear_time_features(obs[:, D : D + 1], self.num_freqs)[:, 1:]], dim=-1)

    def _forward(self, batch: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        return {Columns.ACTION_DIST_INPUTS: self.logits_net(self.features(batch[Columns.OBS]))}

    def compute_values(self, batch: dict[str, Any], embeddings: Any = None) -> torch.Tensor:
        return self.value_net(self.features(batch[Columns.OBS])).squeeze(-1)


class DiscriminatorModule(TorchRLModule):
    """logit(x, level) of P(agent | state); learner-only (never on EnvRunners). model_config: event_dim, hidden,
    num_layers, num_freqs. Inputs: x = obs[:, :D] and the time features of the level column obs[:, D]."""

    def setup(self) -> None:
        cfg = self.model_config
        self.event_dim, self.num_freqs = int(cfg[EVENT_DIM]), int(cfg.get(NUM_FREQS, 4))
        self.net = mlp(self.event_dim + 1 + 2 * self.num_freqs, int(cfg.get(HIDDEN, 64)), int(cfg.get(NUM_LAYERS, 2)), 1)

    def _forward(self, batch: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        obs, D = batch[Columns.OBS], self.event_dim
        feats = torch.cat([obs[:, :D], linear_time_features(obs[:, D : D + 1], self.num_freqs)], dim=-1)
        return {LOGITS: self.net(feats).squeeze(-1)}


def drift_control(module: DriftPolicyModule, num_steps: int) -> Control:
    """A `rlft.sampling.Control` (k, x, cond) -> delta_k from the module's mean (for `rlft.evaluation.evaluate_run`)."""

    def control(k: int, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        B, dev = x.shape[0], module.log_stds.device
        parts = [x.reshape(B, -1).float().to(dev), torch.full((B, 1), k / num_steps, device=dev)]
        if cond is not None:
            parts.append(cond.reshape(B, -1).float().to(dev))
        with torch.no_grad():
            delta, _ = module.delta(torch.cat(parts, dim=-1))
        return delta.reshape(x.shape).to(device=x.device, dtype=x.dtype)

    return control
