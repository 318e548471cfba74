"""ELEGANT's baselines (ELEGANT §8, MATH.md §2) as subclasses of `ElegantLearner` that override what differs.

    NO KL       alpha = 0 in training, no initial-distribution learning (AlignProp / DRaFT): maximise E[r(x_K)]
    Truncation  DRaFT-K: gradients flow only through the last `truncation_steps` steps (update on [t_{K-k}, T])
    Random-K    AlignProp: gradients flow through the last k ~ U{1..K} steps, k redrawn every update

Each reports J at the task's alpha through `evaluate()`. Truncation and Random-K maximise the reward alone, as
in ELEGANT §8 (`kl_penalty: true` adds the KL term back). Without the KL term nothing bounds the control, so
these learners default to a smaller step (lr 1e-3) and gradient clipping at 1 (see `ElegantOptions`), and to
the back-propagated gradient alone (pathwise_weight 1, as AlignProp and DRaFT define them).

Steps before the window run under torch.no_grad() (`DifferentiableLearner.drift_rollout`), so their
gradient contribution is exactly zero and the steps inside the window get plain back-propagation's.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from rlft.config import ConfigError
from rlft.control.elegant import ElegantLearner, ElegantOptions


@dataclasses.dataclass(frozen=True)
class NoKLOptions(ElegantOptions):
    """NO KL's options: ELEGANT's, without the KL term or the initial-distribution learning."""

    learn_init: bool = False
    """Learn the initial distribution: must stay false (at alpha = 0 the optimal initial law is degenerate)."""
    kl_penalty: bool = False
    """Keep the KL term: must stay false for NO KL (use type elegant for it)."""

    def __post_init__(self) -> None:
        if self.kl_penalty:
            raise ConfigError("learner.kl_penalty must be false for type no_kl (alpha = 0 in training); use type elegant for the KL term")
        super().__post_init__()


@dataclasses.dataclass(frozen=True)
class CutOptions(ElegantOptions):
    """Options of the learners that cut the gradient before a window: ELEGANT's, without KL term by default."""

    learn_init: bool = False
    """Learn the initial distribution (needs kl_penalty: true)."""
    kl_penalty: bool = False
    """Keep the alpha-weighted KL in the drift loss (ELEGANT §8 runs these baselines without it)."""

    def __post_init__(self) -> None:
        if self.drift_solver != "backprop":
            raise ConfigError(
                f"learner.drift_solver {self.drift_solver!r} is for type elegant (got it on a learner that cuts the path's "
                "gradient, which Adjoint Matching's regression would silently ignore); leave drift_solver: backprop"
            )
        super().__post_init__()
        if self.pathwise_weight is not None and self.pathwise_weight < 1.0:
            raise ConfigError(
                f"learner.pathwise_weight < 1 is for types elegant and no_kl (got {self.pathwise_weight}; this learner cuts "
                "the path's gradient); leave it at 1"
            )


@dataclasses.dataclass(frozen=True)
class TruncationOptions(CutOptions):
    """Truncation's options: the shared ones plus the window length."""

    truncation_steps: int = 10
    """Gradients flow through this many last steps (>= K: through every step)."""

    AT_LEAST_ONE: ClassVar[tuple[str, ...]] = CutOptions.AT_LEAST_ONE + ("truncation_steps",)


class NoKLLearner(ElegantLearner):
    """NO KL (AlignProp / DRaFT): maximise E[r] alone, no initial learning."""

    Options: ClassVar[type] = NoKLOptions
    name: ClassVar[str] = "no_kl"

    def default_pathwise_weight(self) -> float:
        return 1.0


class TruncationLearner(ElegantLearner):
    """Truncation (DRaFT-K): gradients only through the last `truncation_steps` steps."""

    Options: ClassVar[type] = TruncationOptions
    name: ClassVar[str] = "truncation"

    def default_pathwise_weight(self) -> float:
        return 1.0

    def grad_start(self) -> int:
        return max(self.model.num_steps - self.options.truncation_steps, 0)


class RandomKLearner(ElegantLearner):
    """Random-K (AlignProp): gradients through the last k ~ U{1..K} steps, redrawn every update."""

    Options: ClassVar[type] = CutOptions
    name: ClassVar[str] = "random_k"

    def default_pathwise_weight(self) -> float:
        return 1.0

    def grad_start(self) -> int:
        K = self.model.num_steps
        return K - int(torch.randint(1, K + 1, (1,), generator=self._rng))
