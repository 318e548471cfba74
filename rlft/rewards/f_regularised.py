"""The f-regularised reward r_f = log (f')^{-1}((r - lambda)/alpha) and its YAML factory (TANG §4, Cor. 4.4).

With alpha = 1 the KL machinery of rlft, given r_f, samples the f-tilted target
p = (f')^{-1}((r - lambda)/alpha) p_pre (`rlft.divergences`, TANG Prop. 4.1). lambda normalises p over the
pretrained model, so it is solved from pretrained rollouts; that is done ONCE, on the driver:
`prepare_reward_spec` fills `lambda_` into the YAML mapping, and every process that builds the reward from the
prepared mapping (Ray env runners, trial workers) reuses it instead of drawing `num_samples` rollouts again.

    reward: {type: f_regularised, base: {type: quadratic, center: [1, 1]}, divergence: "gamma:0.5", alpha: 0.5}

Notation: r the base reward, alpha the divergence weight (`alpha`), lambda `lambda_`, r_f this reward.
"""

from __future__ import annotations

from typing import Any

import torch

from rlft.config import ConfigError
from rlft.divergences import FDivergence, check_alpha, f_reward, get_divergence, solve_lambda
from rlft.rewards.base import Reward, build_reward, evaluate
from rlft.sampling import sample

#: The registry name of the f-regularised reward (`reward.type`).
NAME = "f_regularised"


class FRegularisedReward(Reward):
    """r_f(x) = log (f')^{-1}((r(x) - lambda)/alpha) around a base reward: run the KL learner with alpha = 1.

    `true_reward` is the base reward's genuine reward, so reports show E[r] beside E[r_f].
    """

    name = NAME
    #: The KL weight a learner must use with this reward (alpha lives inside r_f, TANG Eq. 4.8).
    kl_alpha: float = 1.0

    def __init__(
        self,
        base: Reward,
        divergence: str | FDivergence,
        alpha: float,
        lambda_: float,
        max_ratio: float | None = 1e4,
        min_ratio: float = 1e-6,
    ) -> None:
        check_alpha(alpha)
        self.base = base
        self.divergence = get_divergence(divergence)
        self.alpha = float(alpha)
        self.lambda_ = float(lambda_)
        self.max_ratio = max_ratio
        self.min_ratio = float(min_ratio)
        self.differentiable = getattr(base, "differentiable", True)

    @classmethod
    def from_pretrained_rewards(
        cls, base: Reward, divergence: str | FDivergence, alpha: float, pretrained_rewards: torch.Tensor, **kwargs: Any
    ) -> "FRegularisedReward":
        """Solves lambda over r(x_i), x_i ~ p_pre (n,), and wraps the base reward."""
        return cls(base, divergence, alpha, solve_lambda(pretrained_rewards, alpha, divergence), **kwargs)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return f_reward(self.base(x), self.alpha, self.divergence, self.lambda_, self.max_ratio, self.min_ratio)

    @property
    def has_true_reward(self) -> bool:
        return True

    def true_reward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base.true_reward(x)

    def to(self, device: str | torch.device) -> "FRegularisedReward":
        self.base = self.base.to(device)
        return self


def pretrained_lambda(
    base_reward: Reward, model: Any, divergence: str | FDivergence, alpha: float, num_samples: int = 4096, seed: int = 0
) -> float:
    """lambda over `num_samples` pretrained samples of `model` (seed `seed`), as the factory solves it."""
    with torch.no_grad():
        x = sample(model, int(num_samples), seed=seed, progress=False, desc="pretrained (lambda)").x
        r = evaluate(base_reward, x.to(model.device))
    return solve_lambda(r, alpha, divergence)


def f_regularised(
    base: dict,
    divergence: str,
    alpha: float,
    num_samples: int = 4096,
    seed: int = 0,
    max_ratio: float | None = 1e4,
    lambda_: float | None = None,
    model: Any = None,
) -> FRegularisedReward:
    """YAML: `reward: {type: f_regularised, base: {type: quadratic, ...}, divergence: "gamma:0.5", alpha: 0.5}`.

    Without `lambda_`, samples `num_samples` pretrained x (seed `seed`) from the task's model to solve lambda;
    with it (as `prepare_reward_spec` fills it in), draws nothing. The task's own alpha must be 1 (the divergence
    weight is this `alpha`).
    """
    context = {"model": model} if model is not None else {}
    base_reward = build_reward(base, path="reward.base", **context)
    if lambda_ is None:
        if model is None:
            raise ValueError(
                "reward f_regularised needs the task's model to sample pretrained rewards (build_reward(spec, model=...)), "
                "or reward.lambda_ solved beforehand (rlft.rewards.f_regularised.prepare_reward_spec)"
            )
        lambda_ = pretrained_lambda(base_reward, model, divergence, alpha, num_samples, seed)
    return FRegularisedReward(base_reward, divergence, alpha, lambda_, max_ratio=max_ratio)


def check_task_alpha(spec: dict, alpha: float | None) -> None:
    """With `type: f_regularised` the task's alpha must be `FRegularisedReward.kl_alpha` (1): the divergence weight
    is the reward's own `alpha` (TANG Cor. 4.4). Cheap; `rlft.run_config` runs it before Ray starts."""
    if not isinstance(spec, dict) or spec.get("type") != NAME or alpha is None:
        return
    if float(alpha) != FRegularisedReward.kl_alpha:
        raise ConfigError(
            f"alpha must be {FRegularisedReward.kl_alpha:g} with reward.type {NAME!r} (got {alpha}): the divergence "
            f"weight is reward.alpha; set the task's alpha: 1 and put the weight in reward.alpha"
        )


def prepare_reward_spec(spec: dict, model: Any, alpha: float | None = None) -> dict:
    """The reward's YAML mapping with everything that costs rollouts solved once (call it on the driver).

    For `type: f_regularised` without `lambda_`: solves lambda from the same pretrained rollouts (`num_samples`,
    `seed`) the factory would draw, and returns a copy of the mapping with `lambda_` filled in; building the reward
    from it then draws no pretrained sample. Every other mapping is returned unchanged.

    Args:
        spec: the task's `reward` mapping.
        model: the task's pretrained model.
        alpha: the task's KL weight, or None to skip the check; with an f-regularised reward it must be
            `FRegularisedReward.kl_alpha` (1), because the divergence weight is the reward's own `alpha`.
    Returns:
        A new dict (the input is not modified).
    Raises:
        ConfigError: a bad f_regularised mapping (naming the key), or a task alpha other than 1.
    """
    if not isinstance(spec, dict) or spec.get("type") != NAME:
        return spec
    check_task_alpha(spec, alpha)
    if spec.get("lambda_") is not None:
        return dict(spec)
    reward = build_reward(spec, model=model)  # solves lambda exactly as a plain build does
    return {**spec, "lambda_": reward.lambda_}
