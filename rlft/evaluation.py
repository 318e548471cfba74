"""The standard figures every command reports for a fine-tuned sampler and for the pretrained model.

`evaluate_run` samples the (controlled) chain, scores it, and returns one flat dict whose keys are the
constants below (and, under `PRETRAINED`, the same figures for the pretrained model). `--json` output of
every command that reports a run is this dict.

    objective J       = E[r(x_K)] - alpha * E[path KL]                    (ELEGANT eq. 5)
    optimal J*        = alpha log C exactly (Gaussian mixture with linear/quadratic reward),
                        else alpha * log-mean-exp(r/alpha) over pretrained samples (Donsker-Varadhan);
                        `optimal_objective_exact` says which, `optimal_objective_se` is the estimate's s.e.
    gap_closure       = (J - J_pre) / (J* - J_pre)
    energy_distance   = to exact target samples (when the target is known), with the exact-vs-exact
                        figure at the same sample size as `energy_distance_floor` (the mean of 8 exact draws
                        against the same reference samples); both average the V-statistic over 8 disjoint
                        blocks (measured: with 8-16 blocks a correct sampler never exceeded 2x the floor in
                        40 repeats, with 1-4 blocks it did 5-8 % of the time; an exact sampler's ratio to
                        the mean floor over 100 repeats at n = 2000: sd 0.17 on the 2-D bench task and 0.24
                        on the 8-D one, max 1.51 and 1.85, against sd 0.23 and 0.31 to a one-draw floor)
"""

from __future__ import annotations

import math
from typing import Any

import torch

import rlft.metrics as metrics
from rlft.models.base import DiffusionModel
from rlft.rewards.base import Reward, evaluate
from rlft.sampling import Control, InitialDistribution, sample

# metric keys (the JSON contract of every reporting command)
REWARD = "reward"
REWARD_STD = "reward_std"
REWARD_SE = "reward_se"
TRUE_REWARD = "true_reward"
KL = "kl"
OBJECTIVE = "objective"
OPTIMAL_OBJECTIVE = "optimal_objective"
#: True when J* is the closed form, False when it is the Monte-Carlo estimate (then OPTIMAL_OBJECTIVE_SE is its s.e.)
OPTIMAL_OBJECTIVE_EXACT = "optimal_objective_exact"
OPTIMAL_OBJECTIVE_SE = "optimal_objective_se"
GAP_CLOSURE = "gap_closure"
DIVERSITY = "diversity"
ENERGY_DISTANCE = "energy_distance"
ENERGY_DISTANCE_FLOOR = "energy_distance_floor"
SLICED_WASSERSTEIN = "sliced_wasserstein"
PRETRAINED = "pretrained"
NUM_SAMPLES = "num_samples"
ENERGY_BLOCKS = 8
#: exact-vs-exact draws averaged into `energy_distance_floor`
FLOOR_DRAWS = 8

_PRETRAINED_CACHE: dict[tuple, dict[str, Any]] = {}


def _exact_target(model: DiffusionModel, reward: Reward, alpha: float):
    """The closed-form target when the model is a Gaussian mixture and the reward linear/quadratic."""
    if alpha <= 0 or not hasattr(model, "exact_target") or getattr(reward, "exact_form", None) is None:
        return None
    return model.exact_target(reward, alpha)


def sample_figures(
    model: DiffusionModel, reward: Reward, alpha: float, x: torch.Tensor, kl: torch.Tensor
) -> dict[str, Any]:
    """Reward, r*, KL, J and diversity of a set of samples x (n, *event) with path KLs kl (n,)."""
    with torch.no_grad():
        r = evaluate(reward, x.to(model.device)).double().cpu()
    summary = metrics.reward_summary(r)
    out: dict[str, Any] = {
        REWARD: summary["mean"],
        REWARD_STD: summary["std"],
        REWARD_SE: summary["se"],
        KL: float(kl.double().mean()),
        OBJECTIVE: metrics.objective(r, kl.double(), alpha),
        DIVERSITY: metrics.mean_pairwise_distance(x),
        NUM_SAMPLES: int(x.shape[0]),
    }
    if reward.has_true_reward:
        with torch.no_grad():
            out[TRUE_REWARD] = float(evaluate(reward, x.to(model.device), true=True).double().mean())
    return out


