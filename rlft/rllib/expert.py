"""f-PG's expert: the samples of the target it matches (its only access to the target), and their diffusion to
every noise level the agent visits. Pure torch, no Ray.

Four sources (`learner.expert`): "exact" (the exact tilted target of a Gaussian-mixture task with a linear/quadratic
reward), "snis" (any reward: pretrained samples x_i ~ p_pre resampled with self-normalised importance weights
w_i ∝ exp(r(x_i)/alpha), whose limit is the tilted target p_tar ∝ exp(r/alpha) p_pre of MATH.md §1; its effective
sample size (sum w)^2 / sum w^2 is reported, and a set whose ESS is below `min_expert_ess` is refused), an explicit
mixture, or a file of samples.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from rlft.config import ConfigError, TaskConfig
from rlft.models.base import DiffusionModel
from rlft.rewards.base import Reward

EXPERT_TYPES = ("exact", "snis", "gmm", "file", "target")
"""`learner.expert` types ("target" is the earlier name of "exact")."""
EXPERT_ESS = "expert_ess"
"""Result key: the effective sample size of the "snis" expert's weights, (sum w)^2 / sum w^2."""
EXPERT_ESS_FRACTION = "expert_ess_fraction"
"""Result key: that ESS divided by the number of pretrained samples it was drawn from (ESS / N)."""
SNIS_PRETRAINED_SAMPLES = 50000
"""Default of `learner.expert_samples`: pretrained samples the "snis" expert draws."""
SNIS_MIN_ESS = 200.0
"""Default of `learner.min_expert_ess`: the smallest effective sample size accepted as a target."""


# -- the discriminator's expert states -------------------------------------------------------------------------


