"""S-MEME's options (`learner: {type: smeme}`) and the round exponents beta_j of its exact targets
(rlft.control.smeme has the algorithm; MATH.md §6)."""

from __future__ import annotations

import dataclasses
import math

from rlft.config import ConfigError
from rlft.control.adjoint_matching import AdjointMatchingOptions

ALPHA_SCHEDULES = ("constant", "increasing")
PREVIOUS_SCORES = ("terminal", "network")
#: defaults, per round (measured: see SMEMEOptions)
DEFAULT_LR, DEFAULT_ROUND_ITERATIONS = 1e-2, 150


@dataclasses.dataclass(frozen=True)
class SMEMEOptions(AdjointMatchingOptions):
    """S-MEME's options (the YAML `learner:` keys besides `type`); `drift_iterations` counts updates PER ROUND.

    Defaults: 3 rounds at alpha = 4 (beta = 0.42), 150 updates of 256 trajectories per round, lr 1e-2 (cosine to
    lr_final each round), loss_weighting uniform (the one change from last session's defaults), the previous round's
    score read from its chain, no warm start, no clipping. Measured (one run each, K = 50, 2 shared cores; closure =
    PF-ODE entropy (H_j - H_0) / (H*_j - H*_0) on common random numbers, "knn" = nearest-neighbour entropy of the
    sampler's own samples, "off" = share beyond 3 stds of every component, alt's exact-target samples: knn 2.87):
    - the previous session's defaults (path_kl weighting, no clipping, 150 updates, previous score read from the
      previous chain at level K-1): 10:1 mixture 92 % of the way after 3 rounds, but the bench's "alt" mixture
      (6:3:1, stds 0.5 / 0.3 / 0.4) 11 %: the score read at level K-1 has the least weight in the regression
      (c_k^2 / s_k^2 ~ s_k^2) and its error grew 0.33 / 0.78 / 1.37 (relative, vs beta_j s_pre) over the rounds;
    - uniform weighting (the default): alt closure 0.66 / 0.75 / 0.96, knn 2.20 -> 2.50, off 0.025 -> 0.074,
      energy distance 2.7x the floor; NOT general: 10:1 closure 1.18 / 1.04 / 1.06 but 1.1 / 2.3 / 4.8x the floor
      (small-cluster mass 0.089 -> 0.149 against the exact 0.270: the big cluster spreads, little mass moves);
      "skew" (15:4:1, stds 0.6 / 0.25 / 0.35) 0.06 / -0.18 / -0.03 and 12x, the level-(K-1) score error 0.33 /
      0.76 / 1.31 again;
    - path_kl weighting with previous_score terminal: alt 0.33 / 0.27 / 0.19, 2.0x (rounds 2-3 barely move: the
      high-noise steps this weighting favours set the mode masses, small 0.105 -> 0.166 of 0.212, not the spread);
    - + previous_score terminal: 0.66 / 0.59 / 0.76, knn 2.44, off 0.051, 2.3x; + warm_start and batch 512 x 100:
      0.15 / 0.49 / 0.63, knn 2.40, off 0.040, 1.9x; + clipping at 0.99 (batch 256 x 100): 0.68 / 0.57 / 0.61,
      knn 2.68 but off 0.109 and 6.9x the floor (the terminal score keeps pushing mass the previous round already
      sent off the support, where mirror descent on the round's own score damps it);
    - round 1 on alt, closure every 25 updates: unclipped -0.02 / 0.97 / 0.54 / 0.80 / 0.46 / 0.85 / 0.82 / 0.82 (regression loss 80 ->
      2700: a few paths' adjoints dominate); clipped at the 0.99 quantile 0.84 / 0.68 / 0.81 / 0.81 / 0.60 / 0.79 /
      0.83 / 0.85 (loss ~100), path KL 0.048 against the exact round's 0.052.
    """

    loss_weighting: str = "uniform"
    """As Adjoint Matching's, default uniform here: every noise level counts alike (measured below)."""
    rounds: int = 3
    """Mirror-descent rounds R (a list `alpha_schedule` fixes them: its length)."""
    alpha: float = 4.0
    """KL weight of each round (constant) or of the first (increasing: alpha_j = alpha * j); must be > 1."""
    alpha_schedule: str | list[float] = "constant"
    """constant | increasing | an explicit list [alpha_1, .., alpha_R] (each > 1)."""
    entropy_samples: int = 2000
    """Samples of each entropy / energy-distance figure in `evaluate` and at each round's end."""
    warm_start: bool = False
    """Start round j >= 2 from round j-1's network with its output scaled by rho_j = (beta_{j-1} / alpha_j) /
    (beta_{j-2} / alpha_{j-1}), the ratio of the two rounds' exact data-level score increments -beta_{i-1} s_pre /
    alpha_i (0.75 at constant alpha = 4), instead of from zero: the fixed point is the same, the start nearer to it."""
    previous_score: str = "network"
    """Where round j reads s^{j-1} (its reward gradient is -s^{j-1}): terminal (the previous rounds' data-level score
    by their terminal condition, s^i = s^{i-1} + grad f_i / alpha_i, i.e. beta_{j-1} s_pre (+ the reward's share)) or
    network (the previous round's chain, pretrained score plus its controls, read at the last level K-1)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rounds < 1:
            raise ConfigError(f"learner.rounds must be an integer >= 1 (got {self.rounds})")
        if self.entropy_samples < 2:
            raise ConfigError(f"learner.entropy_samples must be an integer >= 2 (got {self.entropy_samples})")
        if isinstance(self.alpha_schedule, str) and self.alpha_schedule not in ALPHA_SCHEDULES:
            raise ConfigError(f"learner.alpha_schedule must be one of {list(ALPHA_SCHEDULES)} or a list of numbers "
                              f"(got {self.alpha_schedule!r})")
        if self.previous_score not in PREVIOUS_SCORES:
            raise ConfigError(f"learner.previous_score must be one of {list(PREVIOUS_SCORES)} (got {self.previous_score!r})")
        if isinstance(self.alpha_schedule, list) and not self.alpha_schedule:
            raise ConfigError("learner.alpha_schedule must not be an empty list; give one alpha per round, e.g. [4, 8]")
        for j, a in enumerate(self.alphas(), start=1):
            if not (a > 1.0 and math.isfinite(a)):
                key = "learner.alpha" if isinstance(self.alpha_schedule, str) else f"learner.alpha_schedule[{j - 1}]"
                raise ConfigError(
                    f"{key} must be > 1 (got alpha_{j} = {a}): round {j}'s target p_pre^beta, beta = prod (1 - 1/alpha_i), "
                    "is normalisable on an unbounded support (every rlft chain samples R^d) only for beta > 0; "
                    "use alpha > 1, e.g. 4")

    def alphas(self) -> list[float]:
        """[alpha_1, .., alpha_R]."""
        if isinstance(self.alpha_schedule, list):
            return [float(a) for a in self.alpha_schedule]
        if self.alpha_schedule == "increasing":
            return [self.alpha * j for j in range(1, self.rounds + 1)]
        return [self.alpha] * self.rounds


def round_exponents(alphas: list[float]) -> list[float]:
    """beta_j = prod_{i <= j} (1 - 1/alpha_i): round j's exact target is p_pre^{beta_j} (normalised)."""
    out, beta = [], 1.0
    for a in alphas:
        beta *= 1.0 - 1.0 / a
        out.append(beta)
    return out
