"""The one model interface (DESIGN.md "One model interface").

A pretrained diffusion model is a chain of K Gaussian transitions. Step k takes x_k (at noise level k)
to x_{k+1} ~ N(m_k(x_k, c), s_k^2 I). Fine-tuning adds a displacement delta_k to the mean; the per-step
KL to the pretrained chain is exactly |delta_k|^2 / (2 s_k^2) (see `rlft.sampling.step_kl`).

Everything above the core asks a model only for what `DiffusionModel` declares here: the prior, the
transition mean and std, the score at the level of step k, the deterministic (ODE/DDIM) step, the forward
noising kernel between adjacent levels, and the generative time of step k.

`ControlledChain(base, control)` is the fine-tuned sampler as a model: its mean is the base mean plus the
control's displacement, so it can be the reference of the next fine-tuning round (S-MEME), an env's model, or
an evaluation's model.

Shapes: a batch of states is (B, *event_shape); conditioning, when a model has it, is (B, *cond_shape).
"""

from __future__ import annotations

import abc
import math
from typing import Callable, Protocol

import torch

from rlft.schedule import LevelCoefficients


class InitialDistribution(Protocol):
    """A (learned) initial law nu: samples x_0 with a per-sample KL contribution to KL(nu || nu_ini).

    (Defined here, below the sampler, so a model can take one; `rlft.sampling` re-exports it.)"""

    def init_sample(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (x_0 (n, *event), kl (n,)) whose mean estimates (an upper bound of) KL(nu || nu_ini)."""
        ...


#: delta_k = control(k, x_k, cond), same shape as x_k (the `rlft.sampling.Control` signature)
ControlFn = Callable[[int, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


class DiffusionModel(abc.ABC):
    """A pretrained diffusion model seen as a K-step Gaussian transition chain (float32 by default)."""

    #: Shape of one sample, e.g. (D,) for vectors, (L, 4) for one-hot sequences, (C, H, W) for images.
    event_shape: tuple[int, ...]
    #: Shape of one conditioning vector, or None for unconditional models.
    cond_shape: tuple[int, ...] | None = None

    def __init__(self, num_steps: int) -> None:
        if not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be an integer >= 1 (got {num_steps!r})")
        self.num_steps = num_steps
        self.device = torch.device("cpu")
        self.dtype = torch.float32

    # -- the interface ---------------------------------------------------------------------------
    @property
    def event_dim(self) -> int:
        """Number of scalars in one sample."""
        return math.prod(self.event_shape)

    def prior_sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """x_0 ~ nu_ini = N(0, I), shape (n, *event_shape)."""
        return torch.randn((n, *self.event_shape), generator=generator, device=self.device, dtype=self.dtype)

    def prior_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log N(x; 0, I) summed over the event, shape (B,)."""
        flat = x.reshape(x.shape[0], -1)
        return -0.5 * (flat**2).sum(-1) - 0.5 * flat.shape[-1] * math.log(2 * math.pi)

    @abc.abstractmethod
    def time(self, k: int) -> float:
        """Generative time t_k in [0, T] of step k's start (t_0 = 0 is noise)."""

    @abc.abstractmethod
    def mean(self, k: int, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """Pretrained transition mean m_k(x_k, c), same shape as x."""

    @abc.abstractmethod
    def std(self, k: int) -> float:
        """Pretrained transition std s_k (a scalar: the covariance is s_k^2 I)."""

    @abc.abstractmethod
    def score(self, k: int, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """grad_x log q(x) at the noise level of step k's start, same shape as x."""

    @abc.abstractmethod
    def ode_step(self, k: int, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """Deterministic (probability-flow ODE / DDIM eta=0) step from level k to level k+1."""

    @abc.abstractmethod
    def noise_kernel(self, k: int) -> tuple[float, float]:
        """Forward noising kernel from level k+1 up to level k: x_k = scale * x_{k+1} + std * eps."""

    @abc.abstractmethod
    def dt(self, k: int) -> float:
        """Generative time elapsed in step k (t_{k+1} - t_k); controls u(t, x) enter as delta = u * dt."""

    def score_coefficients(self, k: int) -> tuple[float, float] | None:
        """(c_mean, c_ode): the coefficients of the score in the transition mean and in the ODE step of step k,
        where both are affine in the score (m_k = ... + c_mean score, ode = ... + c_ode score); None where they
        are not (e.g. a clipped diffusers scheduler). A score shift g then moves the mean by c_mean g."""
        return None

    # -- helpers built on the interface -----------------------------------------------------------
    def noise_step(self, k: int, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Adds noise up one level (level k+1 -> level k) with the forward kernel."""
        scale, std = self.noise_kernel(k)
        eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return scale * x + std * eps

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "DiffusionModel":
        """Sets the device and dtype of the states this model produces; subclasses with modules extend this."""
        if device is not None:
            self.device = torch.device(device)
        if dtype is not None:
            self.dtype = dtype
        return self

    def check_state(self, x: torch.Tensor, name: str = "x") -> None:
        """Raises a clear error if x is not a batch of this model's samples."""
        if not isinstance(x, torch.Tensor) or tuple(x.shape[1:]) != tuple(self.event_shape):
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name} must have shape (B, {', '.join(map(str, self.event_shape))}) (got {shape})")


class CoefficientChain(DiffusionModel):
    """A chain whose steps are the DDPM posterior (eta=1) and DDIM (eta=0) updates of a score model.

    Subclasses provide `level_score(k, x, cond)` and the `LevelCoefficients`; the mean, std, ODE step and
    forward kernel then follow from `rlft.schedule.LevelCoefficients` (the formulas are documented there).
    """

    def __init__(self, coefficients: LevelCoefficients) -> None:
        super().__init__(len(coefficients.std))
        self.coefficients = coefficients

    @abc.abstractmethod
    def score(self, k: int, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor: ...

    def time(self, k: int) -> float:
        return self.coefficients.times[k]

    def dt(self, k: int) -> float:
        return self.coefficients.dt[k]

    def std(self, k: int) -> float:
        return self.coefficients.std[k]

    def mean(self, k: int, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        c = self.coefficients
        return c.mean_x[k] * x + c.mean_score[k] * self.score(k, x, cond)

    def ode_step(self, k: int, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        c = self.coefficients
        return c.ode_x[k] * x + c.ode_score[k] * self.score(k, x, cond)

    def noise_kernel(self, k: int) -> tuple[float, float]:
        return self.coefficients.kernel_scale[k], self.coefficients.kernel_std[k]

    def score_coefficients(self, k: int) -> tuple[float, float]:
        return self.coefficients.mean_score[k], self.coefficients.ode_score[k]

    def mean_from_score(self, k: int, x: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        """The transition mean for a given score (how an exact tilted score becomes a target chain)."""
        c = self.coefficients
        return c.mean_x[k] * x + c.mean_score[k] * score


class ControlledChain(DiffusionModel):
    """The chain `base` run with a control: m_k(x) = m_k^base(x) + delta_k(x), delta_k = control(k, x, cond).

    Itself a `DiffusionModel` (a fine-tuned sampler is a model), so it can be the reference of the next
    fine-tuning round (S-MEME), an env's model or an evaluation's model; a ControlledChain of a ControlledChain
    adds both controls. The step std, times and forward kernel are the base's. Where the base mean is affine in
    the score with coefficient c_k (`score_coefficients`), the control is the score shift delta_k / c_k:

        score_k(x) = score_k^base(x) + delta_k(x) / c_mean_k,      ode_k(x) = ode_k^base(x) + c_ode_k / c_mean_k delta_k(x)

    (for the GMM bed's `OptimalControl` this score is the forward-diffused tilted target's, exactly).
    `prior_sample` draws x_0 from `init` (an `rlft.sampling.InitialDistribution`) when given, else from the base.

    `rlft.sampling.sample(ControlledChain(base, u), n, seed=s)` gives the same states as
    `rlft.sampling.sample(base, n, control=u, seed=s)`; its KL is measured against the controlled chain itself
    (zero), the base's KL is the rollout's with `control=`.
    """

    def __init__(self, base: DiffusionModel, control: ControlFn, init: InitialDistribution | None = None) -> None:
        if not isinstance(base, DiffusionModel):
            raise TypeError(f"base must be a DiffusionModel (got {type(base).__name__})")
        if not callable(control):
            raise TypeError(f"control must be a callable (k, x, cond) -> delta (got {type(control).__name__})")
        if init is not None and not callable(getattr(init, "init_sample", None)):
            raise TypeError(f"init must have init_sample(n, generator) -> (x0, kl) (got {type(init).__name__})")
        self.num_steps = base.num_steps
        self.base, self.control, self.init = base, control, init
        self.event_shape = base.event_shape
        self.cond_shape = base.cond_shape

    # device and dtype are the base's: one source of truth when either is moved
    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return self.base.device

    @property
    def dtype(self) -> torch.dtype:  # type: ignore[override]
        return self.base.dtype

    @property
    def coefficients(self) -> LevelCoefficients:
        """The base's `LevelCoefficients` (times, alpha_bar, ...), for callers that read them (guidance)."""
        coefficients = getattr(self.base, "coefficients", None)
        if coefficients is None:
            raise AttributeError(f"the base chain {type(self.base).__name__} has no LevelCoefficients")
        return coefficients

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "ControlledChain":
        """Moves the base (and a control or init that is a torch module) to `device`; dtype applies to the base."""
        self.base.to(device, dtype)
        for part in (self.control, self.init):
            if isinstance(part, torch.nn.Module) and device is not None:
                part.to(device=device)
        return self

    def prior_sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.init is None:
            return self.base.prior_sample(n, generator)
        x0, _ = self.init.init_sample(n, generator)
        return x0.to(device=self.device, dtype=self.dtype)

    def prior_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        if self.init is None:
            return self.base.prior_log_prob(x)
        log_prob = getattr(self.init, "log_prob", None)
        if log_prob is None:
            raise NotImplementedError(
                f"the initial distribution {type(self.init).__name__} has no log_prob; its density is known only through "
                "the per-sample KL init_sample returns"
            )
        return log_prob(x)

    def time(self, k: int) -> float:
        return self.base.time(k)

    def dt(self, k: int) -> float:
        return self.base.dt(k)

    def std(self, k: int) -> float:
        return self.base.std(k)

    def noise_kernel(self, k: int) -> tuple[float, float]:
        return self.base.noise_kernel(k)

    def score_coefficients(self, k: int) -> tuple[float, float] | None:
        return self.base.score_coefficients(k)

    def mean(self, k: int, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        return self.base.mean(k, x, cond) + self.control(k, x, cond)

    def _score_shift(self, k: int, who: str) -> tuple[float, float]:
        coefficients = self.base.score_coefficients(k)
        if coefficients is None or coefficients[0] == 0:
            raise NotImplementedError(
                f"{who} of a ControlledChain needs a base whose mean is affine in the score "
                f"({type(self.base).__name__} step {k} is not: e.g. a clipped diffusers scheduler); use mean() instead"
            )
        return coefficients

    def score(self, k: int, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        c_mean, _ = self._score_shift(k, "score")
        return self.base.score(k, x, cond) + self.control(k, x, cond) / c_mean

    def ode_step(self, k: int, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        c_mean, c_ode = self._score_shift(k, "ode_step")
        return self.base.ode_step(k, x, cond) + (c_ode / c_mean) * self.control(k, x, cond)