def evaluate_run(
    model: DiffusionModel,
    reward: Reward,
    alpha: float,
    control: Control | None = None,
    init: InitialDistribution | None = None,
    num_samples: int = 2000,
    seed: int = 0,
    progress: bool = False,
    samples_out: dict | None = None,
) -> dict[str, Any]:
    """Samples the fine-tuned chain and the pretrained one (cached) and returns the standard figures.

    Args:
        model, reward, alpha: the task.
        control, init: the fine-tuned sampler (None, None = the pretrained model).
        num_samples: samples of each model (the pretrained J* uses 4x as many when it is Monte-Carlo).
        seed: seed of the fine-tuned sampler; the pretrained samples use seed + 10_000.
        samples_out: if given, receives the tensors {"finetuned", "pretrained", "target"} for plots.
    """
    pre = _pretrained_figures(model, reward, alpha, num_samples, seed + 10_000, progress)
    tuned = sample(model, num_samples, control=control, init=init, seed=seed, progress=progress, desc="fine-tuned")
    out = sample_figures(model, reward, alpha, tuned.x, tuned.kl)
    out[OPTIMAL_OBJECTIVE] = pre[OPTIMAL_OBJECTIVE]
    out[OPTIMAL_OBJECTIVE_EXACT], out[OPTIMAL_OBJECTIVE_SE] = pre[OPTIMAL_OBJECTIVE_EXACT], pre[OPTIMAL_OBJECTIVE_SE]
    out[GAP_CLOSURE] = metrics.gap_closure(out[OBJECTIVE], pre[OBJECTIVE], pre[OPTIMAL_OBJECTIVE])
    target_x = pre.get("_target_x")
    if target_x is not None:
        out[ENERGY_DISTANCE] = metrics.energy_distance(tuned.x.double(), target_x, _block(num_samples))
        out[ENERGY_DISTANCE_FLOOR] = pre[ENERGY_DISTANCE_FLOOR]
        out[SLICED_WASSERSTEIN] = metrics.sliced_wasserstein(tuned.x.double(), target_x, seed=seed)
    pre_public = {k: v for k, v in pre.items() if not k.startswith("_")}
    out[PRETRAINED] = pre_public
    if samples_out is not None:
        samples_out.update(finetuned=tuned.x, pretrained=pre["_x"], target=target_x)
    return out


def _pretrained_figures(model, reward, alpha, n, seed, progress) -> dict[str, Any]:
    key = (id(model), id(reward), float(alpha), n, seed)
    hit = _PRETRAINED_CACHE.get(key)
    if hit is not None and hit["_model"] is model and hit["_reward"] is reward:  # the cache holds both alive
        return hit
    pre = sample(model, n, seed=seed, progress=progress, desc="pretrained")
    out = sample_figures(model, reward, alpha, pre.x, pre.kl)
    out["_x"], out["_model"], out["_reward"] = pre.x, model, reward
    target = _exact_target(model, reward, alpha)
    if target is not None:
        out[OPTIMAL_OBJECTIVE] = target.optimal_objective
        out[OPTIMAL_OBJECTIVE_EXACT], out[OPTIMAL_OBJECTIVE_SE] = True, 0.0
        g = torch.Generator().manual_seed(seed + 1)
        target_x = target.mixture.sample(n, g)
        out["_target_x"] = target_x
        out[ENERGY_DISTANCE] = metrics.energy_distance(pre.x.double(), target_x, _block(n))
        # the floor is the mean over FLOOR_DRAWS exact draws against the same reference: one draw's figure
        # varies by +-30 % (0.0051-0.0085 on the 2-D task at n = 2000), which the ratio to it would inherit
        floors = [metrics.energy_distance(target.mixture.sample(n, g), target_x, _block(n)) for _ in range(FLOOR_DRAWS)]
        out[ENERGY_DISTANCE_FLOOR] = sum(floors) / len(floors)
        out[SLICED_WASSERSTEIN] = metrics.sliced_wasserstein(pre.x.double(), target_x, seed=seed)
    else:
        extra = sample(model, 3 * n, seed=seed + 1, progress=progress, desc="pretrained (J*)")
        with torch.no_grad():
            r_all = torch.cat([
                evaluate(reward, pre.x.to(model.device)).double().cpu(),
                evaluate(reward, extra.x.to(model.device)).double().cpu(),
            ])
        out[OPTIMAL_OBJECTIVE] = metrics.optimal_objective_mc(r_all, alpha)
        out[OPTIMAL_OBJECTIVE_EXACT] = False
        out[OPTIMAL_OBJECTIVE_SE] = metrics.optimal_objective_mc_se(r_all, alpha)
    out[GAP_CLOSURE] = 0.0
    if len(_PRETRAINED_CACHE) > 16:
        _PRETRAINED_CACHE.clear()
    _PRETRAINED_CACHE[key] = out
    return out


def _block(n: int) -> int:
    return max(64, n // ENERGY_BLOCKS)


def clear_cache() -> None:
    """Forgets cached pretrained figures (e.g. after a model's weights change)."""
    _PRETRAINED_CACHE.clear()


def is_finite_report(report: dict[str, Any]) -> bool:
    """True when every number in a report (and its pretrained part) is finite."""
    values = [v for v in report.values() if isinstance(v, float)]
    values += [v for v in report.get(PRETRAINED, {}).values() if isinstance(v, float)]
    return all(math.isfinite(v) for v in values)
