"""The small network pieces every learner builds from: one MLP builder and the time features.

Pure torch. Used by the control networks (`rlft.control.networks`), the value and initial-law networks,
the RLlib policy/value/discriminator modules (`rlft.rllib.modules`) and the classifier guidance net.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def mlp(n_in: int, hidden: int, depth: int, n_out: int, zero_last: bool = False) -> nn.Sequential:
    """n_in -> [Linear(hidden), SiLU] x depth -> Linear(n_out); the last layer zero-initialised when asked
    (a control that starts at delta = 0, i.e. at the pretrained model)."""
    layers: list[nn.Module] = []
    width = n_in
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.SiLU()]
        width = hidden
    last = nn.Linear(width, n_out)
    if zero_last:
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
    layers.append(last)
    return nn.Sequential(*layers)


def dyadic_time_features(t: float | torch.Tensor, batch: int, num_frequencies: int, like: torch.Tensor) -> torch.Tensor:
    """[sin(pi 2^j t), cos(pi 2^j t)]_{j < F} of t in [0, 1], shape (batch, 2F) (one t, or one per row)."""
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device).reshape(-1, 1)  # (1 or B, 1)
    freqs = math.pi * 2.0 ** torch.arange(num_frequencies, dtype=like.dtype, device=like.device)  # (F,)
    ang = t * freqs  # (1 or B, F)
    return torch.cat([torch.sin(ang), torch.cos(ang)], dim=-1).expand(batch, -1)


def linear_time_features(t: torch.Tensor, num_frequencies: int) -> torch.Tensor:
    """[t, sin(pi j t), cos(pi j t) for j = 1..F] of t in [0, 1]: (B, 1) -> (B, 1 + 2F) (the RLlib modules')."""
    if num_frequencies == 0:
        return t
    j = torch.arange(1, num_frequencies + 1, device=t.device, dtype=t.dtype) * math.pi
    return torch.cat([t, torch.sin(t * j), torch.cos(t * j)], dim=-1)
