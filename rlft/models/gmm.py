"""Analytic Gaussian mixtures under the VP SDE: the exact test bed (MATH.md §3, ELEGANT Lemma 4).

Data p_data = sum_c w_c N(m_c, s_c^2 I). Its forward marginal at noise level with signal a is again a
mixture, sum_c w_c N(a m_c, (a^2 s_c^2 + 1 - a^2) I), so the score is exact at every level. For a
quadratic reward r(x) = -lam/2 |x - center|^2 or a linear reward r(x) = b . x the tilted target
p_tar = exp(r/alpha) p_data / C is a mixture in closed form:

    quadratic:  s'_c^2 = 1 / (1/s_c^2 + lam/alpha),  m'_c = s'_c^2 (m_c / s_c^2 + lam center / alpha)
                w'_c ∝ w_c N(center; m_c, (s_c^2 + alpha/lam) I)
                C = sum_c w_c (2 pi alpha/lam)^{d/2} N(center; m_c, (s_c^2 + alpha/lam) I)
    linear:     m'_c = m_c + s_c^2 b / alpha,  w'_c ∝ w_c exp(b.m_c/alpha + s_c^2 |b|^2 / (2 alpha^2))

so J* = alpha log C exactly. The optimal controlled chain is the pretrained chain run with the score of
the forward-diffused target (bridge preservation): u*(t, x) = sigma(t)^2 [score_tar - score_data](x, T-t),
and the optimal initial law is nu*(x) ∝ nu_ini(x) q_tar,T(x) / q_T(x).

Notation: weights w (C,), means m (C, D), stds s (C,), a = sqrt(alpha_bar).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rlft.models.base import CoefficientChain
from rlft.schedule import LevelCoefficients, VPSchedule

LOG_2PI = math.log(2 * math.pi)


@dataclass(frozen=True)
class GaussianMixture:
    """An isotropic Gaussian mixture: weights (C,), means (C, D), stds (C,)."""

    weights: torch.Tensor
    means: torch.Tensor
    stds: torch.Tensor

    def __post_init__(self) -> None:
        w, m, s = self.weights, self.means, self.stds
        if m.ndim != 2:
            raise ValueError(f"means must be a list of C points in D dimensions, shape (C, D) (got shape {tuple(m.shape)})")
        if w.shape != (m.shape[0],) or s.shape != (m.shape[0],):
            raise ValueError(
                f"weights and stds need one entry per component: {m.shape[0]} means, "
                f"{w.shape[0] if w.ndim else 0} weights, {s.shape[0] if s.ndim else 0} stds"
            )
        if (w < 0).any() or not torch.isclose(w.sum(), torch.ones((), dtype=w.dtype), atol=1e-6):
            raise ValueError(f"weights must be non-negative and sum to 1 (got {w.tolist()})")
        if (s <= 0).any():
            raise ValueError(f"stds must be > 0 (got {s.tolist()})")

    @staticmethod
    def create(weights, means, stds, dtype: torch.dtype = torch.float64) -> "GaussianMixture":
        """From Python lists; a scalar std is shared by all components."""
        m = torch.as_tensor(means, dtype=dtype)
        s = torch.as_tensor(stds, dtype=dtype)
        if s.ndim == 0:
            s = s.expand(m.shape[0]).clone()
        return GaussianMixture(torch.as_tensor(weights, dtype=dtype), m, s)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> "GaussianMixture":
        return GaussianMixture(*(t.to(device=device, dtype=dtype) for t in (self.weights, self.means, self.stds)))

    def component_log_probs(self, x: torch.Tensor) -> torch.Tensor:
        """log w_c + log N(x; m_c, s_c^2 I), shape (B, C)."""
        x = x.to(self.means.dtype)
        var = self.stds**2  # (C,)
        sq = ((x[:, None, :] - self.means[None]) ** 2).sum(-1)  # (B, C)
        return torch.log(self.weights) - 0.5 * sq / var - 0.5 * self.dim * (LOG_2PI + torch.log(var))

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x), shape (B,)."""
        return torch.logsumexp(self.component_log_probs(x), dim=-1)

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """grad_x log p(x) (responsibility-weighted), shape (B, D), in x's dtype (the float64 reference form)."""
        resp = torch.softmax(self.component_log_probs(x), dim=-1)  # (B, C)
        diff = (self.means[None] - x.to(self.means.dtype)[:, None, :]) / (self.stds**2)[None, :, None]  # (B, C, D)
        return (resp[..., None] * diff).sum(1).to(x.dtype)

    def score_table(self, dtype: torch.dtype, device: torch.device | str | None = None) -> "ScoreTable":
        """The constants of `ScoreTable.score` in one dtype (computed from the float64 parameters)."""
        var = self.stds**2
        log_norm = torch.log(self.weights) - 0.5 * self.dim * torch.log(var) - 0.5 * (self.means**2).sum(-1) / var
        return ScoreTable(*(t.to(device=device, dtype=dtype) for t in (self.means, 1.0 / var, log_norm)))

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        eps = torch.randn((n, self.dim), generator=generator, dtype=self.means.dtype)
        return self.means[comp] + self.stds[comp, None] * eps

    def mean(self) -> torch.Tensor:
        return (self.weights[:, None] * self.means).sum(0)

    def covariance(self) -> torch.Tensor:
        mu = self.mean()
        eye = torch.eye(self.dim, dtype=self.means.dtype)
        second = sum(
            w * (s**2 * eye + torch.outer(m, m)) for w, m, s in zip(self.weights, self.means, self.stds)
        )
        return second - torch.outer(mu, mu)

    def diffuse(self, alpha_bar: float) -> "GaussianMixture":
        """The forward marginal at signal fraction alpha_bar = a^2."""
        a = math.sqrt(alpha_bar)
        return GaussianMixture(self.weights, a * self.means, torch.sqrt(alpha_bar * self.stds**2 + (1.0 - alpha_bar)))

    # -- exact tilts (MATH.md §3) ------------------------------------------------------------------
    def tilt_quadratic(self, center, scale: float, alpha: float) -> tuple["GaussianMixture", float]:
        """exp(-scale/2 |x - center|^2 / alpha) p(x) / C; returns (target, log C)."""
        c = torch.as_tensor(center, dtype=self.means.dtype)
        var = self.stds**2
        new_var = 1.0 / (1.0 / var + scale / alpha)
        new_means = new_var[:, None] * (self.means / var[:, None] + scale * c / alpha)
        v = var + alpha / scale
        log_n = -0.5 * ((c - self.means) ** 2).sum(-1) / v - 0.5 * self.dim * (LOG_2PI + torch.log(v))
        log_terms = torch.log(self.weights) + 0.5 * self.dim * math.log(2 * math.pi * alpha / scale) + log_n
        log_c = torch.logsumexp(log_terms, 0)
        return GaussianMixture(torch.softmax(log_terms, 0), new_means, torch.sqrt(new_var)), float(log_c)

    def tilt_linear(self, direction, alpha: float) -> tuple["GaussianMixture", float]:
        """exp(b . x / alpha) p(x) / C; returns (target, log C)."""
        b = torch.as_tensor(direction, dtype=self.means.dtype)
        var = self.stds**2
        log_terms = torch.log(self.weights) + self.means @ b / alpha + var * (b @ b) / (2 * alpha**2)
        new_means = self.means + var[:, None] * b / alpha
        return GaussianMixture(torch.softmax(log_terms, 0), new_means, self.stds.clone()), float(torch.logsumexp(log_terms, 0))

    def tilt(self, reward, alpha: float) -> tuple["GaussianMixture", float]:
        """The exact tilted target for a reward that declares a linear or quadratic form."""
        form = getattr(reward, "exact_form", None)
        if form is None:
            raise NotImplementedError(
                f"reward {getattr(reward, 'name', reward)!r} has no closed-form tilt; only linear and quadratic "
                "rewards do. Use rlft.metrics.optimal_objective_mc for a Monte-Carlo J* instead."
            )
        kind, params = form
        if kind == "quadratic":
            return self.tilt_quadratic(params["center"], params["scale"], alpha)
        if kind == "linear":
            return self.tilt_linear(params["direction"], alpha)
        raise NotImplementedError(f"unknown exact form {kind!r}")


