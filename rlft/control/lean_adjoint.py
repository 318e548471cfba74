"""The math of Adjoint Matching on rlft's chain (pure torch; the learner is rlft.control.adjoint_matching, whose
docstring gives the algorithm, the signs and the measurements): the reward gradient, the lean adjoint (one
vector-Jacobian product per step through the PRETRAINED mean), the regression terms, the chain's memory mu, and the
backward sweep's `FrontControl`.
"""

from __future__ import annotations

import torch

from rlft.models.base import DiffusionModel
from rlft.rewards.base import evaluate
from rlft.sampling import rollout

#: trajectories and prior samples of the memorylessness check
MEMORY_PROBES, MEMORY_PRIOR_SAMPLES = 16, 4096


# -- the math -------------------------------------------------------------------------------------


def reward_gradient(reward, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(r(x) (B,), grad_x r(x) (B, *event)), both detached."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        r = evaluate(reward, x)
        (grad,) = torch.autograd.grad(r.sum(), x)
    return r.detach(), grad.detach()


def lean_adjoint_step(model: DiffusionModel, k: int, x: torch.Tensor, a_next: torch.Tensor,
                      cond: torch.Tensor | None = None) -> torch.Tensor:
    """a_k = (d m_k / d x)(x_k)^T a_{k+1}: one vector-Jacobian product through the PRETRAINED mean of step k.

    x: x_k (B, *event), detached; a_next: a_{k+1} (B, *event) -> a_k (B, *event), detached."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        (a,) = torch.autograd.grad(model.mean(k, x, cond), x, a_next)
    return a.detach()


def lean_adjoint(model: DiffusionModel, path: torch.Tensor, a_final: torch.Tensor,
                 cond: torch.Tensor | None = None) -> torch.Tensor:
    """All of a_0 .. a_K from a_K (the sweep of step 2, kept whole: for tests and small chains).

    path: x_0 .. x_K (B, K+1, *event); a_final: a_K (B, *event) -> (B, K+1, *event)."""
    a = [a_final]
    for k in reversed(range(path.shape[1] - 1)):
        a.append(lean_adjoint_step(model, k, path[:, k], a[-1], cond))
    return torch.stack(a[::-1], dim=1)  # (B, K+1, *event)


def regression_terms(delta: torch.Tensor, a_next: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """|delta_k - s_k^2 a_{k+1}|^2 / s_k^2 per trajectory and step: delta, a_next (B, n, *event), std (n,) -> (B, n)."""
    var = std.to(delta.dtype).pow(2).reshape(1, -1, *([1] * (delta.dim() - 2)))  # (1, n, 1, ...)
    return ((delta - var * a_next).pow(2) / var).flatten(2).sum(2)


def regression_loss(delta: torch.Tensor, a_next: torch.Tensor, std: torch.Tensor,
                    weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per-trajectory sum_k w_k |delta_k - s_k^2 a_{k+1}|^2 / s_k^2 over the given steps (w = 1 by default).

    delta, a_next: (B, n, *event) for n steps; std, weight: (n,) -> (B,)."""
    per_step = regression_terms(delta, a_next, std)  # (B, n)
    if weight is not None:
        per_step = per_step * weight.to(per_step.dtype)
    return per_step.sum(1)


@torch.no_grad()
def chain_memory(model: DiffusionModel, generator: torch.Generator, n: int = MEMORY_PROBES) -> float:
    """mu: the share of the pretrained chain's linearised variance of v.x_K that comes from x_0 (module docstring).

    n pretrained trajectories, one random direction v ~ N(0, I) each, the lean adjoint from a_K = v."""
    var0 = model.prior_sample(MEMORY_PRIOR_SAMPLES, generator).flatten(1).var(0)  # (D,)
    path = rollout(model, model.prior_sample(n, generator), generator=generator, keep_path=True).path  # (n, K+1, *event)
    a = torch.randn(path[:, -1].shape, generator=generator, device=path.device, dtype=path.dtype)
    noise = path.new_zeros(n)
    for k in reversed(range(model.num_steps)):
        noise += model.std(k) ** 2 * a.flatten(1).pow(2).sum(1)  # s_k^2 |Phi_{k+1}^T v|^2
        a = lean_adjoint_step(model, k, path[:, k], a)
    prior = (var0 * a.flatten(1).pow(2)).sum(1)
    return float(prior.sum() / (prior.sum() + noise.sum()))


class FrontControl:
    """A control switched off before step `front` (delta_k = 0 for k < front): the backward sweep's rollout."""

    def __init__(self, control, front: int) -> None:
        self.control, self.front = control, front

    def __call__(self, k: int, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        return self.control(k, x, cond) if k >= self.front else torch.zeros_like(x)


@torch.no_grad()
def importance_log_weights(model: DiffusionModel, control, path: torch.Tensor, r: torch.Tensor, alpha: float,
                           cond: torch.Tensor | None = None) -> torch.Tensor:
    """log w_k = r(x_K) / alpha + sum_{j >= k} log p_pre(x_{j+1} | x_j) / p_u(x_{j+1} | x_j), k = 0 .. K-1, of paths
    sampled under `control` u: path (B, K+1, *event), r (B,) -> (B, K).

    E_u[w_k f(x_{k+1..K}) | x_k] = e^{V_k(x_k) / alpha} E_{u*}[f | x_k] (the future's law under u* is p_pre e^{(r - V_k) /
    alpha}), so the minimiser over delta of E_u[w_k |delta(x_k) - s_k^2 a_{k+1}|^2] is s_k^2 E_{u*}[a_{k+1} | x_k] =
    delta*_k(x_k) for ANY u: the target no longer moves with the current control (no fixed-point iteration), at the
    price of the weights' variance. Per step: log p_pre / p_u = (|x' - m - delta|^2 - |x' - m|^2) / (2 s^2)."""
    K = path.shape[1] - 1
    steps = []
    for j in range(K):
        residual = path[:, j + 1] - model.mean(j, path[:, j], cond)  # s_j eps_j + delta_j
        delta = control(j, path[:, j], cond)
        steps.append(((residual - delta).pow(2) - residual.pow(2)).flatten(1).sum(1) / (2.0 * model.std(j) ** 2))
    ratio = torch.stack(steps, dim=1)  # (B, K)
    return r.reshape(-1, 1).to(ratio.dtype) / alpha + ratio.flip(1).cumsum(1).flip(1)


def self_normalised(log_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights with mean 1 over the batch, per column, and each column's effective sample size as a fraction of B:
    log_w (B, n) -> (w (B, n), ess (n,))."""
    w = torch.softmax(log_w, dim=0)  # (B, n), columns sum to 1
    return w * log_w.shape[0], 1.0 / (w.pow(2).sum(0) * log_w.shape[0])
