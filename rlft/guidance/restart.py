"""Fixed-K Restart sampling (Xu et al. 2023, "Restart Sampling for Improving Generative Processes"; BOOST §4.1,
MATH.md §5), built from the core's deterministic step and forward kernel.

Levels run 0 (noisiest, the prior) ... K (data) as in `rlft.models.base`. A restart interval [t_min, t_max] is a
pair of levels ``noisy_level < clean_level`` (t_max <-> noisy_level, t_min <-> clean_level). With R restarts:

    1. x at level 0 from the prior (or an initial distribution nu); ODE steps level 0 -> clean_level;
    2. R times: forward noise clean_level -> noisy_level (Xu et al. eq. 6: the forward process' kernel),
       then ODE steps noisy_level -> clean_level;
    3. ODE steps clean_level -> K.

Every ODE step is one network evaluation (``model.ode_step``, DDIM eta = 0), noising costs none, so
NFE = K + R (clean_level - noisy_level). R = 0 is the plain deterministic ODE sampler.

Noising goes level by level by default (``model.noise_step``: x_{l-1} = scale_{l-1} x_l + std_{l-1} eps), exactly the
restart env's action 0 (`envs.restart`), so the env driven by `RestartSchedule.actions` reproduces this sampler
draw for draw. ``single_jump=True`` adds the noise in one draw with the composed kernel (Xu et al.'s form; the
same law, since Gaussian kernels compose: scale = prod scale_l, var <- scale_l^2 var + std_l^2).

Notation: K `num_steps`, R `num_restarts`, level l, NFE `nfe`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from rlft.models.base import DiffusionModel
from rlft.sampling import InitialDistribution

#: Restart-env actions (`envs.restart`): add noise up one level / one deterministic step down one level.
NOISE = 0
DENOISE = 1


@dataclass(frozen=True)
class RestartSchedule:
    """A fixed restart schedule: R round trips between two levels (R = 0: the plain ODE sampler)."""

    noisy_level: int = 0
    """Level the noise goes back up to (t_max); 0 <= noisy_level < clean_level."""
    clean_level: int = 0
    """Level where each restart starts (t_min); < K."""
    num_restarts: int = 0
    """R, the number of restarts (Xu et al.'s K)."""

    def __post_init__(self) -> None:
        if self.num_restarts < 0:
            raise ValueError(f"num_restarts must be >= 0 (got {self.num_restarts})")
        if self.num_restarts > 0 and not 0 <= self.noisy_level < self.clean_level:
            raise ValueError(
                f"a restart interval needs 0 <= noisy_level < clean_level (got noisy_level={self.noisy_level}, "
                f"clean_level={self.clean_level}); level 0 is the noisiest"
            )

    def check(self, num_steps: int) -> None:
        """Raises if the interval does not fit a chain of K = num_steps steps."""
        if self.num_restarts > 0 and self.clean_level >= num_steps:
            raise ValueError(
                f"clean_level must be < K = {num_steps} (got {self.clean_level}): restarts happen inside the chain, "
                "and reaching level K ends a sample (and a restart-env episode)"
            )

    def actions(self, num_steps: int) -> list[int]:
        """The restart env's action sequence for this schedule (length K + 2 R (clean - noisy))."""
        self.check(num_steps)
        if self.num_restarts == 0:
            return [DENOISE] * num_steps
        gap = self.clean_level - self.noisy_level
        trip = [NOISE] * gap + [DENOISE] * gap
        return [DENOISE] * self.clean_level + trip * self.num_restarts + [DENOISE] * (num_steps - self.clean_level)

    def nfe(self, num_steps: int) -> int:
        """Network evaluations per sample: K + R (clean_level - noisy_level)."""
        self.check(num_steps)
        return num_steps + self.num_restarts * (self.clean_level - self.noisy_level)


@dataclass
class RestartSample:
    """Samples of a restart sampler and what they cost."""

    x: torch.Tensor  # final states at level K, (n, *event)
    nfe: int  # network evaluations per sample


def jump_kernel(model: DiffusionModel, noisy_level: int, clean_level: int) -> tuple[float, float]:
    """The forward kernel from level clean_level up to noisy_level in one draw: x_noisy = scale x_clean + std eps.

    Composed from the adjacent kernels ``model.noise_kernel(l)`` (level l+1 -> l): for a VP chain this is
    scale = sqrt(abar_noisy / abar_clean), std = sqrt(1 - abar_noisy / abar_clean).
    """
    scale, var = 1.0, 0.0
    for level in range(clean_level - 1, noisy_level - 1, -1):  # clean-1, ..., noisy
        s, sd = model.noise_kernel(level)
        scale, var = s * scale, s * s * var + sd * sd
    return scale, math.sqrt(var)


def run_actions(
    model: DiffusionModel,
    x: torch.Tensor,
    actions: list[int],
    level: int = 0,
    cond: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, int, int]:
    """Applies restart-env actions to a batch that moves together (the reference loop).

    NOISE at level 0 is a no-op (as in the env); DENOISE at level K is not allowed.

    Returns:
        (x, final level, NFE used).
    """
    nfe = 0
    for a in actions:
        if a == DENOISE:
            if level >= model.num_steps:
                raise ValueError(f"DENOISE at level K = {model.num_steps}: the chain is already at the data end")
            x = model.ode_step(level, x, cond)
            level, nfe = level + 1, nfe + 1
        elif a == NOISE:
            if level > 0:
                x = model.noise_step(level - 1, x, generator)
                level -= 1
        else:
            raise ValueError(f"restart actions are {NOISE} (noise) or {DENOISE} (denoise) (got {a!r})")
    return x, level, nfe


@torch.no_grad()
def restart_sample(
    model: DiffusionModel,
    n: int,
    schedule: RestartSchedule | None = None,
    *,
    single_jump: bool = False,
    init: InitialDistribution | None = None,
    cond: torch.Tensor | None = None,
    seed: int = 0,
    batch_size: int = 4096,
    progress: bool = True,
) -> RestartSample:
    """Draws n samples with fixed-K Restart (the plain ODE sampler when `schedule` is None or has R = 0).

    Random draws come from one generator seeded with `seed`, per batch in this order: x_0 (prior or `init`),
    then each noising draw (B, *event) in schedule order, as `envs.restart.RestartEnv` makes them.

    Returns:
        `RestartSample` with x (n, *event) on the CPU and the NFE per sample.
    """
    schedule = schedule or RestartSchedule()
    schedule.check(model.num_steps)
    if n < 1 or batch_size < 1:
        raise ValueError(f"n and batch_size must be >= 1 (got n={n}, batch_size={batch_size})")
    generator = torch.Generator(device=model.device).manual_seed(seed)
    K, R, lo, hi = model.num_steps, schedule.num_restarts, schedule.noisy_level, schedule.clean_level
    outs = []
    for start in tqdm(range(0, n, batch_size), desc="restart sampling", disable=not progress, leave=False):
        b = min(batch_size, n - start)
        if init is None:
            x = model.prior_sample(b, generator)
        else:
            x = init.init_sample(b, generator)[0].to(device=model.device, dtype=model.dtype)
        c = cond[start : start + b] if cond is not None else None
        if not single_jump or R == 0:
            x, _, _ = run_actions(model, x, schedule.actions(K), 0, c, generator)
        else:
            scale, std = jump_kernel(model, lo, hi)
            x, _, _ = run_actions(model, x, [DENOISE] * hi, 0, c)
            for _ in range(R):
                x = scale * x + std * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                x, _, _ = run_actions(model, x, [DENOISE] * (hi - lo), lo, c)
            x, _, _ = run_actions(model, x, [DENOISE] * (K - hi), hi, c)
        outs.append(x.cpu())
    return RestartSample(torch.cat(outs), schedule.nfe(K))
