"""f-divergence regularisation: the exact f-tilted target and the reward r_f that samples it (TANG §4).

    max_p E_p[r] - alpha D_f(p || p_pre)  is solved by  p = (f')^{-1}((r - lambda)/alpha) p_pre
                                                                        (TANG Prop. 4.1, Eq. 4.3)

with the scalar lambda fixed by normalisation, E_pre[(f')^{-1}((r - lambda)/alpha)] = 1. Over pretrained
samples this is a 1-D monotone root (`solve_lambda`, bisection). Writing the density ratio as
exp(r_f), r_f(x) = log (f')^{-1}((r(x) - lambda)/alpha), the KL machinery of rlft with reward r_f and
alpha = 1 samples p (TANG Cor. 4.4); `rlft.rewards.f_regularised.FRegularisedReward` (registry name
`f_regularised`) is that reward.

Notation: f (convex, f(1) = 0) -> `f`; f' -> `f_prime`; (f')^{-1} -> `f_prime_inv`; lambda -> `lambda_`;
y = (r - lambda)/alpha; w = (f')^{-1}(y) = p/p_pre (the density ratio, "tilt weight").

Where f' is bounded below on t > 0 (chi^2: f'(t) = 2(t - 1) >= -2) the KKT conditions of TANG's proof
keep their multiplier kappa(x) >= 0 active where p(x) = 0, so the exact ratio is (f')^{-1} extended by 0
below the range of f': w = max(1 + y/2, 0) for chi^2. Every other built-in f' is unbounded below and
w > 0 everywhere.

TANG Def. 4.2 drops lambda and, for r >= 0 outside the domain of (f')^{-1}, uses (-f')^{-1}, which is
decreasing (p ∝ p_pre / r for forward KL). `tang_def42_reward` offers Def. 4.2 only where it agrees in
direction with the exact route and raises otherwise (MATH.md §4).

The divergence names live in ONE place, the `divergence` lines of `rlft.registry` (each names one of the
factories below); `get_divergence` parses an option string ("kl", "forward_kl", "gamma:0.3", or a user's
"module:attr"). Pure torch math: no rewards, no YAML, no Ray, diffusers or gymnasium imports.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

import rlft.registry as registry

Map = Callable[[torch.Tensor], torch.Tensor]


# -- the divergence record ------------------------------------------------------------------------


@dataclass(frozen=True)
class FDivergence:
    """An f-divergence D_f(p || q) = E_q[f(p/q)] given by f, f' and (f')^{-1} (torch maps, elementwise)."""

    name: str
    """The name `get_divergence` parses (e.g. "kl", "gamma:0.5")."""
    f: Map | None
    """The convex generator f(t), t > 0, with f(1) = 0 (None when only f' is known)."""
    f_prime: Map
    """f'(t), strictly increasing on t > 0."""
    f_prime_inv: Map
    """(f')^{-1}(y) on `domain`, and 0 below domain[0] when that is finite (the KKT clip)."""
    domain: tuple[float, float] = (-math.inf, math.inf)
    """(inf, sup) of the range of f' on t > 0: the open interval where (f')^{-1} is defined and > 0."""
    log_f_prime_inv: Map | None = None
    """log (f')^{-1}(y), where a direct form is more accurate than log of the ratio (e.g. KL: y - 1)."""

    @property
    def clips_at_zero(self) -> bool:
        """True when f' is bounded below, so the ratio is 0 for y <= domain[0] (p vanishes there)."""
        return math.isfinite(self.domain[0])

    def ratio(self, y: torch.Tensor) -> torch.Tensor:
        """w = (f')^{-1}(y), checked against the domain (raises for y >= sup of the range of f')."""
        _check_domain(self, y)
        return self.f_prime_inv(y)

    def log_ratio(self, y: torch.Tensor, min_ratio: float = 1e-6) -> torch.Tensor:
        """log (f')^{-1}(y), finite everywhere, with a gradient everywhere.

        Where f' is bounded below the exact ratio is 0 for y <= domain[0] (log = -inf). Below y0 = f'(min_ratio)
        the log-ratio continues as the straight line log(min_ratio) + (y - y0): the weight exp(r_f) stays below
        min_ratio there (the target differs from the exact one by less than that), and the slope 1 in y (1/alpha
        in r, as KL's log ratio y - 1 has) still points a gradient learner from the zero-ratio region towards
        the rewards the target keeps. (A flat floor at log(min_ratio) gave no gradient to the ~90 % of
        pretrained samples under the chi^2 cut on TFBind8 at alpha = 0.01, and the learner never moved.)
        """
        _check_domain(self, y)
        if self.clips_at_zero:
            y0 = float(self.f_prime(torch.tensor(float(min_ratio), dtype=torch.float64)))
            inside = torch.log(self.f_prime_inv(y.clamp_min(y0)))  # >= log(min_ratio), exact where y >= y0
            return torch.where(y >= y0, inside, math.log(min_ratio) + (y - y0))
        if self.log_f_prime_inv is not None:
            return self.log_f_prime_inv(y)
        return torch.log(self.f_prime_inv(y))


def _check_domain(div: FDivergence, y: torch.Tensor) -> None:
    hi = div.domain[1]
    if math.isfinite(hi):
        bad = ~(y.detach() < hi)
        if bad.any():
            i = int(bad.nonzero()[0, 0]) if y.ndim else 0
            raise ValueError(
                f"divergence {div.name!r}: (f')^{{-1}}(y) needs y = (r - lambda)/alpha < {hi} (got y = "
                f"{y.reshape(-1)[i].item():.6g} at index {i}; {int(bad.sum())} values out of range); the reward "
                "exceeds what lambda was solved for: solve lambda on more pretrained samples or pass max_ratio"
            )


# -- built-ins ------------------------------------------------------------------------------------


def kl() -> FDivergence:
    return FDivergence(
        name="kl",
        f=lambda t: torch.xlogy(t, t),
        f_prime=lambda t: torch.log(t) + 1.0,
        f_prime_inv=lambda y: torch.exp(y - 1.0),
        log_f_prime_inv=lambda y: y - 1.0,
    )


def forward_kl() -> FDivergence:
    return FDivergence(
        name="forward_kl",
        f=lambda t: -torch.log(t),
        f_prime=lambda t: -1.0 / t,
        f_prime_inv=lambda y: -1.0 / y,
        domain=(-math.inf, 0.0),
        log_f_prime_inv=lambda y: -torch.log(-y),
    )


def gamma_divergence(gamma: float) -> FDivergence:
    """The gamma-divergence, gamma in (0, 1): KL as gamma -> 0, forward KL as gamma -> 1 (TANG §4).

    f(t) = (t^{1-g} - (1-g) t - g) / (g (g-1)), f'(t) = (1 - t^{-g}) / g, (f')^{-1}(y) = (1 - g y)^{-1/g}, y < 1/g.
    """
    g = float(gamma)
    if not 0.0 < g < 1.0:
        raise ValueError(f"gamma must be in (0, 1) (got {gamma}); use 'kl' for gamma -> 0 and 'forward_kl' for gamma -> 1")
    return FDivergence(
        name=f"gamma:{g:g}",
        f=lambda t: (t.pow(1.0 - g) - (1.0 - g) * t - g) / (g * (g - 1.0)),
        f_prime=lambda t: (1.0 - t.pow(-g)) / g,
        f_prime_inv=lambda y: (1.0 - g * y).pow(-1.0 / g),
        domain=(-math.inf, 1.0 / g),
        log_f_prime_inv=lambda y: -torch.log1p(-g * y) / g,
    )


def chi2() -> FDivergence:
    return FDivergence(
        name="chi2",
        f=lambda t: (t - 1.0).pow(2),
        f_prime=lambda t: 2.0 * (t - 1.0),
        f_prime_inv=lambda y: (1.0 + 0.5 * y).clamp_min(0.0),  # 0 below y = -2: the KKT clip
        domain=(-2.0, math.inf),
    )


def js() -> FDivergence:
    # f(t) = 1/2 [t log t - (1+t) log((1+t)/2)]: JS(p, q) = 1/2 KL(p || m) + 1/2 KL(q || m), m = (p+q)/2.
    half_log2 = 0.5 * math.log(2.0)
    return FDivergence(
        name="js",
        f=lambda t: 0.5 * (torch.xlogy(t, t) - (1.0 + t) * torch.log((1.0 + t) / 2.0)),
        f_prime=lambda t: 0.5 * torch.log(2.0 * t / (1.0 + t)),
        f_prime_inv=lambda y: torch.exp(2.0 * y) / (2.0 - torch.exp(2.0 * y)),
        domain=(-math.inf, half_log2),
        log_f_prime_inv=lambda y: 2.0 * y - torch.log(2.0 - torch.exp(2.0 * y)),
    )


def hellinger() -> FDivergence:
    # squared Hellinger, f(t) = (sqrt t - 1)^2 = gamma:0.5 / 2
    return FDivergence(
        name="hellinger",
        f=lambda t: (t.sqrt() - 1.0).pow(2),
        f_prime=lambda t: 1.0 - t.rsqrt(),
        f_prime_inv=lambda y: (1.0 - y).pow(-2),
        domain=(-math.inf, 1.0),
        log_f_prime_inv=lambda y: -2.0 * torch.log1p(-y),
    )


def custom_divergence(
    f_prime: Map,
    f_prime_inv: Map,
    f: Map | None = None,
    name: str = "custom",
    domain: tuple[float, float] = (-math.inf, math.inf),
) -> FDivergence:
    """Any f-divergence given f' (strictly increasing on t > 0) and its inverse on `domain`.

    Args:
        f_prime: t -> f'(t), elementwise on tensors.
        f_prime_inv: y -> (f')^{-1}(y) >= 0; must return 0 below domain[0] when that is finite.
        f: the generator itself (optional; only reporting uses it).
        name: display name.
        domain: (inf, sup) of the range of f' on t > 0.
    """
    return FDivergence(name=name, f=f, f_prime=f_prime, f_prime_inv=f_prime_inv, domain=tuple(domain))


def divergence_names() -> list[str]:
    """The option strings a divergence may take: the registry's names, then "gamma:G" (G in (0, 1))."""
    return [*registry.names("divergence"), "gamma:G"]


def get_divergence(name: str | FDivergence) -> FDivergence:
    """The divergence behind an option string: a registry name, "gamma:G" for G in (0, 1), or "module:attr".

    "gamma:G" is parsed before any registry lookup because it contains the ':' of a "module:attr" path.
    """
    if isinstance(name, FDivergence):
        return name
    if not isinstance(name, str):
        raise ValueError(f"divergence must be a string, one of {divergence_names()} (got {name!r})")
    key = name.strip().lower()
    if key == "gamma" or key.startswith("gamma:"):
        _, _, value = key.partition(":")
        try:
            g = float(value)
        except ValueError:
            raise ValueError(f"divergence {name!r}: write the gamma-divergence as 'gamma:G' with G in (0, 1), e.g. 'gamma:0.5'") from None
        return gamma_divergence(g)
    if key in registry.names("divergence"):
        factory = registry.resolve("divergence", key)
    elif ":" in name:  # a user's factory, "my_module:my_divergence" (its case kept)
        factory = registry.resolve("divergence", name.strip())
    else:
        raise ValueError(f"unknown divergence {name!r}; choose one of {divergence_names()} (e.g. 'gamma:0.5')")
    div = factory() if not isinstance(factory, FDivergence) else factory
    if not isinstance(div, FDivergence):
        raise ValueError(f"divergence {name!r} must name an FDivergence or a factory () -> FDivergence (got {type(div).__name__})")
    return div


# -- the exact lambda root and the f-tilted reward ------------------------------------------------


def f_tilt_weights(
    rewards: torch.Tensor, alpha: float, divergence: str | FDivergence, lambda_: float, max_ratio: float | None = None
) -> torch.Tensor:
    """The density ratio w = p/p_pre = (f')^{-1}((r - lambda)/alpha) of the f-tilted target (TANG Eq. 4.3).

    Args:
        rewards: r (n,).
        alpha: divergence weight, > 0.
        divergence: an `FDivergence` or its name.
        lambda_: the normalising constant (`solve_lambda`).
        max_ratio: if given, y is capped at f'(max_ratio) so rewards beyond what lambda was solved for give
            ratio max_ratio instead of an error (only matters when f' is bounded above).
    Returns:
        w (n,), >= 0.
    """
    div = get_divergence(divergence)
    return div.ratio(_scaled(rewards, alpha, div, lambda_, max_ratio))


def _scaled(rewards, alpha, div: FDivergence, lambda_: float, max_ratio: float | None) -> torch.Tensor:
    check_alpha(alpha)
    y = (rewards - lambda_) / alpha
    if max_ratio is not None and math.isfinite(div.domain[1]):
        cap = float(div.f_prime(torch.tensor(float(max_ratio), dtype=torch.float64)))
        y = y.clamp_max(cap)
    return y


def check_alpha(alpha: float) -> None:
    if not (isinstance(alpha, (int, float)) and alpha > 0 and math.isfinite(alpha)):
        raise ValueError(f"alpha must be a finite number > 0 for f-divergence regularisation (got {alpha!r})")


def solve_lambda(
    rewards: torch.Tensor, alpha: float, divergence: str | FDivergence, tol: float = 1e-12, max_iter: int = 200
) -> float:
    """The exact lambda with mean_i (f')^{-1}((r_i - lambda)/alpha) = 1 (TANG Prop. 4.1, MATH.md §4).

    g(lambda) = mean_i (f')^{-1}((r_i - lambda)/alpha) is non-increasing in lambda. Since the ratio is >= 0
    and (f')^{-1}(f'(t)) = t, the bracket is explicit and respects the domain of (f')^{-1}:
        lambda_hi = max r - alpha f'(1)  -> every ratio <= 1, so g <= 1;
        lambda_lo = max r - alpha f'(n)  -> the largest ratio is n,  so g >= 1.
    (Forward KL: [max r + alpha/n, max r + alpha], inside lambda > max r as its domain y < 0 needs.)

    Args:
        rewards: r(x_i) (n,) over pretrained samples x_i ~ p_pre (computed in float64).
        alpha: divergence weight, > 0.
        divergence: an `FDivergence` or its name.
        tol: absolute tolerance on lambda (bisection stops earlier when the interval stops shrinking).
        max_iter: bisection steps at most.
    Returns:
        lambda (float).
    """
    div = get_divergence(divergence)
    check_alpha(alpha)
    r = torch.as_tensor(rewards).detach().to(torch.float64).reshape(-1)
    n = r.numel()
    if n == 0 or not torch.isfinite(r).all():
        raise ValueError(f"solve_lambda needs a non-empty vector of finite rewards (got {n} values, finite: {bool(torch.isfinite(r).all())})")

    def g(lam: float) -> float:
        return float(div.f_prime_inv((r - lam) / alpha).mean())

    r_max = float(r.max())
    fp = div.f_prime(torch.tensor([1.0, float(n)], dtype=torch.float64))
    lo, hi = r_max - alpha * float(fp[1]), r_max - alpha * float(fp[0])
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"divergence {div.name!r}: f'(1) and f'(n) must be finite to bracket lambda (got {fp.tolist()})")
    if n == 1 or lo == hi:
        return hi
    g_lo, g_hi = g(lo), g(hi)
    if not (g_lo >= 1.0 - 1e-12 and g_hi <= 1.0 + 1e-12):
        raise ValueError(
            f"divergence {div.name!r}: no sign change of mean (f')^{{-1}} - 1 on [{lo:.6g}, {hi:.6g}] "
            f"(values {g_lo:.6g}, {g_hi:.6g}); check that f' is increasing and f_prime_inv is its inverse"
        )
    for _ in range(max_iter):
        mid = 0.5 * (lo + hi)
        if mid <= lo or mid >= hi or hi - lo <= tol:
            break
        if g(mid) > 1.0:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def f_reward(
    rewards_or_fn: torch.Tensor | Callable[[torch.Tensor], torch.Tensor],
    alpha: float,
    divergence: str | FDivergence,
    lambda_: float,
    max_ratio: float | None = None,
    min_ratio: float = 1e-6,
) -> torch.Tensor | Callable[[torch.Tensor], torch.Tensor]:
    """r_f = log (f')^{-1}((r - lambda)/alpha): with alpha = 1, the KL target exp(r_f) p_pre is p (TANG Cor. 4.4).

    Args:
        rewards_or_fn: r (n,), or a reward function x -> r (then a function x -> r_f is returned).
        alpha, divergence, lambda_: as in `f_tilt_weights`.
        max_ratio: cap of the ratio for rewards beyond the pretrained range (see `f_tilt_weights`).
        min_ratio: where the exact ratio is below it (chi^2 near and below y = -2), r_f continues as a line of
            slope 1 in y from log(min_ratio) (`FDivergence.log_ratio`), finite and with a gradient.
    Returns:
        r_f (n,), differentiable in r; or the function x -> r_f(x).
    """
    div = get_divergence(divergence)
    if callable(rewards_or_fn) and not isinstance(rewards_or_fn, torch.Tensor):
        fn = rewards_or_fn
        return lambda x: div.log_ratio(_scaled(fn(x), alpha, div, lambda_, max_ratio), min_ratio)
    return div.log_ratio(_scaled(rewards_or_fn, alpha, div, lambda_, max_ratio), min_ratio)


