"""A diffusers UNet + DDPM/DDIM(eta > 0) scheduler seen as a K-step Gaussian transition chain (LoRA, files: `lora.py`).

Derived from diffusers 0.42.1 `DDPMScheduler.step` and `DDIMScheduler.step` (the formulas below are theirs,
re-written so that the mean is a differentiable function of x and the std a scalar; pin diffusers when these
schedulers change). Step k takes x at scheduler timestep tau = tau_k to the scheduler's previous timestep tau'
(MATH.md §1; DDPM: Ho et al. 2020 eq. 6-7, DDIM: Song et al. 2021 eq. 12, 16):

    x0_hat = (x - sqrt(1 - ab) eps) / sqrt(ab)           (epsilon prediction; v / sample predictions convert)
    x0_hat <- clip(x0_hat)                              (only if the scheduler has clip_sample / thresholding)
    DDPM:  mean = sqrt(ab') beta / (1 - ab) x0_hat + sqrt(alpha) (1 - ab') / (1 - ab) x
           std  = sqrt((1 - ab') / (1 - ab) beta)        ("fixed_small"; "fixed_large": std = sqrt(beta))
    DDIM:  std  = eta sqrt((1 - ab') / (1 - ab) (1 - ab / ab'))
           mean = sqrt(ab') x0_hat + sqrt(1 - ab' - std^2) eps
    ODE step (DDIM, eta = 0):  sqrt(ab') x0_hat + sqrt(1 - ab') eps
    score at level k:          -eps / sqrt(1 - ab)
    forward kernel level k+1 -> k:  x_k = sqrt(ab_k / ab_{k+1}) x_{k+1} + sqrt(1 - ab_k / ab_{k+1}) noise

with ab = alphas_cumprod[tau], ab' = alphas_cumprod[tau'], alpha = ab / ab', beta = 1 - alpha. So
`mean(k, x) + std(k) * noise == scheduler.step(unet(x, tau).sample, tau, x, noise).prev_sample`. With
clip_sample=True (the diffusers default) the mean is not linear in the score; the chain still matches the
scheduler, and learners only need mean() to be differentiable.

Conventions this module fixes:
- The step k -> scheduler timestep map lives in ONE method, `DiffusersChain._timestep(k)` (MATH.md §1).
- Every step is stochastic. `scheduler.set_timesteps(K)`; if its last step is deterministic (DDPM always jumps
  to the clean level with zero noise; DDIM does when ab' = 1), the chain uses `set_timesteps(K + 1)` and stops
  one step early, at the scheduler's lowest timestep (noise std sqrt(1 - alphas_cumprod[tau_K]), 0.01 for the
  default linear betas), like `rlft.schedule.VPSchedule.s_min`.
- Generative time t = 1 - tau / num_train_timesteps (`time`, `dt`).
- `UNet2DConditionModel`: cond is `encoder_hidden_states`, cond_shape = (cond_seq_len, cross_attention_dim); a
  flat (B, cond_seq_len * cross_attention_dim) cond (a conditional task's embedded prompts) is reshaped to it.
- Class-conditional `UNet2DModel` (`num_class_embeds: C`, no class_embed_type): cond is one-hot (B, C), the
  task's `conditions: {train: [0, 3], num_classes: C}`; the UNet gets `class_labels = cond.argmax(-1)`.
- LoRA (peft, `rlft.models.lora.LoRAMixin`): `mean()` is ALWAYS the pretrained (base) mean; `lora_control()` is
  the control delta_k = mean_lora(k, x) - mean_base(k, x).
- Without clipping the mean and the ODE step are affine in the score (`score_coefficients`), so a
  `ControlledChain` over this chain has a score.

Notation: tau `timestep`, ab `alpha_bar` (diffusers' alphas_cumprod), eps the UNet's noise prediction.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass
from typing import Literal

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel, UNet2DModel

from rlft.models.base import DiffusionModel
from rlft.models.lora import LoRAMixin, PretrainedFilesMixin

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
DDPM_VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large")
#: A step whose std is below this is deterministic (DDPM clamps its variance at 1e-20).
_MIN_STD = 1e-6


@dataclass(frozen=True)
class _Step:
    """Float64 scalars of one step (see the module docstring)."""

    timestep: int  # tau_k
    prev_timestep: int  # tau' as the scheduler computes it (may be < 0: the final level)
    alpha_bar: float  # ab
    alpha_bar_prev: float  # ab'
    std: float  # s_k


class DiffusersChain(LoRAMixin, PretrainedFilesMixin, DiffusionModel):
    """A diffusers UNet with a DDPM or DDIM (eta > 0) scheduler as a K-step Gaussian chain; float32, frozen."""

    def __init__(
        self,
        unet: UNet2DModel | UNet2DConditionModel,
        scheduler: DDPMScheduler | DDIMScheduler,
        num_steps: int,
        eta: float = 1.0,
        cond_seq_len: int = 77,
    ) -> None:
        """
        Args:
            unet: an epsilon/v/sample-predicting `UNet2DModel` or `UNet2DConditionModel` (frozen here).
            scheduler: a `DDPMScheduler` (fixed_small / fixed_large variance) or a `DDIMScheduler`; the chain
                keeps a copy (`self.scheduler`) and sets its timesteps.
            num_steps: K, the number of (stochastic) chain steps.
            eta: DDIM stochasticity in (0, 1]; must stay 1.0 with a DDPM scheduler.
            cond_seq_len: sequence length of `encoder_hidden_states` for a `UNet2DConditionModel` (77 for CLIP).
        """
        super().__init__(num_steps)
        if not isinstance(unet, (UNet2DModel, UNet2DConditionModel)):
            raise TypeError(f"unet must be a diffusers UNet2DModel or UNet2DConditionModel (got {type(unet).__name__})")
        if isinstance(scheduler, DDIMScheduler):
            self.kind: Literal["ddpm", "ddim"] = "ddim"
            if not (0.0 < eta <= 1.0):
                raise ValueError(
                    f"eta must be in (0, 1] for a DDIM scheduler (got {eta}); the chain needs Gaussian transitions, "
                    "so eta = 0 (deterministic DDIM) is not a chain: use ode_step for it"
                )
        elif isinstance(scheduler, DDPMScheduler):
            self.kind = "ddpm"
            if eta != 1.0:
                raise ValueError(f"eta={eta} has no effect with a DDPM scheduler; use scheduler='ddim' for eta < 1")
        else:
            raise TypeError(f"scheduler must be a diffusers DDPMScheduler or DDIMScheduler (got {type(scheduler).__name__})")
        config = scheduler.config
        if config.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"scheduler prediction_type {config.prediction_type!r} is not supported; use one of {PREDICTION_TYPES}"
            )
        if self.kind == "ddpm" and config.variance_type not in DDPM_VARIANCE_TYPES:
            raise ValueError(
                f"DDPM variance_type {config.variance_type!r} is not supported (learned variances make s_k depend on x, "
                f"and 'fixed_large_log' is not a std); use one of {DDPM_VARIANCE_TYPES}"
            )
        ucfg = unet.config
        if ucfg.in_channels != ucfg.out_channels:
            raise ValueError(
                f"unet out_channels ({ucfg.out_channels}) must equal in_channels ({ucfg.in_channels}); "
                "UNets that also predict a variance are not supported"
            )
        num_classes = getattr(ucfg, "num_class_embeds", None)
        if getattr(ucfg, "class_embed_type", None) is not None or (num_classes is not None and isinstance(unet, UNet2DConditionModel)):
            raise ValueError("of the class-conditional UNets only a UNet2DModel with num_class_embeds (and no class_embed_type) "
                             "is supported (its cond is a one-hot class label)")
        if getattr(ucfg, "addition_embed_type", None) is not None:
            raise ValueError(f"UNets with addition_embed_type={ucfg.addition_embed_type!r} (e.g. SDXL) are not supported")
        self.unet = unet.requires_grad_(False).eval()
        self.scheduler = copy.deepcopy(scheduler)  # set_timesteps mutates it; the caller's stays as it was
        self.eta = float(eta)
        size = ucfg.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        self.event_shape = (ucfg.in_channels, h, w)
        self.conditional = isinstance(unet, UNet2DConditionModel)  # cond = encoder_hidden_states
        self.class_conditional = num_classes is not None  # cond = one-hot class label
        if self.conditional:
            if cond_seq_len < 1:
                raise ValueError(f"cond_seq_len must be >= 1 (got {cond_seq_len})")
            self.cond_shape = (int(cond_seq_len), int(ucfg.cross_attention_dim))
        elif self.class_conditional:
            self.cond_shape = (int(num_classes),)
        self.num_train_timesteps = int(config.num_train_timesteps)
        self.lora_config = None  # a `rlft.models.lora.LoRAConfig` once add_lora / load_lora attached one
        self._shared: tuple | None = None
        self._steps = self._plan()

    # -- the step k -> scheduler timestep map (the ONE place, MATH.md §1) ---------------------------
    def _timestep(self, k: int) -> tuple[int, int]:
        """(tau_k, tau'_k): the timestep step k evaluates the UNet at, and the previous timestep it lands on.

        tau'_k is what the scheduler's own `step` uses (DDPM: the next entry of `scheduler.timesteps`, -1 after
        the last; DDIM: tau_k - num_train_timesteps // num_inference_steps); it is < 0 for the final level.
        """
        if not 0 <= k < self.num_steps:
            raise IndexError(f"step k must be in [0, {self.num_steps}) (got {k})")
        tau = int(self.scheduler.timesteps[k])
        if self.kind == "ddpm":
            prev = int(self.scheduler.previous_timestep(tau))
        else:
            prev = tau - self.num_train_timesteps // self.scheduler.num_inference_steps
        return tau, prev

    def _alpha_bar(self, tau: int) -> float:
        """alphas_cumprod at a timestep; below 0 the scheduler's final value (1, or alphas_cumprod[0] for DDIM)."""
        if tau >= 0:
            return float(self.scheduler.alphas_cumprod[tau])
        return 1.0 if self.kind == "ddpm" else float(self.scheduler.final_alpha_cumprod)

    def _step_scalars(self, k: int) -> _Step:
        tau, prev = self._timestep(k)
        ab, abp = self._alpha_bar(tau), self._alpha_bar(prev)
        var = (1.0 - abp) / (1.0 - ab) * (1.0 - ab / abp)  # posterior variance (DDPM eq. 7, DDIM eq. 16 at eta=1)
        if self.kind == "ddim":
            std = self.eta * math.sqrt(max(var, 0.0))
        elif tau == 0:
            std = 0.0  # DDPMScheduler.step adds no noise at t = 0
        elif self.scheduler.config.variance_type == "fixed_large":
            std = math.sqrt(1.0 - ab / abp)
        else:
            std = math.sqrt(max(var, 1e-20))
        return _Step(tau, prev, ab, abp, std)

    def _plan(self) -> list[_Step]:
        """Sets the scheduler's timesteps so that all K steps are stochastic (module docstring)."""
        K = self.num_steps
        if K > self.num_train_timesteps:
            raise ValueError(f"num_steps ({K}) must be <= the scheduler's num_train_timesteps ({self.num_train_timesteps})")
        self.scheduler.set_timesteps(K)
        self.drops_final_step = self._step_scalars(K - 1).std < _MIN_STD
        if self.drops_final_step:
            if K + 1 > self.num_train_timesteps:
                raise ValueError(
                    f"num_steps ({K}) must be < num_train_timesteps ({self.num_train_timesteps}): the scheduler's last step "
                    "is deterministic, so the chain needs one more timestep"
                )
            self.scheduler.set_timesteps(K + 1)
        steps = [self._step_scalars(k) for k in range(K)]
        zero = [k for k, s in enumerate(steps) if s.std < _MIN_STD]
        if zero:
            raise ValueError(
                f"steps {zero} of the {self.kind.upper()} scheduler are deterministic (std 0); the chain needs Gaussian "
                "transitions: check the scheduler's timestep_spacing / steps_offset or use fewer num_steps"
            )
        jumps = [k for k in range(K - 1) if steps[k].prev_timestep != steps[k + 1].timestep]
        if jumps:
            warnings.warn(
                f"the scheduler's timestep_spacing {self.scheduler.config.timestep_spacing!r} lands step {jumps[0]} on "
                f"timestep {steps[jumps[0]].prev_timestep} but evaluates the next step at {steps[jumps[0] + 1].timestep} "
                "(as the diffusers pipeline does); use timestep_spacing='leading' for a consistent chain",
                stacklevel=3,
            )
        return steps

    # -- the interface --------------------------------------------------------------------------------
    def _level_alpha_bar(self, level: int) -> float:
        """alphas_cumprod of level `level` in [0, K]: where step `level` starts, or where the chain ends."""
        if level < self.num_steps:
            return self._steps[level].alpha_bar
        return self._steps[-1].alpha_bar_prev

    def _level_timestep(self, level: int) -> int:
        if level < self.num_steps:
            return self._steps[level].timestep
        return max(self._steps[-1].prev_timestep, 0)

    def time(self, k: int) -> float:
        """Generative time t_k = 1 - tau_k / num_train_timesteps of level k in [0, K]."""
        return 1.0 - self._level_timestep(k) / self.num_train_timesteps

    def dt(self, k: int) -> float:
        return self.time(k + 1) - self.time(k)

    def std(self, k: int) -> float:
        return self._steps[k].std

    def noise_kernel(self, k: int) -> tuple[float, float]:
        """Forward kernel level k+1 -> k: (sqrt(ab_k / ab_{k+1}), sqrt(1 - ab_k / ab_{k+1}))."""
        ratio = self._level_alpha_bar(k) / self._level_alpha_bar(k + 1)
        return math.sqrt(ratio), math.sqrt(1.0 - ratio)

    def model_output(self, k: int, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """The UNet's raw prediction at step k (what `scheduler.step` takes as model_output), shape of x."""
        if not 0 <= k < self.num_steps:
            raise IndexError(f"step k must be in [0, {self.num_steps}) (got {k})")
        self.check_state(x)
        tau = self._steps[k].timestep
        if self.conditional:
            return self.unet(x, tau, encoder_hidden_states=self._unet_cond(x, cond)).sample
        if self.class_conditional:
            return self.unet(x, tau, class_labels=self._class_labels(self._unet_cond(x, cond))).sample
        if cond is not None:
            raise ValueError("cond was given but the UNet2DModel is unconditional; pass cond=None")
        return self.unet(x, tau).sample

    def _unet_cond(self, x: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        """cond as (B, *cond_shape); a flat (B, prod(cond_shape)) one (a task's condition vectors) is reshaped."""
        b, shape = x.shape[0], self.cond_shape
        if cond is not None and cond.ndim == 2 and len(shape) > 1 and tuple(cond.shape) == (b, math.prod(shape)):
            cond = cond.reshape(b, *shape)
        if cond is None or tuple(cond.shape) != (b, *shape):
            got = None if cond is None else tuple(cond.shape)
            what = "encoder_hidden_states" if self.conditional else "a one-hot class label"
            raise ValueError(f"this {type(self.unet).__name__} needs cond = {what} of shape {(b, *shape)} (got {got})")
        return cond

    @staticmethod
    def _class_labels(cond: torch.Tensor) -> torch.Tensor:
        """The class indices (B,) of one-hot rows; anything else is refused (the embedding takes integer labels)."""
        if not ((cond == 0) | (cond == 1)).all() or not (cond.sum(-1) == 1).all():
            raise ValueError("a class-conditional UNet's cond must be one-hot rows (conditions: {train: [0, 3], "
                             "num_classes: C} gives them)")
        return cond.argmax(-1)

    def _predict(self, k: int, x: torch.Tensor, cond: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0_hat, eps_hat) at step k, before clipping (scheduler.step's pred_original_sample / pred_epsilon)."""
        out = self.model_output(k, x, cond)
        ab = self._steps[k].alpha_bar
        a, b = math.sqrt(ab), math.sqrt(1.0 - ab)
        kind = self.scheduler.config.prediction_type
        if kind == "epsilon":
            return (x - b * out) / a, out
        if kind == "v_prediction":
            return a * x - b * out, a * out + b * x
        return out, (x - a * out) / b  # "sample"

    def _clip(self, x0: torch.Tensor) -> torch.Tensor:
        config = self.scheduler.config
        if config.thresholding:
            return self.scheduler._threshold_sample(x0)
        if config.clip_sample:
            return x0.clamp(-config.clip_sample_range, config.clip_sample_range)
        return x0

    def _mean(self, k: int, x: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        s = self._steps[k]
        x0, eps = self._predict(k, x, cond)
        x0 = self._clip(x0)
        ab, abp = s.alpha_bar, s.alpha_bar_prev
        if self.kind == "ddpm":
            beta = 1.0 - ab / abp
            return (math.sqrt(abp) * beta / (1.0 - ab)) * x0 + (math.sqrt(ab / abp) * (1.0 - abp) / (1.0 - ab)) * x
        return math.sqrt(abp) * x0 + math.sqrt(max(1.0 - abp - s.std**2, 0.0)) * eps

    def mean(self, k: int, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """The pretrained (base) transition mean m_k(x), differentiable in x; a LoRA, if any, is switched off."""
        shared, self._shared = self._shared, None
        if shared is not None and shared[0] == k and shared[1] is x and shared[2] == x._version and shared[3] is cond \
                and shared[5] == torch.is_grad_enabled():
            return shared[4]  # computed by the LoRA control for this very x a moment ago (one UNet call saved)
        with self._adapters_enabled(False):
            return self._mean(k, x, cond)

    def _shared_mean(self, k: int, x: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        """The base mean, kept for the next `mean(k, x, cond)` call only (the transition after a control)."""
        self._shared = None
        m = self.mean(k, x, cond)
        self._shared = (k, x, x._version, cond, m, torch.is_grad_enabled())
        return m

    def score(self, k: int, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """Pretrained score -eps_hat / sqrt(1 - ab) at the level of step k's start."""
        with self._adapters_enabled(False):
            _, eps = self._predict(k, x, cond)
        return -eps / math.sqrt(1.0 - self._steps[k].alpha_bar)

    def ode_step(self, k: int, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """DDIM eta = 0 step between the same timesteps as step k (pretrained model)."""
        s = self._steps[k]
        with self._adapters_enabled(False):
            x0, eps = self._predict(k, x, cond)
        return math.sqrt(s.alpha_bar_prev) * self._clip(x0) + math.sqrt(1.0 - s.alpha_bar_prev) * eps

    def score_coefficients(self, k: int) -> tuple[float, float] | None:
        """(c_mean, c_ode) of the score in mean and ODE step (eps = -sqrt(1 - ab) score, x0_hat = (x - sqrt(1 - ab) eps)
        / sqrt(ab) for every prediction type); None when x0_hat is clipped (the mean is then not affine in it)."""
        config = self.scheduler.config
        if config.thresholding or config.clip_sample:
            return None
        s = self._steps[k]
        ab, abp = s.alpha_bar, s.alpha_bar_prev
        b2 = 1.0 - ab
        via_x0 = math.sqrt(abp) * b2 / math.sqrt(ab)  # d(sqrt(ab') x0_hat) / d score
        if self.kind == "ddpm":
            c_mean = via_x0 * (1.0 - ab / abp) / (1.0 - ab)  # DDPM: x0_hat enters with sqrt(ab') beta / (1 - ab)
        else:
            c_mean = via_x0 - math.sqrt(max(1.0 - abp - s.std**2, 0.0)) * math.sqrt(b2)
        return c_mean, via_x0 - math.sqrt(1.0 - abp) * math.sqrt(b2)

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "DiffusersChain":
        super().to(device, dtype)
        torch.nn.Module.to(self.unet, device=self.device, dtype=self.dtype)  # ModelMixin.to only adds a warning
        self._shared = None
        return self


def build_diffusers_model(cfg, num_steps: int) -> DiffusersChain:
    """The registry's ``model: {type: diffusers, path: ...}`` builder (cfg a `rlft.config.DiffusersModelConfig`)."""
    return DiffusersChain.from_pretrained(
        cfg.path, num_steps=num_steps, scheduler=cfg.scheduler, eta=cfg.eta,
        subfolder_unet=cfg.subfolder_unet, subfolder_scheduler=cfg.subfolder_scheduler, cond_seq_len=cfg.cond_seq_len,
    )