@dataclass(frozen=True)
class ScoreTable:
    """A mixture's score in the states' own dtype with matrix products (what the chain calls every step).

    With p_c = 1/s_c^2:  log w_c N(x; m_c, s_c^2 I) = const + log_norm_c + p_c x.m_c - p_c |x|^2 / 2,
    log_norm_c = log w_c - D/2 log s_c^2 - p_c |m_c|^2 / 2, so the responsibilities are a softmax of a (B, C)
    matrix product and the score sum_c resp_c p_c (m_c - x) is resp' m - x sum_c resp'_c with resp' = resp p.
    Agrees with `GaussianMixture.score` to float32 rounding (tested), at about half its cost.
    """

    means: torch.Tensor  # (C, D)
    precisions: torch.Tensor  # (C,)
    log_norm: torch.Tensor  # (C,)

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """grad_x log p(x) for x (B, D), shape (B, D)."""
        sq = (x * x).sum(-1, keepdim=True)  # (B, 1)
        logits = self.log_norm + self.precisions * (x @ self.means.T - 0.5 * sq)  # (B, C)
        resp = torch.softmax(logits, dim=-1) * self.precisions  # (B, C)
        return resp @ self.means - x * resp.sum(-1, keepdim=True)


@dataclass(frozen=True)
class ExactTarget:
    """The closed-form fine-tuning target for one (mixture, reward, alpha)."""

    mixture: GaussianMixture
    log_normaliser: float  # log C
    alpha: float

    @property
    def optimal_objective(self) -> float:
        """J* = alpha log C."""
        return self.alpha * self.log_normaliser


