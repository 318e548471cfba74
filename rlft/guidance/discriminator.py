"""The noisy, time-conditioned logit network l_phi(x, k) of discriminator guidance and its losses (BOOST §3).

With P the data law and P~ the pretrained model's, the corrected reverse process uses the score
s_theta + grad log(p_k / p~_k) (BOOST Thm 2, eq. 3.2). A discriminator d = sigmoid(l_phi) (data = label 1,
model samples = label 0) estimates the ratio as d / (1 - d) = exp(l_phi), so the score correction is
grad_x l_phi(x_k, k), and on the chain the displacement is delta_k = c_k w grad_x l_phi(x_k, k)
(`rlft.guidance.discriminator_guidance.DiscriminatorGuidance`). It is NOT grad log d = (1 - d) grad l_phi,
which classifier guidance applies. f-PG's discriminator (rlft/rllib/fpg.py) labels the other way round.

Losses, each over levels k of the chain and samples diffused to level k by the forward kernel
x_k = a_k x_0 + n_k eps (a_k = sqrt(alpha_bar_k), n_k = sqrt(1 - alpha_bar_k)):

    J_CE  (eq. 3.4)   = -E_data log sigmoid(l_phi(x_k, k)) - E_model log(1 - sigmoid(l_phi(x_k, k)))   (halved)
    J_MSE (eq. 3.8, the intended form: equal to J_SM of eq. 3.7 up to a constant by Prop. 1)
                      = sum_k lambda_k E_{x_0 ~ data, eps} | grad log q_k(x_k | x_0) - s_theta(x_k, k) - grad_x l_phi(x_k, k) |^2
                        grad log q_k(x_k | x_0) = -eps / n_k,   lambda_k ∝ c_k^2 / (2 s_k^2)
                        (the printed eq. 3.8 lacks the grad on l_phi and has a sign slip)
    J_train (eq. 3.10) = J_MSE + gamma J_CE

lambda_k = c_k^2 / (2 s_k^2) makes sum_k lambda_k E|g_k - exact_k|^2 the path KL between the data's reverse
chain and the refined chain (BOOST Thm 4 on the discrete chain): `score_error` reports it (E_phi, and
E_theta for the uncorrected model, g = 0). J_MSE differentiates grad_x l_phi with respect to phi: double
back-propagation (`create_graph=True`), so the network must be smooth (SiLU).

Notation: c_k `mean_score[k]` (the score's coefficient in the mean), s_k `std(k)`, n_k `noise_std`,
l `logit`, w `weight`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from rlft.guidance.classifier import ClassifierConfig, NoisyClassifier
from rlft.models.base import DiffusionModel
from rlft.models.nets import dyadic_time_features, mlp

# training-metric keys
CE_LOSS = "ce_loss"
MSE_LOSS = "mse_loss"
TRAIN_LOSS = "train_loss"
ACCURACY = "discriminator_accuracy"

#: the logit network l_phi(x, n_k): the noisy classifier's MLP on [x, features of the noise std] (one network
#: for classifier and discriminator guidance; the convention, data = 1, is this module's)
LogitNet = NoisyClassifier


def logit_net(event_shape: tuple[int, ...], hidden: int, depth: int, num_frequencies: int,
              network: str = "auto") -> nn.Module:
    """A fresh l_phi (SiLU: smooth, so its input gradient can be differentiated again): an MLP on the flattened state
    (`LogitNet`), or for image events (C, H, W) a small conv net (`ConvLogitNet`); network auto picks conv for images."""
    kind = ("conv" if len(event_shape) == 3 else "mlp") if network == "auto" else network
    if kind == "conv":
        if len(event_shape) != 3:
            raise ValueError(f"a conv discriminator needs image events (C, H, W) (got event shape {tuple(event_shape)}); "
                             "use network: mlp")
        return ConvLogitNet(tuple(event_shape), hidden, depth, num_frequencies)
    return NoisyClassifier(ClassifierConfig(tuple(event_shape), hidden, depth, num_frequencies))


class ConvLogitNet(nn.Module):
    """l_phi(x, n) for images (B, C, H, W): [x, features of n as constant channels] -> `depth` 3x3 convs (SiLU) ->
    spatial mean -> SiLU MLP -> logit (B,). Average pooling and SiLU keep grad_x l smooth (double back-propagation)."""

    def __init__(self, event_shape: tuple[int, int, int], hidden: int, depth: int, num_frequencies: int) -> None:
        super().__init__()
        self.event_shape, self.num_frequencies = tuple(event_shape), num_frequencies
        channels, layers = event_shape[0] + 2 * num_frequencies, []
        for _ in range(max(depth, 1)):
            layers += [nn.Conv2d(channels, hidden, 3, padding=1), nn.SiLU()]
            channels = hidden
        self.convs = nn.Sequential(*layers)
        self.head = mlp(hidden + 2 * num_frequencies, hidden, 1, 1)

    def forward(self, x: torch.Tensor, noise_std: torch.Tensor) -> torch.Tensor:
        """Logits (B,) for states x (B, C, H, W) at noise stds (B,)."""
        feats = dyadic_time_features(noise_std.to(x.dtype), x.shape[0], self.num_frequencies, like=x)  # (B, 2F)
        planes = feats[:, :, None, None].expand(-1, -1, *x.shape[2:])  # (B, 2F, H, W)
        h = self.convs(torch.cat([x, planes], dim=1)).mean(dim=(2, 3))  # (B, hidden)
        return self.head(torch.cat([h, feats], dim=-1)).squeeze(-1)


def level_constants(model: DiffusionModel) -> tuple[list[float], list[float]]:
    """(alpha_bar_k, c_k) for k < K: the signal level step k starts at and the score's coefficient in its mean."""
    K = model.num_steps
    coefficients = getattr(model, "coefficients", None)
    if coefficients is not None:
        return list(coefficients.alpha_bar[:K]), list(coefficients.mean_score[:K])
    # a diffusers chain (or a ControlledChain over one): alpha_bar from its step plan, c_k from score_coefficients
    base = getattr(model, "base", model)
    level_alpha_bar = getattr(base, "_level_alpha_bar", None)
    pairs = [model.score_coefficients(k) for k in range(K)] if level_alpha_bar is not None else [None]
    if any(p is None for p in pairs):
        raise TypeError(
            f"discriminator guidance needs a score-based chain whose mean is affine in the score (GMMModel, ScoreNetChain, "
            f"a DiffusersChain without x0 clipping, or a ControlledChain over one) to diffuse data to each level and "
            f"turn grad l_phi into a mean shift (got {type(model).__name__})"
        )
    return [float(level_alpha_bar(k)) for k in range(K)], [float(p[0]) for p in pairs]


