"""Small zero-initialised control networks for the drift u(t, x) (ELEGANT eq. 11) and q(t, x) (eq. 8-10).

Parameterisation (one choice for every chain, documented once here): a network g_theta(t, x) gives the
displacement of step k as

    delta_k(x) = c_k * g_theta(t_k, x),      c_k = beta_k / sqrt(1 - beta_k),   KL_k = |delta_k|^2 / (2 s_k^2)

where beta_k = 1 - a(s_k)^2 / a(s_{k+1})^2 is the variance of the forward kernel between the step's two noise
levels (`DiffusionModel.noise_kernel(k)` = (sqrt(1 - beta_k), sqrt(beta_k))). For the DDPM chains of
`rlft.models.base.CoefficientChain` and `DiffusersChain`, c_k is exactly the coefficient of the score in the
transition mean (mean_score_k), so the optimal displacement delta*_k = mean_tar - mean_pre is c_k times the
score difference g*_k = score_tar - score_pre (MATH.md §3): g is that score difference, the quantity
grad_x v_t / alpha of the continuous optimal control u* = sigma^2 grad v_t / alpha (c_k ~ sigma(t_k)^2 dt_k).
It stays of order one at every noise level, which keeps the network well scaled. Chains without a forward
kernel (the initial-distribution SDE) pass their own scales (there c_k = s_k^2, i.e. u = sigma~^2 g).

The last layer is zero-initialised: an untrained network gives delta = 0, i.e. the pretrained sampler exactly.

Architectures: `VectorControlNet` (a SiLU MLP on the flattened event, for vectors (D,) and any small event),
`SequenceControlNet` (1-D convolutions over positions, for sequences (L, A)). Both take the normalised time
t in [0, 1] through sinusoidal features and, for conditional models, a flattened conditioning vector.
`ValueNet` (rlft.control.value) reuses the MLP trunk with a scalar head.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from rlft.models.base import DiffusionModel
from rlft.models.nets import dyadic_time_features, mlp

NETWORK_KINDS = ("auto", "mlp", "conv")
#: events with at most this many scalars use the MLP under network="auto", even when they are sequences
AUTO_MLP_MAX_SIZE = 512


class VectorControlNet(nn.Module):
    """g(t, x [, c]) for events of any shape, flattened: a SiLU MLP with a zero-initialised output layer."""

    def __init__(
        self,
        event_shape: tuple[int, ...],
        cond_shape: tuple[int, ...] | None = None,
        hidden: int = 128,
        depth: int = 3,
        num_frequencies: int = 8,
        out_features: int | None = None,
        zero_init: bool = True,
    ) -> None:
        super().__init__()
        self.event_shape = tuple(event_shape)
        self.cond_dim = math.prod(cond_shape) if cond_shape else 0
        self.num_frequencies = num_frequencies
        self.out_features = out_features
        size = math.prod(self.event_shape)
        self.net = mlp(size + 2 * num_frequencies + self.cond_dim, hidden, depth, out_features or size, zero_last=zero_init)

    def forward(self, t: float | torch.Tensor, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """t: scalar or (B,) in [0, 1]; x: (B, *event); cond: (B, *cond_shape) or None -> (B, *event)."""
        b = x.shape[0]
        flat = x.reshape(b, -1)
        if self.cond_dim and cond is None:
            raise ValueError("this control network was built for a conditional model: pass cond (B, *cond_shape)")
        first = self.net[0]
        size = flat.shape[1]
        if isinstance(t, torch.Tensor) and t.numel() > 1:
            tf = dyadic_time_features(t, b, self.num_frequencies, x)  # (B, 2F)
        else:  # one time for the whole batch: its features enter the first layer as a bias, (1, 2F)
            tf = dyadic_time_features(t, 1, self.num_frequencies, x)
        # the first layer on cat([x, time features, cond]), without materialising the (B, in) concatenation
        w = first.weight
        h = flat @ w[:, :size].T + (tf @ w[:, size : size + tf.shape[1]].T + first.bias)  # (B, hidden)
        if self.cond_dim:
            h = h + cond.reshape(b, -1).to(x.dtype) @ w[:, size + tf.shape[1] :].T
        out = self.net[1:](h)  # (B, out)
        return out if self.out_features else out.reshape(x.shape)


class SequenceControlNet(nn.Module):
    """g(t, x [, c]) for sequences (L, A): 1-D convolutions over positions, zero-initialised output."""

    def __init__(
        self,
        event_shape: tuple[int, int],
        cond_shape: tuple[int, ...] | None = None,
        hidden: int = 64,
        depth: int = 3,
        num_frequencies: int = 8,
        kernel_size: int = 3,
    ) -> None:
        super().__init__()
        if len(event_shape) != 2:
            raise ValueError(f"SequenceControlNet needs sequences of shape (L, A) (got event_shape {tuple(event_shape)})")
        self.event_shape = tuple(event_shape)
        self.cond_dim = math.prod(cond_shape) if cond_shape else 0
        self.num_frequencies = num_frequencies
        alphabet = event_shape[1]
        extra = 2 * num_frequencies + self.cond_dim
        layers: list[nn.Module] = []
        width = alphabet + extra
        for _ in range(depth):
            layers += [nn.Conv1d(width, hidden, kernel_size, padding=kernel_size // 2), nn.SiLU()]
            width = hidden
        layers.append(nn.Conv1d(width, alphabet, kernel_size, padding=kernel_size // 2))
        nn.init.zeros_(layers[-1].weight)
        nn.init.zeros_(layers[-1].bias)
        self.net = nn.Sequential(*layers)

    def forward(self, t: float | torch.Tensor, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """t: scalar or (B,) in [0, 1]; x: (B, L, A) -> (B, L, A)."""
        b, length, _ = x.shape
        feats = [dyadic_time_features(t, b, self.num_frequencies, x)]  # (B, 2F)
        if self.cond_dim:
            if cond is None:
                raise ValueError("this control network was built for a conditional model: pass cond (B, *cond_shape)")
            feats.append(cond.reshape(b, -1).to(x.dtype))
        extra = torch.cat(feats, -1)[:, :, None].expand(-1, -1, length)  # (B, E, L)
        h = torch.cat([x.transpose(1, 2), extra], dim=1)  # (B, A + E, L)
        return self.net(h).transpose(1, 2)  # (B, L, A)


def build_control_net(
    event_shape: tuple[int, ...],
    cond_shape: tuple[int, ...] | None = None,
    kind: Literal["auto", "mlp", "conv"] = "auto",
    hidden: int = 128,
    depth: int = 3,
    num_frequencies: int = 8,
) -> nn.Module:
    """The control network for an event shape: "auto" is an MLP unless the event is a long (L, A) sequence."""
    if kind not in NETWORK_KINDS:
        raise ValueError(f"network must be one of {list(NETWORK_KINDS)} (got {kind!r})")
    if kind == "auto":
        kind = "conv" if len(event_shape) == 2 and math.prod(event_shape) > AUTO_MLP_MAX_SIZE else "mlp"
    if kind == "conv":
        return SequenceControlNet(event_shape, cond_shape, hidden, depth, num_frequencies)  # type: ignore[arg-type]
    return VectorControlNet(event_shape, cond_shape, hidden, depth, num_frequencies)


class NetworkControl:
    """The `rlft.sampling.Control` of a network g: delta_k(x) = c_k g(t_k, x) (module docstring).

    Times are normalised to [0, 1) over the chain's span, so the same class drives the drift on [0, T] and
    the initial-distribution SDE on [-T, 0].

    Args:
        model: the chain the control acts on.
        net: g, called as net(t (scalar in [0, 1)), x (B, *event), cond) -> (B, *event).
        scales: c_k per step, (K,); default beta_k / sqrt(1 - beta_k) from the chain's forward kernel.
    """

    def __init__(self, model: DiffusionModel, net: nn.Module, scales: list[float] | None = None) -> None:
        self.model = model
        self.net = net
        K = model.num_steps
        start, end = model.time(0), model.time(K - 1) + model.dt(K - 1)
        self._t = [(model.time(k) - start) / (end - start) for k in range(K)]  # in [0, 1), (K,)
        self.scales = list(scales) if scales is not None else [score_coefficient(model, k) for k in range(K)]  # (K,)
        if len(self.scales) != K:
            raise ValueError(f"scales needs one entry per step: {K} steps, {len(self.scales)} scales")

    def __call__(self, k: int, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        return self.scales[k] * self.net(self._t[k], x, cond)

    def all_steps(self, states: torch.Tensor, start: int = 0, cond: torch.Tensor | None = None) -> torch.Tensor:
        """delta_k(x_k) for steps start .. start + n - 1 at once, in one call of the network.

        states: (B, n, *event), row j at level start + j; cond: (B, *cond_shape) or None, one condition per
        trajectory (the same at every step) -> (B, n, *event), equal to stacking self(start + j, states[:, j], cond)."""
        b, k = states.shape[:2]
        if not 0 <= start <= start + k <= len(self._t):
            raise ValueError(f"steps {start}..{start + k - 1} are outside the chain's {len(self._t)} steps")
        like = dict(dtype=states.dtype, device=states.device)
        t = torch.tensor(self._t[start:start + k], **like).repeat(b)  # (B n,): row i is step start + i % n
        c = torch.tensor(self.scales[start:start + k], **like).repeat(b).reshape(-1, *([1] * (states.dim() - 2)))  # (B n, 1, ...)
        c_rows = cond.repeat_interleave(k, dim=0) if cond is not None else None  # (B n, *cond_shape): row i is trajectory i // n
        out = self.net(t, states.reshape(b * k, *states.shape[2:]), c_rows) * c
        return out.reshape(states.shape)


def score_coefficient(model: DiffusionModel, k: int) -> float:
    """c_k = beta_k / sqrt(1 - beta_k) from the forward kernel (scale, std) = (sqrt(1 - beta_k), sqrt(beta_k))."""
    scale, std = model.noise_kernel(k)
    return std**2 / scale
