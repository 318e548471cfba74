"""Time conventions of the platform, in ONE place (MATH.md §1).

Generative time t runs over [0, T]: x at t = 0 is noise (the prior), x at t = T is data. The forward
(noising) VP-SDE runs in noise time s = T - t:

    dy_s = -1/2 beta(s) y_s ds + sqrt(beta(s)) dw_s,   beta(s) = beta_min + (beta_max - beta_min) s / T
    a(s) = exp(-1/2 int_0^s beta),                     y_s | y_0 ~ N(a(s) y_0, (1 - a(s)^2) I)

A chain of K steps visits the noise levels s_0 = T > s_1 > ... > s_K = s_min (uniform in t); step k takes
x at level s_k to level s_{k+1}. Every model (analytic mixture, score network, diffusers UNet) maps its
step index k to its own noise parameterisation through this module or, for diffusers schedulers, through
the one method `DiffusersChain._timestep` (MATH.md §1: "in exactly one place").

Notation: ``alpha_bar(s) = a(s)^2`` (diffusers' ``alphas_cumprod``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class VPSchedule:
    """Linear-beta VP schedule and the K-step grid of noise levels a chain walks down."""

    beta_min: float = 0.1
    """beta at noise time s = 0."""
    beta_max: float = 20.0
    """beta at noise time s = T."""
    T: float = 1.0
    """Horizon of generative time."""
    s_min: float = 1e-3
    """Last noise level, as a fraction of T (the chain stops just above data so every step stays stochastic)."""

    def __post_init__(self) -> None:
        if not (0 < self.beta_min <= self.beta_max):
            raise ValueError(f"schedule needs 0 < beta_min <= beta_max (got {self.beta_min}, {self.beta_max})")
        if self.T <= 0:
            raise ValueError(f"schedule T must be > 0 (got {self.T})")
        if not (0 < self.s_min < 1):
            raise ValueError(f"schedule s_min must be in (0, 1) as a fraction of T (got {self.s_min})")

    def beta(self, s: float) -> float:
        """beta(s) at noise time s."""
        return self.beta_min + (self.beta_max - self.beta_min) * s / self.T

    def log_a(self, s: float) -> float:
        """log a(s) = -1/2 int_0^s beta."""
        return -0.5 * (self.beta_min * s + 0.5 * (self.beta_max - self.beta_min) * s * s / self.T)

    def alpha_bar(self, s: float) -> float:
        """a(s)^2, the signal fraction of the forward marginal at noise time s."""
        return math.exp(2.0 * self.log_a(s))

    def levels(self, num_steps: int) -> torch.Tensor:
        """Noise levels s_0 = T > ... > s_K = s_min * T, float64, shape (K+1,)."""
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1 (got {num_steps})")
        return torch.linspace(self.T, self.s_min * self.T, num_steps + 1, dtype=torch.float64)


@dataclass(frozen=True)
class LevelCoefficients:
    """Per-step scalars of the DDPM posterior (ancestral, eta = 1) and DDIM (eta = 0) steps, float64 lists.

    For step k from level s = s_k to s' = s_{k+1}, with ab = alpha_bar(s), ab' = alpha_bar(s'),
    alpha = ab / ab', beta = 1 - alpha, and the Tweedie estimate x0 = (x + (1 - ab) score) / sqrt(ab):

        mean = sqrt(ab') beta / (1 - ab) * x0 + sqrt(alpha) (1 - ab') / (1 - ab) * x      (DDPM eq. 7)
        std  = sqrt(beta)                          variance="large" (DDPM's sigma^2 = beta, the default)
        std  = sqrt((1 - ab') / (1 - ab) * beta)   variance="small" (the posterior variance)
        ode  = sqrt(ab') x0 - sqrt(1 - ab') sqrt(1 - ab) score                              (DDIM, eta = 0)
        forward kernel level s' -> s:  x_s = sqrt(alpha) x_s' + sqrt(beta) eps
    """

    alpha_bar: list[float]  # (K+1,)
    times: list[float]  # generative times t_k = T - s_k, (K+1,)
    dt: list[float]  # s_k - s_{k+1}, (K,)
    mean_x: list[float]  # coefficient of x in the mean, (K,)
    mean_score: list[float]  # coefficient of the score in the mean, (K,)
    std: list[float]  # (K,)
    ode_x: list[float]  # (K,)
    ode_score: list[float]  # (K,)
    kernel_scale: list[float]  # forward kernel level k+1 -> k: scale, (K,)
    kernel_std: list[float]  # forward kernel level k+1 -> k: std, (K,)

    @staticmethod
    def from_alpha_bars(alpha_bar: list[float], times: list[float], variance: str = "large") -> "LevelCoefficients":
        """Builds the coefficients from alpha_bar at the K+1 levels (decreasing noise).

        The exact reverse variance of Gaussian data N(0, v0) is beta * v_{s'} / v_s, between "small"
        (v0 -> 0) and "large" (v0 = 1). Measured on a 2-D mixture at K = 100 (stds 0.4, oracle control):
        "large" reaches 0.98 of the gap to J* and 1.4x the exact-vs-exact energy-distance floor, "small"
        0.97 and 2.3x (its samples are under-dispersed by ~15 % in variance), so "large" is the default.
        """
        if variance not in ("large", "small"):
            raise ValueError(f"variance must be 'large' or 'small' (got {variance!r})")
        mean_x, mean_score, std, ode_x, ode_score, kscale, kstd, dt = [], [], [], [], [], [], [], []
        for k in range(len(alpha_bar) - 1):
            ab, ab_next = alpha_bar[k], alpha_bar[k + 1]
            alpha = ab / ab_next
            beta = 1.0 - alpha
            # mean = c0 * x0 + cx * x with x0 = (x + (1 - ab) score) / sqrt(ab)
            c0 = math.sqrt(ab_next) * beta / (1.0 - ab)
            cx = math.sqrt(alpha) * (1.0 - ab_next) / (1.0 - ab)
            mean_x.append(cx + c0 / math.sqrt(ab))
            mean_score.append(c0 * (1.0 - ab) / math.sqrt(ab))
            std.append(math.sqrt(beta if variance == "large" else (1.0 - ab_next) / (1.0 - ab) * beta))
            # ode = sqrt(ab') x0 + sqrt(1 - ab') eps,  eps = -sqrt(1 - ab) score
            ode_x.append(math.sqrt(ab_next) / math.sqrt(ab))
            ode_score.append(math.sqrt(ab_next) * (1.0 - ab) / math.sqrt(ab) - math.sqrt(1.0 - ab_next) * math.sqrt(1.0 - ab))
            kscale.append(math.sqrt(alpha))
            kstd.append(math.sqrt(beta))
            dt.append(times[k + 1] - times[k])
        return LevelCoefficients(list(alpha_bar), list(times), dt, mean_x, mean_score, std, ode_x, ode_score, kscale, kstd)

    @staticmethod
    def from_schedule(schedule: VPSchedule, num_steps: int) -> "LevelCoefficients":
        levels = schedule.levels(num_steps).tolist()
        return LevelCoefficients.from_alpha_bars(
            [schedule.alpha_bar(s) for s in levels], [schedule.T - s for s in levels]
        )
