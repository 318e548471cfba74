"""Built-in rewards: linear, quadratic, distance-to-mode (closed forms), and the learned/classifier rewards.

Each is registered under the name a YAML task uses as `reward.type`.
"""

from __future__ import annotations

from typing import Any

import torch

from rlft.rewards.base import Reward, register_reward


def _vector(values, name: str, dim: int | None = None) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=torch.float32)
    if t.ndim != 1 or t.numel() == 0:
        raise ValueError(f"{name} must be a non-empty list of numbers (got {values!r})")
    if dim is not None and t.numel() != dim:
        raise ValueError(f"{name} has {t.numel()} entries but the model's samples have {dim}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} must be finite (got {values!r})")
    return t


@register_reward("quadratic")
class QuadraticReward(Reward):
    """r(x) = -scale/2 |x - center|^2 (vectors; images and sequences are flattened)."""

    def __init__(self, center: list[float], scale: float = 1.0) -> None:
        if not scale > 0:
            raise ValueError(f"scale must be > 0 (got {scale})")
        self.center = _vector(center, "center")
        self.scale = float(scale)
        self.exact_form = ("quadratic", {"center": self.center.tolist(), "scale": self.scale})

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(x.shape[0], -1)
        if flat.shape[1] != self.center.numel():
            raise ValueError(f"reward 'quadratic': center has {self.center.numel()} entries, samples have {flat.shape[1]}")
        return -0.5 * self.scale * (flat - self.center.to(flat)).pow(2).sum(-1)


@register_reward("linear")
class LinearReward(Reward):
    """r(x) = direction . x."""

    def __init__(self, direction: list[float]) -> None:
        self.direction = _vector(direction, "direction")
        self.exact_form = ("linear", {"direction": self.direction.tolist()})

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(x.shape[0], -1)
        if flat.shape[1] != self.direction.numel():
            raise ValueError(f"reward 'linear': direction has {self.direction.numel()} entries, samples have {flat.shape[1]}")
        return flat @ self.direction.to(flat)


@register_reward("distance_to_mode")
class DistanceToModeReward(Reward):
    """r(x) = -scale * min_c |x - mode_c|: the distance to the nearest of the given modes.

    With no `modes`, the modes are the means of the task's Gaussian-mixture model.
    """

    def __init__(self, modes: list[list[float]] | None = None, scale: float = 1.0, model: Any = None) -> None:
        if modes is None:
            data = getattr(model, "data", None)
            if data is None:
                raise ValueError("distance_to_mode needs `modes` unless the model is a Gaussian mixture")
            modes = data.means.tolist()
        m = torch.as_tensor(modes, dtype=torch.float32)
        if m.ndim != 2:
            raise ValueError(f"modes must be a list of points (got shape {tuple(m.shape)})")
        if not scale > 0:
            raise ValueError(f"scale must be > 0 (got {scale})")
        self.modes = m
        self.scale = float(scale)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(x.shape[0], -1)
        d = torch.cdist(flat, self.modes.to(flat))  # (B, C)
        return -self.scale * d.min(dim=1).values

import rlft.divergences, rlft.rewards.oracle  # noqa: E401,F401,E402  (registers f_regularised and mlp_oracle)
import rlft.tasks.tfbind8  # noqa: E402,F401  (registers tfbind8_learned and tfbind8_exact; builds nothing on import)
import rlft.rewards.digits  # noqa: E402,F401  (registers digit_classifier; trains nothing on import)
