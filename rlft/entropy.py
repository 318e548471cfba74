"""Entropy of a chain's samples by the probability-flow ODE, and exact entropies of tempered densities.

Log-density along the deterministic sampler (S-MEME eq. 38; Song et al. 2021, App. D.2). The chain's
deterministic step x_{k+1} = F_k(x_k) (`DiffusionModel.ode_step`: DDIM eta = 0, the PF-ODE discretised) is an
invertible map near the identity, so the density of its pushforward is exact by the change of variables:

    log p_K(x_K) = log nu(x_0) - sum_k log |det dF_k/dx (x_k)|,        H = -E[log p_K(x_K)]

Notation: x_0 ~ nu (the chain's prior), F_k the ODE step k, J_k = dF_k/dx (D x D), H the entropy (nats).
Sign: the ODE step of a VP chain contracts towards the data (|det J_k| > 1 where the flow spreads the prior, < 1
where it concentrates), and minus the log-determinant is what the continuous form "+ int div f dt" of eq. 38 gives
once the time direction (noise -> data here) is taken into account; tests/test_entropy.py pins it where log p is
exact (a Gaussian mixture, by quadrature).

Divergence: `exact` builds J_k by D vector-Jacobian products (low dimension, default for D <= EXACT_MAX_DIM);
`hutchinson` uses log|det J_k| ~ tr(J_k - I) (first order in the step, exact as K -> infinity, the continuous
divergence integral) with Rademacher probes. The estimate is that of the deterministic sampler's law, which
matches the stochastic chain's as the steps shrink (both have the same marginals in continuous time).

Exact entropies of tempered densities q ∝ p^beta (S-MEME's round targets): closed form for one Gaussian
(p = N(m, s^2 I) -> q = N(m, s^2 / beta I), H = d/2 log(2 pi e s^2 / beta)); grid quadrature and grid sampling in
one or two dimensions (`TemperedGrid`).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from rlft.models.base import ControlledChain, DiffusionModel

#: events up to this many scalars use the exact Jacobian log-determinant by default
EXACT_MAX_DIM = 16
DIVERGENCES = ("auto", "exact", "hutchinson")


# -- the probability-flow ODE --------------------------------------------------------------------------------


def _log_det_exact(step: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(F(x) (B, *event), log|det dF/dx| (B,)) by D vector-Jacobian products."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        y = step(x)
        flat = y.reshape(y.shape[0], -1)  # (B, D)
        rows = []
        for i in range(flat.shape[1]):
            (g,) = torch.autograd.grad(flat[:, i].sum(), x, retain_graph=i + 1 < flat.shape[1])
            rows.append(g.reshape(g.shape[0], -1))
        jac = torch.stack(rows, dim=1)  # (B, D, D): jac[b, i, j] = d y_i / d x_j
    return y.detach(), torch.linalg.slogdet(jac)[1]


def _log_det_hutchinson(step: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, probes: int,
                        generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(F(x), tr(dF/dx - I) (B,)) with `probes` Rademacher vectors: E[v^T (J - I) v] = tr(J - I)."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        y = step(x)
        est = x.new_zeros(x.shape[0])
        for i in range(probes):
            v = torch.randint(0, 2, x.shape, generator=generator, device=x.device).to(x.dtype) * 2 - 1
            (jv,) = torch.autograd.grad(y, x, v, retain_graph=i + 1 < probes)  # v^T J
            est = est + ((jv - v) * v).flatten(1).sum(1) / probes
    return y.detach(), est.detach()


def ode_log_prob(model: DiffusionModel, n: int, seed: int = 0, divergence: str = "auto",
                 probes: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples of the deterministic (PF-ODE) sampler and their log-density under its law.

    Args:
        model: the chain (a `ControlledChain` for a fine-tuned sampler: its ode_step carries the control).
        n: samples.
        seed: seed of x_0 (and of the Hutchinson probes).
        divergence: exact | hutchinson | auto (exact for events of <= EXACT_MAX_DIM scalars).
        probes: Rademacher probes per step for hutchinson.
    Returns:
        (x_K (n, *event), log p_K(x_K) (n,)), detached.
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {list(DIVERGENCES)} (got {divergence!r})")
    if divergence == "auto":
        divergence = "exact" if model.event_dim <= EXACT_MAX_DIM else "hutchinson"
    gen = torch.Generator(device=model.device).manual_seed(seed)
    x = model.prior_sample(n, gen)
    log_p = model.prior_log_prob(x).detach()
    for k in range(model.num_steps):
        step = lambda y, k=k: model.ode_step(k, y)  # noqa: E731
        if divergence == "exact":
            x, log_det = _log_det_exact(step, x)
        else:
            x, log_det = _log_det_hutchinson(step, x, probes, gen)
        log_p = log_p - log_det  # change of variables: p_{k+1}(F(x)) = p_k(x) / |det J|
    return x, log_p


def ode_entropy(model: DiffusionModel, n: int = 2000, seed: int = 0, divergence: str = "auto", probes: int = 1,
                control=None) -> float:
    """H = -E[log p_K(x_K)] of the deterministic sampler (of `ControlledChain(model, control)` when control given)."""
    chain = ControlledChain(model, control) if control is not None else model
    _, log_p = ode_log_prob(chain, n, seed, divergence, probes)
    return float(-log_p.double().mean())


# -- the entropy of samples: nearest neighbours ----------------------------------------------------------------


def knn_entropy(x: torch.Tensor, k: int = 1, block: int = 1024) -> float:
    """Kozachenko-Leonenko estimate of the entropy of the law of samples x (n, *event), nats:

        H ~ psi(n) - psi(k) + log V_d + d/n sum_i log eps_i,      V_d = pi^{d/2} / Gamma(d/2 + 1),

    eps_i the distance from x_i to its k-th nearest other sample. Consistent for any law with a density; its bias
    grows with d and with sharp features (use it in low dimension). It sees the stochastic sampler's law, which the
    PF-ODE estimate (`ode_entropy`) matches only where the control is exact (a learned control's ODE and SDE laws
    differ away from the optimum)."""
    flat = x.detach().reshape(x.shape[0], -1).double()
    n, d = flat.shape
    if not 1 <= k < n:
        raise ValueError(f"k must be in [1, n - 1] (got k = {k}, n = {n})")
    logs = []
    for i in range(0, n, block):
        dist = torch.cdist(flat[i : i + block], flat)  # (b, n)
        dist[torch.arange(dist.shape[0]), torch.arange(i, i + dist.shape[0])] = float("inf")
        logs.append(torch.log(dist.topk(k, dim=1, largest=False).values[:, -1]))
    log_ball = 0.5 * d * math.log(math.pi) - math.lgamma(0.5 * d + 1.0)
    digamma = torch.special.digamma(torch.tensor([float(n), float(k)], dtype=torch.float64))
    return float(digamma[0] - digamma[1] + log_ball + d * torch.cat(logs).mean())


# -- exact entropies of tempered densities ----------------------------------------------------------------------


def gaussian_entropy(dim: int, var: float) -> float:
    """H of N(m, var I) in `dim` dimensions: d/2 log(2 pi e var)."""
    return 0.5 * dim * math.log(2 * math.pi * math.e * var)


class TemperedGrid:
    """q(x) ∝ p(x)^beta on a regular grid in 1 or 2 dimensions: its entropy by quadrature and samples from it.

    Args:
        log_prob: log p (unnormalised is fine), (M, D) -> (M,), float64.
        lower, upper: the box (D,) that holds all but a negligible part of q.
        beta: the exponent (> 0).
        cells: cells per dimension.
    """

    def __init__(self, log_prob: Callable[[torch.Tensor], torch.Tensor], lower, upper, beta: float,
                 cells: int = 400) -> None:
        if not beta > 0:
            raise ValueError(f"beta must be > 0 (got {beta}): p^beta is not normalisable otherwise on an unbounded support")
        lower = torch.as_tensor(lower, dtype=torch.float64)
        upper = torch.as_tensor(upper, dtype=torch.float64)
        dim = lower.numel()
        if dim not in (1, 2):
            raise ValueError(f"grid quadrature is for 1 or 2 dimensions (got {dim})")
        self.width = (upper - lower) / cells  # (D,)
        axes = [lower[i] + (torch.arange(cells, dtype=torch.float64) + 0.5) * self.width[i] for i in range(dim)]
        self.centres = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, dim)  # (cells^D, D)
        self.cell_volume = float(self.width.prod())
        log_q = beta * log_prob(self.centres).double()  # (M,)
        self.log_q = log_q - torch.logsumexp(log_q, 0) - math.log(self.cell_volume)  # normalised density
        self.mass = torch.softmax(log_q, 0)  # (M,) cell masses

    def entropy(self) -> float:
        """-int q log q, midpoint rule."""
        return float(-(self.mass * self.log_q).sum())

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n samples: a cell by its mass, then uniform inside it. (n, D) float64."""
        idx = torch.multinomial(self.mass, n, replacement=True, generator=generator)
        jitter = torch.rand(n, self.centres.shape[1], generator=generator, dtype=torch.float64) - 0.5
        return self.centres[idx] + jitter * self.width