def tang_def42_reward(rewards: torch.Tensor, alpha: float, divergence: str | FDivergence) -> torch.Tensor:
    """TANG Def. 4.2 / Eq. 4.6: r_f = log (f')^{-1}(r/alpha) (no lambda), only where it is increasing in r.

    Def. 4.2 assumes r >= 0 and, where r/alpha leaves the domain of (f')^{-1}, switches to (-f')^{-1}, which is
    decreasing because f' is increasing: the target then favours LOW rewards (forward KL: p ∝ p_pre / r).
    This function therefore offers only the (f')^{-1} branch, and only for divergences whose domain holds
    r = 0; values r/alpha outside it raise. It agrees with the exact route for KL (up to a constant).

    Args:
        rewards: r (n,); alpha: > 0; divergence: an `FDivergence` or its name.
    Returns:
        r_f (n,).
    """
    div = get_divergence(divergence)
    check_alpha(alpha)
    lo, hi = div.domain
    if not lo < 0.0 < hi:
        raise ValueError(
            f"TANG Def. 4.2 is not offered for divergence {div.name!r}: with rewards r >= 0 (Def. 4.2's setting) "
            f"r/alpha lies outside the domain ({lo}, {hi}) of (f')^{{-1}}, and the paper's fallback (-f')^{{-1}} is "
            "decreasing in r (for forward KL p ∝ p_pre / r favours low rewards). Use the exact route instead: "
            "lambda_ = solve_lambda(pretrained_rewards, alpha, divergence); f_reward(r, alpha, divergence, lambda_)"
        )
    y = rewards / alpha
    bad = ~(y.detach() < hi) | ~(y.detach() > lo)
    if bad.any():
        raise ValueError(
            f"TANG Def. 4.2 with divergence {div.name!r} needs r/alpha in ({lo}, {hi}) (got {int(bad.sum())} values "
            f"outside, e.g. r/alpha = {y[bad][0].item():.6g}); beyond it Def. 4.2 switches to the decreasing (-f')^{{-1}}. "
            "Use the exact route (solve_lambda + f_reward) or a larger alpha"
        )
    return div.log_ratio(y)
