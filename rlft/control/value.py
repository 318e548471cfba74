"""The value function at t = 0, v0(x0) = alpha log E_pre[exp(r(x_T)/alpha) | x_0 = x0] (ELEGANT Alg. 4, App. E.2).

ELEGANT Lemma 1 at t = 0 gives v*_0; the initial-distribution control (eq. 10) only needs its gradient.
Alg. 4 regresses r(x_T) on x_0; App. E.2 refines the target with M pretrained rollouts per start:

    y_i = alpha log (1/M) sum_j exp(r(x_T^{(i,j)}) / alpha)
        = alpha [logsumexp_j (r_ij / alpha) - log M]                       (stable log-mean-exp)

and fits a small network a_phi by least squares, min_phi sum_i (a_phi(x_i) - y_i)^2 (with a held-out split
for model selection and the output clamped to the targets' range, see `fit_value`). With M = 1 this is
Alg. 4's plain regression; as M grows the target tends to v*_0. (The log-mean-exp is biased low by a
Jensen gap of order Var/(2 alpha M); the bias is nearly constant in x0 when x0 carries little information
about x_T, which is the usual VP case, and a constant offset does not change the control of eq. 10.)

In a conditional task (`rlft.conditions`) the value is v0(x0, c) = alpha log E_pre[exp(r(x_T, c)/alpha) | x_0 = x0, c]:
each start x_i is paired with a training condition c_i, its M rollouts are rewarded at c_i, and a_phi(x0, c) takes
the condition as a second input.

Notation: x_i `x0` (N, *event), c_i `cond` (N, d), r_ij `rewards` (N, M), y_i `targets` (N,), a_phi `ValueNet`.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from rlft.control.networks import VectorControlNet
from rlft.models.base import DiffusionModel
from rlft.rewards.base import Reward, evaluate
from rlft.sampling import rollout


#: a fitted value is kept only if its held-out improvement over the constant is this many standard errors (`fit_value`)
MIN_Z = 3.0


class ValueNet(nn.Module):
    """a_phi(x0): a SiLU MLP on the flattened event with a scalar head, an output affine and an output clamp.

    The output is clamped to the range of the targets it was fitted on: the initial control of eq. 10
    maximises a, and an MLP extrapolates linearly outside the data, so without the clamp the control would
    chase values the data never showed (measured: a = +52 where every target was below 0, at KL 276).
    """

    def __init__(self, event_shape: tuple[int, ...], hidden: int = 128, depth: int = 3,
                 cond_shape: tuple[int, ...] | None = None) -> None:
        super().__init__()
        # zero-initialised head: before fitting, a is the constant y_shift (the "flat value" hypothesis)
        self.mlp = VectorControlNet(event_shape, cond_shape, hidden, depth, num_frequencies=1, out_features=1, zero_init=True)
        # output affine (set to the targets' mean/std before training, so the MLP learns O(1) values) and clamp
        self.register_buffer("y_shift", torch.zeros(()))
        self.register_buffer("y_scale", torch.ones(()))
        self.register_buffer("y_min", torch.tensor(-math.inf))
        self.register_buffer("y_max", torch.tensor(math.inf))

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, *event), cond: (B, *cond_shape) or None -> a(x [, c]): (B,)."""
        a = self.y_shift + self.y_scale * self.mlp(0.0, x, cond)[:, 0]
        return torch.minimum(torch.maximum(a, self.y_min), self.y_max)


def log_mean_exp_targets(rewards: torch.Tensor, alpha: float) -> torch.Tensor:
    """y_i = alpha log mean_j exp(r_ij / alpha) from rewards (N, M), stably; alpha <= 0 gives mean_j r_ij.

    Returns:
        y (N,), in the rewards' dtype (computed in float64).
    """
    r = rewards.to(torch.float64)
    if alpha <= 0:
        return r.mean(1).to(rewards.dtype)
    y = alpha * (torch.logsumexp(r / alpha, dim=1) - math.log(r.shape[1]))
    return y.to(rewards.dtype)


