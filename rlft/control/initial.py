"""The learned initial distribution of ELEGANT: a controlled SDE on [-T, 0] from a fixed point (eq. 8-10).

Reference SDE (eq. 8 with q = 0):  dx_t = sigma~ dw_t on [-T, 0], x_{-T} = x_fix = 0, sigma~ = 1/sqrt(T),
so x_0 ~ N(0, T sigma~^2 I) = nu_ini = N(0, I) exactly, also after discretisation. With J steps of size
h = T/J it is a Gaussian chain like the pretrained one (`BrownianChain`): mean m_j(x) = x, std s = sigma~
sqrt(h) = 1/sqrt(J). The control q enters as delta_j = q h = s^2 g_phi(t_j, x_j) (u = sigma~^2 g, `rlft.control.networks`), the
per-step KL is |delta_j|^2 / (2 s^2) (`rlft.sampling.step_kl`) and the chain is simulated with
`rlft.sampling.rollout`, so the initial law and the drift share one implementation of the dynamics.

Eq. 10 (maximised by `InitialControl.objective`):

    max_q  E[ a(x_0) - alpha/2 int_{-T}^0 |q|^2 / sigma~^2 dt ]  ~=  E[ a(x_0) - alpha sum_j KL_j ]

with a ~ v*_0 the value network (rlft.control.value). Theorem 2: at the optimum x_0 ~ nu* ∝ nu_ini exp(v*_0/alpha).
The per-sample KL returned with each x_0 is the discrete path KL sum_j KL_j; its mean is an upper bound of
KL(nu || nu_ini) (data processing), with equality at the optimum, where the bridge is preserved.

In a conditional task the control takes the condition, q(t, x, c), and the value a(x_0, c): nu_hat(.|c) ∝
nu_ini exp(v*_0(., c)/alpha) at the optimum, one law per condition from one network (`cond_shape`).

Notation: J `num_steps`, h step size, sigma~ `std` * sqrt(1/h), x_fix = 0, c `cond` (B, d).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from rlft.control.networks import NetworkControl, VectorControlNet
from rlft.models.base import DiffusionModel
from rlft.sampling import rollout


class BrownianChain(DiffusionModel):
    """The reference SDE dx = sigma~ dw on [-T, 0] from x_fix = 0 as a J-step Gaussian chain (x_0 ~ N(0, I)).

    Level j holds x at time t_j = -T + j h with marginal N(0, v_j I), v_j = j / J. Its score, ODE step and
    reverse kernel are exact for that Gaussian (level 0 is the point x_fix, where they are undefined).
    """

    def __init__(self, event_shape: tuple[int, ...], num_steps: int, horizon: float = 1.0) -> None:
        super().__init__(num_steps)
        if not horizon > 0:
            raise ValueError(f"horizon T of the initial-distribution SDE must be > 0 (got {horizon})")
        self.event_shape = tuple(event_shape)
        self.horizon = float(horizon)
        self._std = 1.0 / math.sqrt(num_steps)  # sigma~ sqrt(h), sigma~ = 1/sqrt(T), h = T/J

    def prior_sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """x_{-T} = x_fix = 0, shape (n, *event)."""
        return torch.zeros((n, *self.event_shape), device=self.device, dtype=self.dtype)

    def prior_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("the initial-distribution SDE starts at the point x_fix = 0, which has no density")

    def _var(self, j: int) -> float:
        return j / self.num_steps

    def time(self, k: int) -> float:
        return -self.horizon + k * self.horizon / self.num_steps

    def dt(self, k: int) -> float:
        return self.horizon / self.num_steps

    def std(self, k: int) -> float:
        return self._std

    def mean(self, k: int, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        return x

    def score(self, k: int, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        if k == 0:
            raise ValueError("level 0 of the initial-distribution SDE is the point x_fix: its score is undefined")
        return -x / self._var(k)

    def ode_step(self, k: int, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        if k == 0:
            raise ValueError("level 0 of the initial-distribution SDE is the point x_fix: no ODE step leaves it")
        return x * math.sqrt(self._var(k + 1) / self._var(k))

    def noise_kernel(self, k: int) -> tuple[float, float]:
        """The Brownian bridge back toward x_fix: x_k = (v_k/v_{k+1}) x_{k+1} + sqrt(v_k (1 - v_k/v_{k+1})) eps."""
        ratio = self._var(k) / self._var(k + 1)
        return ratio, math.sqrt(self._var(k) * (1.0 - ratio))


class InitialControl(nn.Module):
    """nu_hat: the controlled SDE dx = q dt + sigma~ dw on [-T, 0] (ELEGANT eq. 8, Alg. 2 step 1).

    Implements `rlft.sampling.InitialDistribution`: `init_sample(n, generator) -> (x_0, kl)`. Differentiable
    in its parameters when called with gradients enabled (reparameterised noise).
    """

    def __init__(self, model: DiffusionModel, num_steps: int = 50, hidden: int = 128, depth: int = 3,
                 cond_shape: tuple[int, ...] | None = None) -> None:
        """`cond_shape`: the shape of one condition (a conditional task's (d,), or a conditional model's); None with
        an unconditional model = unconditional."""
        super().__init__()
        cond_shape = cond_shape if cond_shape is not None else model.cond_shape
        self.cond_shape = tuple(cond_shape) if cond_shape is not None else None
        self.chain = BrownianChain(model.event_shape, num_steps).to(model.device, model.dtype)
        self.net = VectorControlNet(model.event_shape, self.cond_shape, hidden=hidden, depth=depth)
        self.control = NetworkControl(self.chain, self.net, scales=[self.chain.std(j) ** 2 for j in range(num_steps)])

    def init_sample(self, n: int, generator: torch.Generator | None = None, cond: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x_0 ~ nu_hat(.|c) (n, *event) and the per-sample path KL of the SDE (n,) (eq. 10's penalty / alpha).

        cond: (n, *cond_shape), one condition per sample; required when the control was built conditional."""
        if self.cond_shape is not None and cond is None:
            raise ValueError("this initial law takes the condition: call init_sample(n, generator, cond) with cond (n, d)")
        x_fix = self.chain.prior_sample(n)
        out = rollout(self.chain, x_fix, self.control, cond=cond, generator=generator)
        return out.x, out.kl

    def objective(self, value: nn.Module, alpha: float, n: int, generator: torch.Generator,
                  cond: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """Monte-Carlo estimate of eq. 10, E[a(x_0, c)] - alpha E[KL], to maximise; with its parts as floats.
        cond: (n, d) conditions of the n samples (a conditional task's training conditions) or None."""
        x0, kl = self.init_sample(n, generator, cond)
        a = value(x0, cond) if cond is not None else value(x0)
        obj = a.mean() - alpha * kl.mean()
        return obj, {"init_value": float(a.detach().mean()), "init_kl": float(kl.detach().mean())}
