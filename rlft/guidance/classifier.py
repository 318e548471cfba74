"""Guidance baselines as controls of the pretrained chain: classifier guidance and the approximate optimal control.

Both are `rlft.sampling.Control` callables (k, x_k, cond) -> delta_k, so `rlft.sampling.sample` and
`rlft.evaluation.evaluate_run` run them like any fine-tuned sampler (and report their path KL exactly).
A `CoefficientChain`'s mean is m_k = c_x x + c_s score; replacing the score by score + g adds delta_k = c_s g,
with c_s = `mean_score[k]` ~ sigma^2(t_k) dt (the Euler-Maruyama coefficient of the score). A `ControlledChain`
over such a chain (a fine-tuned sampler) has the same coefficients, so it can be guided too.

1. Classifier guidance (ELEGANT App. E.3, after Dhariwal & Nichol 2021): a time-conditioned classifier
   P_t(y = 1 | x_t) of "x is in the top 10 %" on noisy x_t, and at sampling time

       score + gamma * grad_x log P_t(y = 1 | x)          =>   delta_k = c_s gamma grad_x log P_{t_k}(y = 1 | x_k)

   The classifier is trained on labelled data diffused by the forward VP kernel (`train_noisy_classifier`).

2. The approximate optimal control (TANG eq. 3.28):

       u~(t, x) = sigma^2(t) / alpha * grad_x E[r(x_T) | x_t = x]        =>   delta_k = c_s / alpha * grad_x E[r | x_k]

   with E[r(x_T) | x_t] ~ r(x0_hat(x_t)) and x0_hat Tweedie's denoised estimate
   x0_hat = (x + (1 - a^2) score(x)) / a at the level of step k (gradient taken through the score network).
   The exact optimal control is sigma^2 grad log E[exp(r/alpha) | x_t] (TANG eq. 3.27); the two agree to first
   order when r varies little given x_t, and differ the most at small alpha.

Notation: gamma `gamma` (guidance level), alpha the KL weight, a^2 = alpha_bar, c_s `mean_score[k]`.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from rlft.models.base import DiffusionModel
from rlft.models.nets import dyadic_time_features, mlp
from rlft.rewards.base import Reward, evaluate
from rlft.schedule import VPSchedule


def _check_chain(model: DiffusionModel, who: str) -> DiffusionModel:
    """The model, if its steps have `LevelCoefficients` (a `CoefficientChain`, or a `ControlledChain` over one)."""
    if not isinstance(model, DiffusionModel) or getattr(model, "coefficients", None) is None:
        raise TypeError(
            f"{who} needs a CoefficientChain (score-based chain such as ScoreNetChain or GMMModel, or a ControlledChain "
            f"over one) to turn a score shift into a mean shift (got {type(model).__name__})"
        )
    return model


@dataclass(frozen=True)
class ClassifierConfig:
    """Shape of the noisy classifier."""

    event_shape: tuple[int, ...]
    """Shape of one input x_t (flattened)."""
    hidden: int = 256
    """Width of the SiLU MLP."""
    depth: int = 3
    """Hidden layers."""
    num_frequencies: int = 8
    """Sinusoidal features of the noise level."""


class NoisyClassifier(nn.Module):
    """logit P_t(y = 1 | x_t): an MLP on [flatten(x_t), features of the noise std sqrt(1 - a(t)^2)]."""

    def __init__(self, config: ClassifierConfig) -> None:
        super().__init__()
        self.config = config
        # parameter names net.{0, 2, ...} as before the shared builder: saved classifiers still load
        self.net = mlp(math.prod(config.event_shape) + 2 * config.num_frequencies, config.hidden, config.depth, 1)

    def forward(self, x: torch.Tensor, noise_std: torch.Tensor) -> torch.Tensor:
        """Logits (B,) for states x (B, *event) at noise stds (B,)."""
        # [sin(pi 2^j n), cos(pi 2^j n)]_{j < F} of the noise std n = sqrt(1 - a^2) in [0, 1], (B, 2F)
        feats = dyadic_time_features(noise_std.to(x.dtype), x.shape[0], self.config.num_frequencies, like=x)
        return self.net(torch.cat([x.reshape(x.shape[0], -1), feats], dim=-1)).squeeze(-1)


def train_noisy_classifier(
    x0: torch.Tensor,
    labels: torch.Tensor,
    schedule: VPSchedule | None = None,
    steps: int = 2000,
    batch_size: int = 512,
    lr: float = 1e-3,
    hidden: int = 256,
    depth: int = 3,
    seed: int = 0,
    progress: bool = False,
) -> tuple[NoisyClassifier, dict[str, float]]:
    """Trains P_t(y | x_t) by cross-entropy on x_t = a(s) x0 + sqrt(1 - a(s)^2) eps, s ~ U(s_min T, T).

    Args:
        x0: clean labelled inputs (N, *event).
        labels: 0/1 labels (N,) (e.g. "in the top 10 % of the labelled rewards").
        schedule: the VP schedule of the model to be guided (default `VPSchedule()`).
        steps, batch_size, lr: Adam budget (cosine-decayed learning rate).
        hidden, depth: MLP shape.
        seed: seeds initialisation, batches, noise levels and noise.
    Returns:
        (classifier in eval mode, {"accuracy_clean": accuracy at s = s_min, "positive_rate": mean label}).
    """
    schedule = schedule or VPSchedule()
    x0 = torch.as_tensor(x0, dtype=torch.float32)
    y = torch.as_tensor(labels, dtype=torch.float32).reshape(-1)
    if y.shape[0] != x0.shape[0]:
        raise ValueError(f"x0 has {x0.shape[0]} rows but labels has {y.shape[0]}; they must match")
    if not torch.all((y == 0) | (y == 1)):
        raise ValueError("labels must be 0 or 1")
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clf = NoisyClassifier(ClassifierConfig(tuple(x0.shape[1:]), hidden, depth))
    opt = torch.optim.Adam(clf.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=lr / 10)
    lo, hi = schedule.s_min * schedule.T, schedule.T
    view = (-1,) + (1,) * (x0.ndim - 1)
    for _ in tqdm(range(steps), desc="noisy classifier", disable=not progress, leave=False):
        idx = torch.randint(x0.shape[0], (batch_size,), generator=gen)
        s = lo + (hi - lo) * torch.rand(batch_size, generator=gen)
        a = torch.exp(schedule.log_a(s))  # (B,)
        noise_std = torch.sqrt(1.0 - a * a)
        xt = a.view(view) * x0[idx] + noise_std.view(view) * torch.randn((batch_size, *x0.shape[1:]), generator=gen)
        loss = nn.functional.binary_cross_entropy_with_logits(clf(xt, noise_std), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    clf.eval().requires_grad_(False)
    with torch.no_grad():
        a = math.exp(schedule.log_a(lo))
        logits = clf(a * x0, torch.full((x0.shape[0],), math.sqrt(1 - a * a)))
    accuracy = float(((logits > 0).float() == y).float().mean())
    return clf, {"accuracy_clean": accuracy, "positive_rate": float(y.mean())}


class ClassifierGuidance:
    """delta_k = c_s * gamma * grad_x log P_{t_k}(y = 1 | x_k): classifier guidance as a control (module docstring 1)."""

    def __init__(self, model: DiffusionModel, classifier: NoisyClassifier, gamma: float) -> None:
        self.model = _check_chain(model, "ClassifierGuidance")
        if not gamma >= 0:
            raise ValueError(f"gamma (the guidance level) must be >= 0 (got {gamma})")
        self.classifier = copy.deepcopy(classifier).to(device=model.device, dtype=model.dtype).requires_grad_(False)
        self.gamma = float(gamma)

    def __call__(self, k: int, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        c = self.model.coefficients
        noise_std = x.new_full((x.shape[0],), math.sqrt(1.0 - c.alpha_bar[k]))
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            log_p = nn.functional.logsigmoid(self.classifier(xg, noise_std))  # (B,)
            (grad,) = torch.autograd.grad(log_p.sum(), xg)
        return (c.mean_score[k] * self.gamma) * grad


class ExpectedRewardGuidance:
    """delta_k = c_s / alpha * grad_x r(x0_hat(x_k)): TANG eq. 3.28 with Tweedie's estimate (module docstring 2).

    Each step evaluates the reward (and its gradient) once per sample: K reward queries per sample.
    """

    def __init__(self, model: DiffusionModel, reward: Reward, alpha: float, scale: float = 1.0) -> None:
        self.model = _check_chain(model, "ExpectedRewardGuidance")
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0 (got {alpha}); the control is sigma^2/alpha grad E[r | x_t]")
        if not getattr(reward, "differentiable", True):
            name = getattr(reward, "name", reward)
            raise ValueError(f"ExpectedRewardGuidance needs a differentiable reward (reward {name!r} is not)")
        self.reward, self.alpha, self.scale = reward, float(alpha), float(scale)
        self.queries = 0

    def denoised(self, k: int, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """Tweedie's x0_hat = (x + (1 - a^2) score_k(x)) / a, same shape as x (differentiable in x)."""
        ab = self.model.coefficients.alpha_bar[k]
        return (x + (1.0 - ab) * self.model.score(k, x, cond)) / math.sqrt(ab)

    def __call__(self, k: int, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            r = evaluate(self.reward, self.denoised(k, xg, cond))  # (B,)
            (grad,) = torch.autograd.grad(r.sum(), xg)
        self.queries += x.shape[0]
        return (self.model.coefficients.mean_score[k] * self.scale / self.alpha) * grad
