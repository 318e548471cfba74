"""The one model interface (DESIGN.md "One model interface").

A pretrained diffusion model is a chain of K Gaussian transitions. Step k takes x_k (at noise level k)
to x_{k+1} ~ N(m_k(x_k, c), s_k^2 I). Fine-tuning adds a displacement delta_k to the mean; the per-step
KL to the pretrained chain is exactly |delta_k|^2 / (2 s_k^2) (see `rlft.sampling.step_kl`).

Everything above the core asks a model only for what `DiffusionModel` declares here: the prior, the
transition mean and std, the score at the level of step k, the deterministic (ODE/DDIM) step, the forward
noising kernel between adjacent levels, and the generative time of step k.

Shapes: a batch of states is (B, *event_shape); conditioning, when a model has it, is (B, *cond_shape).
"""

from __future__ import annotations

import abc
import math

import torch

from rlft.schedule import LevelCoefficients


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

    def mean_from_score(self, k: int, x: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        """The transition mean for a given score (how an exact tilted score becomes a target chain)."""
        c = self.coefficients
        return c.mean_x[k] * x + c.mean_score[k] * score
