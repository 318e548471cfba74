"""Built-in rewards with closed forms: linear, quadratic, distance-to-mode.

`rlft.registry` names each under the `reward.type` a YAML task uses. Task-specific rewards live with their
task (`rlft.tasks`), the f-regularised reward in `rlft.rewards.f_regularised`.
"""

from __future__ import annotations

from typing import Any

import torch

from rlft.rewards.base import Reward


def _vector(values, name: str, dim: int | None = None) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=torch.float32)
    if t.ndim != 1 or t.numel() == 0:
        raise ValueError(f"{name} must be a non-empty list of numbers (got {values!r})")
    if dim is not None and t.numel() != dim:
        raise ValueError(f"{name} has {t.numel()} entries but the model's samples have {dim}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} must be finite (got {values!r})")
    return t


class QuadraticReward(Reward):
    """r(x) = -scale/2 |x - center|^2 (vectors; images and sequences are flattened)."""

    name = "quadratic"

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


class LinearReward(Reward):
    """r(x) = direction . x."""

    name = "linear"

    def __init__(self, direction: list[float]) -> None:
        self.direction = _vector(direction, "direction")
        self.exact_form = ("linear", {"direction": self.direction.tolist()})

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(x.shape[0], -1)
        if flat.shape[1] != self.direction.numel():
            raise ValueError(f"reward 'linear': direction has {self.direction.numel()} entries, samples have {flat.shape[1]}")
        return flat @ self.direction.to(flat)


class DistanceToModeReward(Reward):
    """r(x) = -scale * min_c |x - mode_c|: the distance to the nearest of the given modes.

    With no `modes`, the modes are the means of the task's Gaussian-mixture model.
    """

    name = "distance_to_mode"

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
