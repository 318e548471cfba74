"""Built-in rewards with closed forms: linear, quadratic, distance-to-mode.

`rlft.registry` names each under the `reward.type` a YAML task uses. Task-specific rewards live with their
task (`rlft.tasks`), the f-regularised reward in `rlft.rewards.f_regularised`.

In a conditional task a parameter may be the condition itself (`reward: {type: quadratic, center: condition}`,
`{type: linear, direction: condition}`): the reward is then conditional, r(x, c), and its closed form at each c
(`exact_form_at`) gives the exact target p_tar(.|c) and J*(c) on a Gaussian-mixture model (MATH.md §8).
"""

from __future__ import annotations

from typing import Any, Literal, Union

import torch

from rlft.rewards.base import Reward

#: the value of a built-in reward's parameter that makes it the task's condition (`center: condition`)
CONDITION = "condition"


def _vector(values, name: str, dim: int | None = None) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=torch.float32)
    if t.ndim != 1 or t.numel() == 0:
        raise ValueError(f"{name} must be a non-empty list of numbers (got {values!r})")
    if dim is not None and t.numel() != dim:
        raise ValueError(f"{name} has {t.numel()} entries but the model's samples have {dim}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} must be finite (got {values!r})")
    return t


def _check_condition_value(value: Any, name: str) -> bool:
    """True when a parameter is the condition (the string "condition"); any other string is an error."""
    if isinstance(value, str):
        if value != CONDITION:
            raise ValueError(f"{name} must be a list of numbers or {CONDITION!r} (the task's condition) (got {value!r})")
        return True
    return False


def _per_sample(param: torch.Tensor | None, cond: tuple[torch.Tensor, ...], flat: torch.Tensor, what: str) -> torch.Tensor:
    """The parameter per sample: the condition (B, d) for a conditional reward, else the fixed vector (1, D)."""
    if param is None:
        if len(cond) != 1:
            raise ValueError(f"reward {what} = condition: call it as r(x, cond) with cond (B, d)")
        p = cond[0].reshape(flat.shape[0], -1).to(flat)
    else:
        p = param.to(flat)[None]
    if p.shape[1] != flat.shape[1]:
        source = "the condition" if param is None else what
        raise ValueError(f"reward: {source} has {p.shape[1]} entries, samples have {flat.shape[1]}")
    return p


class QuadraticReward(Reward):
    """r(x) = -scale/2 |x - center|^2 (vectors; images and sequences are flattened); center may be the condition."""

    name = "quadratic"

    def __init__(self, center: Union[list[float], Literal["condition"]], scale: float = 1.0) -> None:
        if not scale > 0:
            raise ValueError(f"scale must be > 0 (got {scale})")
        self.scale = float(scale)
        self.conditional = _check_condition_value(center, "center")
        self.center = None if self.conditional else _vector(center, "center")
        self.exact_form = None if self.conditional else ("quadratic", {"center": self.center.tolist(), "scale": self.scale})

    def exact_form_at(self, cond: torch.Tensor) -> tuple[str, dict[str, Any]] | None:
        if not self.conditional:
            return self.exact_form
        return ("quadratic", {"center": torch.as_tensor(cond).reshape(-1).tolist(), "scale": self.scale})

    def __call__(self, x: torch.Tensor, *cond: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(x.shape[0], -1)
        center = _per_sample(self.center, cond, flat, "center")  # (B or 1, D)
        return -0.5 * self.scale * (flat - center).pow(2).sum(-1)


class LinearReward(Reward):
    """r(x) = direction . x; direction may be the condition."""

    name = "linear"

    def __init__(self, direction: Union[list[float], Literal["condition"]]) -> None:
        self.conditional = _check_condition_value(direction, "direction")
        self.direction = None if self.conditional else _vector(direction, "direction")
        self.exact_form = None if self.conditional else ("linear", {"direction": self.direction.tolist()})

    def exact_form_at(self, cond: torch.Tensor) -> tuple[str, dict[str, Any]] | None:
        if not self.conditional:
            return self.exact_form
        return ("linear", {"direction": torch.as_tensor(cond).reshape(-1).tolist()})

    def __call__(self, x: torch.Tensor, *cond: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(x.shape[0], -1)
        direction = _per_sample(self.direction, cond, flat, "direction")  # (B or 1, D)
        return (flat * direction).sum(-1)


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