class Levels:
    """The per-level constants of a score-based chain as tensors: a_k, n_k, c_k, s_k and lambda_k (K,) each.

    A chain with `LevelCoefficients` (GMMModel, ScoreNetChain, a ControlledChain over one) gives alpha_bar_k and
    c_k = mean_score[k] from them; a diffusers chain without x0 clipping (`DiffusersChain`) gives c_k from
    `score_coefficients(k)` and alpha_bar_k of the level its step k starts at.
    """

    def __init__(self, model: DiffusionModel, dtype: torch.dtype = torch.float64, device=None) -> None:
        K = model.num_steps
        alpha_bar, c = level_constants(model)
        kw = dict(dtype=dtype, device=device)
        alpha_bar = torch.tensor(alpha_bar, **kw)
        self.signal = alpha_bar.sqrt()  # a_k
        self.noise_std = (1.0 - alpha_bar).sqrt()  # n_k
        self.c = torch.tensor(c, **kw)  # c_k
        self.std = torch.tensor([model.std(k) for k in range(K)], **kw)  # s_k
        self.kl_weight = self.c**2 / (2.0 * self.std**2)  # lambda_k = c_k^2 / (2 s_k^2)

    def diffuse(self, x0: torch.Tensor, k: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_k = a_k x_0 + n_k eps for per-row levels k (B,); x0, eps (B, *event)."""
        view = (-1,) + (1,) * (x0.ndim - 1)
        return self.signal[k].to(x0.dtype).view(view) * x0 + self.noise_std[k].to(x0.dtype).view(view) * eps


def logit_and_gradient(net: nn.Module, x: torch.Tensor, noise_std: torch.Tensor, create_graph: bool = False):
    """l_phi(x, n) (B,) and grad_x l_phi (B, *event); with create_graph the gradient is differentiable in phi."""
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        logit = net(xg, noise_std)
        (grad,) = torch.autograd.grad(logit.sum(), xg, create_graph=create_graph)
    return logit, grad


def ce_loss(net: nn.Module, x_data: torch.Tensor, n_data: torch.Tensor, x_model: torch.Tensor, n_model: torch.Tensor) -> torch.Tensor:
    """J_CE (BOOST eq. 3.4): mean BCE of data (label 1) and model samples (label 0), each already diffused.

    Args:
        x_data, x_model: diffused states (B, *event) and (B', *event).
        n_data, n_model: their noise stds n_k (B,), (B',).
    """
    bce = nn.functional.binary_cross_entropy_with_logits
    l_data, l_model = net(x_data, n_data), net(x_model, n_model)
    return 0.5 * (bce(l_data, torch.ones_like(l_data)) + bce(l_model, torch.zeros_like(l_model)))


def mse_loss(net: nn.Module, x: torch.Tensor, noise_std: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """J_MSE (BOOST eq. 3.8, intended form): mean_i weight_i |target_i - grad_x l_phi(x_i, n_i)|^2.

    Args:
        x: forward-diffused data x_k (B, *event).
        noise_std: n_k per row (B,).
        target: grad log q_k(x_k | x_0) - s_theta(x_k, k) per row (B, *event), no gradient.
        weight: lambda_k per row (B,) (normalised as the caller likes: lambda_k is defined up to a factor).
    Returns:
        The scalar loss, differentiable in phi through grad_x l_phi (double back-propagation).
    """
    _, grad = logit_and_gradient(net, x, noise_std, create_graph=True)
    sq = (target - grad).pow(2).flatten(1).sum(1)  # (B,)
    return (weight * sq).mean()


def scores_at_levels(model: DiffusionModel, k: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """s_theta(x_i, k_i) for per-row levels k (B,): one model call per distinct level, no gradient."""
    out = torch.empty_like(x)
    with torch.no_grad():
        for level in torch.unique(k).tolist():
            rows = (k == level).nonzero().squeeze(1)
            out[rows] = model.score(int(level), x[rows])
    return out


def score_error(levels: Levels, correction: list[torch.Tensor], exact: list[torch.Tensor]) -> float:
    """E = sum_k lambda_k E_{x_k} |g_k(x_k) - exact_k(x_k)|^2 (BOOST Thm 4 on the chain: the path-KL bound).

    Args:
        levels: the chain's per-level constants (lambda_k = c_k^2 / (2 s_k^2)).
        correction: g_k at the data's forward-diffused states, one (B, *event) tensor per level k.
        exact: the exact correction score_P(k) - s_theta(k) at the same states.
    """
    total = 0.0
    for k, (g, e) in enumerate(zip(correction, exact)):
        total += float(levels.kl_weight[k]) * float((g.double() - e.double()).pow(2).flatten(1).sum(1).mean())
    return total if math.isfinite(total) else math.inf
