"""The transition chain as code: one step, a differentiable rollout, and a batched seeded sampler.

These are the platform's dynamics. The Gymnasium environments (`envs/`) step with `transition`, the
differentiable learners back-propagate through `rollout`, and `sample` is the batched sampler with a
progress bar that every command uses, so all of them simulate the same chain.

Step k (DESIGN.md):  x_{k+1} = m_k(x_k, c) + delta_k + s_k * eps_k,   eps_k ~ N(0, I)
Per-step KL to the pretrained chain (both Gaussians share the covariance s_k^2 I):
    KL_k = |delta_k|^2 / (2 s_k^2)                                        (ELEGANT eq. 5, discretised)

Notation: delta `delta` (control displacement), s_k `std`, m_k `mean`, nu `init` (initial distribution).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from tqdm.auto import tqdm

from rlft.models.base import DiffusionModel, InitialDistribution  # noqa: F401  (re-exported: the protocol samplers take)

#: A control maps (k, x_k, cond) to the displacement delta_k added to the pretrained mean, shape of x_k.
Control = Callable[[int, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def step_kl(delta: torch.Tensor, std: float | torch.Tensor) -> torch.Tensor:
    """KL(N(m + delta, s^2 I) || N(m, s^2 I)) = |delta|^2 / (2 s^2), summed over the event, shape (B,)."""
    if isinstance(std, torch.Tensor):
        std = std.to(delta.dtype)
    return 0.5 * delta.reshape(delta.shape[0], -1).pow(2).sum(-1) / std**2


def action_log_prob(action: torch.Tensor, std: float | torch.Tensor) -> torch.Tensor:
    """log N(a; 0, s^2 I) summed over the event, shape (B,): the pretrained log-density of a drift action.

    With the drift env's convention a_k = x_{k+1} - m_k(x_k) (`envs.drift`), the pretrained policy is N(0, s_k^2 I),
    so this is also the pretrained transition log-density log N(x_{k+1}; m_k(x_k), s_k^2 I).
    """
    flat = action.reshape(action.shape[0], -1)
    if isinstance(std, torch.Tensor):
        std = std.to(flat.dtype)
        log_std = torch.log(std)
    else:
        log_std = math.log(std)
    sq = torch.linalg.vecdot(flat, flat)  # |a|^2 per row, (B,): one kernel (the env calls this every step)
    return sq * (-0.5 / std**2) - flat.shape[1] * (log_std + 0.5 * math.log(2 * math.pi))


def transition(
    model: DiffusionModel,
    k: int,
    x: torch.Tensor,
    delta: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    cond: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One step of the (controlled) chain; differentiable in x and delta (reparameterised noise).

    Args:
        model: the pretrained chain.
        k: step index in [0, K).
        x: states at level k, (B, *event).
        delta: control displacement added to the mean, (B, *event), or None for the pretrained step.
        noise: standard normal noise eps_k, (B, *event); drawn from `generator` when None.
        cond: conditioning, (B, *cond_shape), for conditional models.
    Returns:
        x_{k+1}, (B, *event).
    """
    mean = model.mean(k, x, cond)
    if delta is not None:
        mean = mean + delta
    if noise is None:
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return mean + model.std(k) * noise


@dataclass
class Rollout:
    """The result of simulating B trajectories of the chain."""

    x: torch.Tensor  # final states x_K, (B, *event)
    kl: torch.Tensor  # path KL to the pretrained chain incl. the initial law's KL, (B,)
    step_kl: torch.Tensor  # per-step KL, (B, K)
    init_kl: torch.Tensor  # KL contribution of the initial law, (B,)
    path: torch.Tensor | None = None  # all states, (B, K+1, *event), when keep_path=True


def rollout(
    model: DiffusionModel,
    x0: torch.Tensor,
    control: Control | None = None,
    cond: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    init_kl: torch.Tensor | None = None,
    keep_path: bool = False,
    noise: torch.Tensor | None = None,
) -> Rollout:
    """Simulates the chain from x0 with an optional control; gradients flow through x0, control and model.

    Args:
        model: the pretrained chain.
        x0: initial states, (B, *event).
        control: delta_k = control(k, x_k, cond), or None for the pretrained chain.
        cond: conditioning, (B, *cond_shape), or None.
        generator: source of the step noise (ignored when `noise` is given).
        init_kl: the initial law's per-sample KL, (B,), added to the path KL (zero when None).
        keep_path: also return all states.
        noise: all step noises at once, (B, K, *event) (common random numbers across runs).
    """
    model.check_state(x0, "x0")
    batch = x0.shape[0]
    x = x0
    kls = []
    path = [x0] if keep_path else None
    for k in range(model.num_steps):
        delta = control(k, x, cond) if control is not None else None
        eps = noise[:, k] if noise is not None else None
        x_next = transition(model, k, x, delta, eps, cond, generator)
        kls.append(step_kl(delta, model.std(k)) if delta is not None else x.new_zeros(batch))
        x = x_next
        if keep_path:
            path.append(x)
    step = torch.stack(kls, dim=1)  # (B, K)
    ikl = init_kl if init_kl is not None else x.new_zeros(batch)
    return Rollout(
        x=x,
        kl=step.sum(1) + ikl,
        step_kl=step,
        init_kl=ikl,
        path=torch.stack(path, dim=1) if keep_path else None,  # (B, K+1, *event)
    )


@torch.no_grad()
def sample(
    model: DiffusionModel,
    n: int,
    control: Control | None = None,
    init: InitialDistribution | None = None,
    cond: torch.Tensor | None = None,
    seed: int = 0,
    batch_size: int = 4096,
    progress: bool = True,
    desc: str = "sampling",
) -> Rollout:
    """Draws n samples of the (controlled) chain in batches, seeded, with a progress bar.

    The same seed gives the same samples whatever the batch size is not guaranteed; the same seed and
    batch size always give the same samples.

    Returns:
        A `Rollout` with x (n, *event), kl (n,), step_kl (n, K) and init_kl (n,), on the CPU.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1 (got {n})")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
    generator = torch.Generator(device=model.device).manual_seed(seed)
    outs: list[Rollout] = []
    bar = tqdm(total=n * model.num_steps, desc=desc, unit="step", disable=not progress, leave=False)
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        if init is not None:
            x0, ikl = init.init_sample(b, generator)
            x0 = x0.to(device=model.device, dtype=model.dtype)
            ikl = ikl.to(device=model.device, dtype=model.dtype)
        else:
            x0, ikl = model.prior_sample(b, generator), None
        c = cond[start : start + b] if cond is not None else None
        out = rollout(model, x0, control, c, generator, ikl)
        outs.append(Rollout(out.x.cpu(), out.kl.cpu(), out.step_kl.cpu(), out.init_kl.cpu()))
        bar.update(b * model.num_steps)
    bar.close()
    return Rollout(
        x=torch.cat([o.x for o in outs]),
        kl=torch.cat([o.kl for o in outs]),
        step_kl=torch.cat([o.step_kl for o in outs]),
        init_kl=torch.cat([o.init_kl for o in outs]),
    )