@torch.no_grad()
def value_dataset(
    model: DiffusionModel,
    reward: Reward,
    alpha: float,
    num_starts: int,
    rollouts_per_start: int,
    generator: torch.Generator,
    batch_size: int = 4096,
    cond: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Draws x0 ~ nu_ini and the refined targets of App. E.2 from pretrained rollouts.

    Args:
        model: the pretrained chain (unconditional).
        reward: r, evaluated through `rlft.rewards.evaluate`.
        alpha: the KL weight of the target's log-mean-exp.
        num_starts: N, number of starting points x0.
        rollouts_per_start: M, pretrained rollouts from each x0.
        generator: source of every draw.
        batch_size: trajectories simulated per batch.
        cond: one condition per start (N, d) (a conditional task's training conditions), or None.
    Returns:
        (x0 (N, *event), y (N,), number of reward evaluations N * M).
    """
    x0 = model.prior_sample(num_starts, generator)  # (N, *event)
    starts = x0.repeat_interleave(rollouts_per_start, dim=0)  # (N M, *event): start i repeated M times
    conds = cond.repeat_interleave(rollouts_per_start, dim=0) if cond is not None else None  # (N M, d)
    rewards = []
    for s in range(0, starts.shape[0], batch_size):
        c = conds[s : s + batch_size] if conds is not None else None
        out = rollout(model, starts[s : s + batch_size], cond=c, generator=generator)
        rewards.append(evaluate(reward, out.x, cond=c).detach())
    r = torch.cat(rewards).reshape(num_starts, rollouts_per_start)  # (N, M)
    return x0, log_mean_exp_targets(r, alpha), starts.shape[0]


def fit_value(
    net: ValueNet,
    x0: torch.Tensor,
    targets: torch.Tensor,
    iterations: int,
    generator: torch.Generator,
    lr: float = 1e-3,
    batch_size: int = 256,
    holdout: float = 0.2,
    cond: torch.Tensor | None = None,
) -> dict[str, float]:
    """Least-squares regression of the targets on x0 (Alg. 4 step 3), Adam on minibatches, with model selection.

    A fraction `holdout` of the data is held out; the weights with the lowest held-out error seen (checked
    20 times, and at the start, where a is the constant mean) are kept, and then only if their held-out
    improvement over the constant is significant (paired z >= MIN_Z); else a is the constant. `cond` (N, d): the
    condition of each start in a conditional task (the network's second input), or None. The targets are
    noisy (M rollouts each) and, in a VP chain with a(T) ~ 0, nearly independent of x0; a network fitted to
    their noise hands the initial control spurious slopes, which exp(a/alpha) amplifies at small alpha
    (measured on a 2-D mixture at alpha = 0.1: held-out R^2 0.036 from noise alone, and the initial control
    then paid KL 0.90 for nothing; the test rejects that fit).

    Returns:
        {"value_mse": held-out mean squared error of the kept weights, "value_r2": 1 - that / held-out variance,
         "value_z": the paired z of the fit, "value_flat": 1.0 if the constant was kept}.
    """
    y = targets.to(x0.dtype)
    n = x0.shape[0]

    def c_at(idx: torch.Tensor) -> torch.Tensor | None:
        return cond[idx] if cond is not None else None

    perm = torch.randperm(n, generator=generator, device=generator.device).to(x0.device)
    n_val = int(round(holdout * n)) if n >= 5 else 0
    val, train = perm[:n_val], perm[n_val:]
    with torch.no_grad():
        y_train = y[train]
        net.y_shift.fill_(float(y_train.mean()))
        net.y_scale.fill_(max(float(y_train.std()), 1e-6) if y_train.numel() > 1 else 1.0)
        net.y_min.fill_(float(y.min()))
        net.y_max.fill_(float(y.max()))

    def held_out_mse() -> float:
        idx = val if n_val else train
        with torch.no_grad():
            return float((net(x0[idx], c_at(idx)) - y[idx]).pow(2).mean())

    best, best_state = held_out_mse(), copy.deepcopy(net.state_dict())
    check_every = max(1, iterations // 20)
    opt = torch.optim.Adam(net.mlp.parameters(), lr=lr)
    for i in range(iterations):
        pick = torch.randint(0, train.numel(), (min(batch_size, train.numel()),), generator=generator, device=generator.device)
        idx = train[pick.to(x0.device)]
        loss = ((net(x0[idx], c_at(idx)) - y[idx]) / net.y_scale).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (i + 1) % check_every == 0 or i + 1 == iterations:
            mse = held_out_mse()
            if mse < best:
                best, best_state = mse, copy.deepcopy(net.state_dict())
    net.load_state_dict(best_state)
    # Keep the fit only if it predicts the held-out targets better than the constant, by MIN_Z standard errors
    # of the paired per-point difference; otherwise fall back to the flat value (a = training mean).
    z = _paired_z(net, x0[val], y[val], c_at(val)) if n_val > 1 else math.inf
    if not z >= MIN_Z:
        with torch.no_grad():
            net.mlp.net[-1].weight.zero_()
            net.mlp.net[-1].bias.zero_()
        best = held_out_mse()
    var = float(y[val].var()) if n_val > 1 else float(y.var())
    return {"value_mse": best, "value_r2": 1.0 - best / var if var > 0 else 0.0, "value_z": z, "value_flat": float(not z >= MIN_Z)}


def _paired_z(net: ValueNet, x: torch.Tensor, y: torch.Tensor, cond: torch.Tensor | None = None) -> float:
    """z of the held-out improvement over the constant: mean/se of d_i = (c - y_i)^2 - (a(x_i) - y_i)^2."""
    with torch.no_grad():
        d = (net.y_shift - y).pow(2) - (net(x, cond) - y).pow(2)  # (n,)
    se = float(d.std()) / math.sqrt(d.numel())
    mean = float(d.mean())
    if se == 0.0:
        return math.inf if mean > 0 else 0.0
    return mean / se