class ExpertStates:
    """Target samples diffused to any level: x_l = scale_l x_data + std_l eps (forward kernel from level K)."""

    def __init__(self, data: torch.Tensor, scales: list[float], stds: list[float]) -> None:
        self.data = data.float()  # (N, D)
        self.scales = torch.as_tensor(scales, dtype=torch.float32)  # (K+1,)
        self.stds = torch.as_tensor(stds, dtype=torch.float32)  # (K+1,)

    def sample(self, levels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(n, D) expert states at the given levels (n,)."""
        idx = torch.randint(0, self.data.shape[0], (levels.shape[0],), generator=generator)
        noise = torch.randn((levels.shape[0], self.data.shape[1]), generator=generator)
        return self.scales[levels, None] * self.data[idx] + self.stds[levels, None] * noise


def level_kernels(model: DiffusionModel) -> tuple[list[float], list[float]]:
    """(scale_l, std_l) of the forward kernel from level K (data end) up to every level l = 0..K."""
    K = model.num_steps
    scales, stds = [1.0] * (K + 1), [0.0] * (K + 1)
    scale, var = 1.0, 0.0
    for level in range(K - 1, -1, -1):  # compose the adjacent kernels level+1 -> level
        s, sd = model.noise_kernel(level)
        scale, var = s * scale, s * s * var + sd * sd
        scales[level], stds[level] = scale, math.sqrt(var)
    return scales, stds


# -- expert samples -------------------------------------------------------------------------------------------


def effective_sample_size(log_w: torch.Tensor) -> float:
    """Kish's effective sample size of unnormalised log-weights, (sum_i w_i)^2 / sum_i w_i^2 (Kong 1992; Owen 2013 §9.3).

    Computed as exp(2 LSE(log w) - LSE(2 log w)) in float64, so that weights exp(r/alpha) with r/alpha in the
    thousands neither overflow nor underflow. Equals N for equal weights and 1 when one weight dominates.

    Args:
        log_w: (N,) log-weights, any finite shift (the ESS is invariant to a common factor).
    """
    log_w = log_w.double().reshape(-1)
    return float(torch.exp(2.0 * torch.logsumexp(log_w, 0) - torch.logsumexp(2.0 * log_w, 0)))


def snis_resample(x: torch.Tensor, log_w: torch.Tensor, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Self-normalised importance resampling: n draws (with replacement) of x_i with probability w_i / sum_j w_j.

    With x_i ~ p_pre and log w_i = r(x_i) / alpha, the draws approach the tilted target p_tar ∝ exp(r / alpha) p_pre
    (MATH.md §1) as N grows; any expectation under them is the SNIS estimate sum_i w_i f(x_i) / sum_j w_j.

    Args:
        x: (N, D) proposal samples.
        log_w: (N,) unnormalised log-weights (normalised here by a log-sum-exp: softmax).
        n: draws to return.
    Returns:
        (n, D) resampled rows of x.
    """
    probs = torch.softmax(log_w.double().reshape(-1), 0)  # (N,) w_i / sum_j w_j, stable for any scale of log_w
    idx = torch.multinomial(probs, n, replacement=True, generator=generator)
    return x[idx]


def expert_kind(spec: str | dict[str, Any] | None, model: DiffusionModel, reward: Reward) -> dict[str, Any]:
    """The `learner.expert` spec as a mapping; None -> {type: exact} where the task has an exact target, else snis."""
    if spec is None:
        exact = hasattr(model, "exact_target") and getattr(reward, "exact_form", None) is not None
        return {"type": "exact" if exact else "snis"}
    return {"type": spec} if isinstance(spec, str) else dict(spec)


def snis_expert(
    task: TaskConfig, model: DiffusionModel, reward: Reward, n: int, seed: int, num_pretrained: int, min_ess: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The "snis" expert: `num_pretrained` samples of the pretrained chain resampled n times with weights exp(r/alpha).

    The pretrained chain's own marginal is the proposal, so the resampled set targets exactly what the KL-regularised
    problem on this chain targets, p_pre(x) exp(r(x)/alpha) / Z.

    Returns:
        (n, D) float32 expert samples, and {expert_ess, expert_ess_fraction}.
    Raises:
        ConfigError: alpha <= 0, or an effective sample size below `min_ess` (too few distinct samples to be a target).
    """
    import rlft.sampling as sampling
    from rlft.rewards.base import evaluate

    if not task.alpha > 0:
        raise ConfigError(f"learner.expert snis needs alpha > 0 (got {task.alpha}): its weights are exp(r/alpha); "
                          "give learner.expert: {type: file, path: samples.npy} for alpha = 0")
    x = sampling.sample(model, num_pretrained, seed=seed, progress=False).x.reshape(num_pretrained, -1)  # (N, D)
    with torch.no_grad():
        r = torch.cat([evaluate(reward, xb.reshape(-1, *model.event_shape).to(device=model.device, dtype=model.dtype))
                       .double().cpu() for xb in x.split(8192)])  # (N,)
    log_w = r / task.alpha
    ess = effective_sample_size(log_w)
    if ess < min_ess:
        raise ConfigError(
            f"learner.expert snis: the effective sample size of the weights exp(r/alpha) is {ess:.1f} of "
            f"{num_pretrained} pretrained samples (ESS/N = {ess / num_pretrained:.2g}), below learner.min_expert_ess = "
            f"{min_ess:g}: resampling would copy a handful of samples, not represent the target. Raise "
            f"learner.expert_samples (ESS grows in proportion to it), raise alpha (flatter weights), or give target "
            "samples: learner.expert: {type: file, path: samples.npy}")
    g = torch.Generator().manual_seed(seed + 1)
    return snis_resample(x, log_w, n, g).float(), {EXPERT_ESS: ess, EXPERT_ESS_FRACTION: ess / num_pretrained}


def build_expert(options: Any, task: TaskConfig, model: DiffusionModel, reward: Reward, seed: int
                 ) -> tuple[torch.Tensor, dict[str, float]]:
    """The expert set `options` (an `rlft.rllib.fpg.FPGOptions`) ask for, (num_expert_samples, D) float32, and its figures (the ESS for "snis")."""
    spec = expert_kind(options.expert, model, reward)
    if spec["type"] == "snis":
        return snis_expert(task, model, reward, options.num_expert_samples, seed, options.expert_samples,
                           options.min_expert_ess)
    return expert_samples(spec, task, model, reward, options.num_expert_samples, seed), {}


def expert_samples(spec: dict[str, Any], task: TaskConfig, model: DiffusionModel, reward: Reward, n: int, seed: int) -> torch.Tensor:
    """Samples of the target f-PG matches, (n, D) float32: the only access f-PG has to the target.

    spec: {type: exact} (the task's exact tilted target, Gaussian-mixture models with linear/quadratic rewards; "target"
    is its earlier name), {type: snis} (`snis_expert` with its defaults), {type: gmm, weights, means, stds} (an explicit
    mixture, e.g. the true data of a model with a wrong score), or {type: file, path: X.npy} (an (N, D) array).
    """
    from rlft.models.gmm import GaussianMixture

    kind = spec.get("type")
    g = torch.Generator().manual_seed(seed)
    if kind in ("exact", "target"):
        if not hasattr(model, "exact_target") or getattr(reward, "exact_form", None) is None:
            raise ConfigError(f"learner.expert {kind} needs a Gaussian-mixture model and a linear/quadratic reward; "
                              "use expert: snis (resampled pretrained samples), {type: file, path: samples.npy} or "
                              "{type: gmm, ...} instead")
        x = model.exact_target(reward, task.alpha).mixture.sample(n, g)
    elif kind == "snis":
        x = snis_expert(task, model, reward, n, seed, SNIS_PRETRAINED_SAMPLES, SNIS_MIN_ESS)[0]
    elif kind == "gmm":
        x = GaussianMixture.create(spec["weights"], spec["means"], spec["stds"]).sample(n, g)
    elif kind == "file":
        data = torch.as_tensor(np.load(spec["path"]), dtype=torch.float32).reshape(-1, model.event_dim)
        x = data[torch.randint(0, data.shape[0], (n,), generator=g)] if data.shape[0] > n else data
    else:
        raise ConfigError(f"learner.expert.type must be one of {list(EXPERT_TYPES)} (got {kind!r})")
    if x.reshape(x.shape[0], -1).shape[1] != model.event_dim:
        raise ConfigError(f"learner.expert samples have {x.reshape(x.shape[0], -1).shape[1]} numbers each; the model's "
                          f"samples have {model.event_dim}")
    return x.reshape(x.shape[0], -1).float()