class GMMModel(CoefficientChain):
    """A Gaussian mixture whose exact score drives the VP chain (any dimension, any number of components)."""

    def __init__(self, data: GaussianMixture, num_steps: int = 100, schedule: VPSchedule | None = None) -> None:
        self.schedule = schedule or VPSchedule()
        super().__init__(LevelCoefficients.from_schedule(self.schedule, num_steps))
        self.data = data.to(torch.float64)
        self.event_shape = (data.dim,)
        # forward marginal at every level, computed once, and its score constants per (dtype, device)
        self._marginals = [self.data.diffuse(ab) for ab in self.coefficients.alpha_bar]
        self._tables: dict[tuple, list[ScoreTable]] = {}

    @staticmethod
    def create(weights, means, stds, num_steps: int = 100, schedule: VPSchedule | None = None) -> "GMMModel":
        return GMMModel(GaussianMixture.create(weights, means, stds), num_steps, schedule)

    def marginal(self, k: int) -> GaussianMixture:
        """The exact forward marginal at level k (level 0 is the noisiest)."""
        return self._marginals[k]

    def score(self, k: int, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        return _mixture_score(self._tables, self._marginals, k, x)

    # -- exact targets and the oracle control ----------------------------------------------------
    def exact_target(self, reward, alpha: float) -> ExactTarget:
        mixture, log_c = self.data.tilt(reward, alpha)
        return ExactTarget(mixture, log_c, alpha)

    def optimal_control(self, reward, alpha: float) -> "OptimalControl":
        return OptimalControl(self, self.exact_target(reward, alpha))


def build_gmm_model(cfg, num_steps: int) -> GMMModel:
    """The registry's `model: {type: gmm}` builder: a `rlft.config` GMM model config as a K = num_steps chain."""
    schedule = VPSchedule(beta_min=cfg.beta_min, beta_max=cfg.beta_max)
    return GMMModel.create(cfg.weights, cfg.means, cfg.stds, num_steps=num_steps, schedule=schedule)


class OptimalControl:
    """The exact optimal control of a GMM chain (bridge preservation) and its optimal initial law.

    delta*_k(x) = m_k^tar(x) - m_k(x), where m_k^tar is the chain's mean with the score of the forward-
    diffused target; continuous-time u*(t, x) = sigma(t)^2 [score_tar - score_data](x, T - t).
    """

    def __init__(self, model: GMMModel, target: ExactTarget, num_proposals: int = 64) -> None:
        self.model = model
        self.target = target
        self._target_marginals = [target.mixture.diffuse(ab) for ab in model.coefficients.alpha_bar]
        self._tables: dict[tuple, list[ScoreTable]] = {}
        self.num_proposals = num_proposals

    def __call__(self, k: int, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """delta*_k(x), same shape and dtype as x."""
        score_tar = _mixture_score(self._tables, self._target_marginals, k, x)
        return self.model.mean_from_score(k, x, score_tar) - self.model.mean(k, x)

    def drift(self, t: float, x: torch.Tensor) -> torch.Tensor:
        """Continuous-time u*(t, x) = sigma(t)^2 [score_tar - score_data](x, s = T - t)."""
        sched = self.model.schedule
        s = sched.T - t
        ab = sched.alpha_bar(s)
        tar, pre = self.target.mixture.diffuse(ab), self.model.data.diffuse(ab)
        return sched.beta(s) * (tar.score(x) - pre.score(x))

    def _log_ratio(self, x: torch.Tensor) -> torch.Tensor:
        """log q_tar,0(x) - log q_0(x) at the noisiest level, shape (B,)."""
        return self._target_marginals[0].log_prob(x) - self.model.marginal(0).log_prob(x)

    def init_sample(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x_0 ~ nu* ∝ nu_ini q_tar,0 / q_0 by sampling-importance-resampling from q_tar,0.

        Returns (x0 (n, D) in the model's dtype, log nu*(x0)/nu_ini(x0) (n,) up to the SIR estimate of
        the normaliser), so that its mean estimates KL(nu* || nu_ini).
        """
        m = n * self.num_proposals
        proposals = self._target_marginals[0].sample(m, generator)  # (m, D)
        # importance weights (nu_ini q_tar / q) / q_tar = nu_ini / q for proposals from q_tar,0
        log_ini = -0.5 * (proposals**2).sum(-1) - 0.5 * proposals.shape[1] * LOG_2PI
        log_w = log_ini - self.model.marginal(0).log_prob(proposals)
        log_z = torch.logsumexp(log_w, 0) - math.log(m)  # Z = E_ini[q_tar / q] = E_q_tar[nu_ini / q]
        log_ratio_all = self._log_ratio(proposals)
        idx = torch.multinomial(torch.softmax(log_w, 0), n, replacement=True, generator=generator)
        x0 = proposals[idx]
        return x0.to(self.model.dtype), (log_ratio_all[idx] - log_z).to(self.model.dtype)


def _mixture_score(cache: dict[tuple, list[ScoreTable]], marginals: list[GaussianMixture], k: int, x: torch.Tensor) -> torch.Tensor:
    """The score of marginals[k] at x by its cached `ScoreTable`; where that overflows (|x|^2 beyond float32, a
    diverging learner's states at |x| > 1e19) by the float64 reference form, so such a run reports its huge KL
    instead of dying on a NaN reward."""
    s = _score_tables(cache, marginals, x)[k].score(x)
    if x.dtype != torch.float64 and not bool(torch.isfinite(s).all()):
        s = marginals[k].to(device=x.device).score(x)
    return s


def _score_tables(cache: dict[tuple, list[ScoreTable]], marginals: list[GaussianMixture], x: torch.Tensor) -> list[ScoreTable]:
    """Per-level `ScoreTable`s of `marginals` in x's dtype and device, built once into `cache`."""
    key = (x.dtype, x.device)
    if key not in cache:
        # plain tensors even when first called under inference_mode (the envs step there), so that a later
        # differentiable rollout may save them for backward
        with torch.inference_mode(False), torch.no_grad():
            cache[key] = [m.score_table(x.dtype, x.device) for m in marginals]
    return cache[key]
