"""The drift policy's mean, delta_k(x) = c_k * net([x, time features of k/K, cond]), in plain torch (no Ray).

Built in one place for the RLModule that trains it (`rlft.rllib.modules.DriftPolicyModule`) and for the Ray-free
sampler `rlft.load` rebuilds from a checkpoint (`DriftControl`), so both compute the same function.

Notation: K `num_steps`, D event dim, C cond dim, F time frequencies, s_k `stds`; c_k = s_k ("std"),
s_k^2 ("variance") or 1 ("one").
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rlft.models.nets import linear_time_features, mlp
from rlft.rllib.keys import HIDDEN, MEAN_SCALE, NUM_FREQS, NUM_LAYERS, NUM_STEPS, STDS

#: defaults of the module config keys (what the learners' options default to)
DEFAULT_NUM_FREQS, DEFAULT_HIDDEN, DEFAULT_NUM_LAYERS, DEFAULT_MEAN_SCALE = 4, 64, 2, "std"


def drift_mean_parts(config: dict[str, Any], event_dim: int, cond_dim: int) -> tuple[torch.Tensor, torch.Tensor, nn.Module]:
    """(c_k (K,), time features of k/K for k = 0..K (K+1, 1 + 2F), the zero-initialised mean MLP) of a module config."""
    num_steps = int(config[NUM_STEPS])
    stds = torch.as_tensor(config[STDS], dtype=torch.float32)  # (K,)
    scales = {"std": stds, "variance": stds**2, "one": torch.ones_like(stds)}[config.get(MEAN_SCALE, DEFAULT_MEAN_SCALE)]
    freqs = int(config.get(NUM_FREQS, DEFAULT_NUM_FREQS))
    steps = torch.arange(num_steps + 1, dtype=torch.float32)[:, None] / num_steps  # (K+1, 1)
    time_table = linear_time_features(steps, freqs)  # (K+1, 1 + 2F)
    inp = event_dim + 1 + 2 * freqs + cond_dim
    net = mlp(inp, int(config.get(HIDDEN, DEFAULT_HIDDEN)), int(config.get(NUM_LAYERS, DEFAULT_NUM_LAYERS)), event_dim,
              zero_last=True)
    return scales, time_table, net


class DriftControl(nn.Module):
    """`rlft.sampling.Control` of a trained drift policy: delta_k(x) = c_k * mean_net([x, time features, cond])."""

    def __init__(self, config: dict[str, Any], event_dim: int, cond_dim: int) -> None:
        super().__init__()
        self.mean_scales, self.time_table, self.mean_net = drift_mean_parts(config, event_dim, cond_dim)

    def forward(self, k: int, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        B = x.shape[0]
        parts = [x.reshape(B, -1).float(), self.time_table[k].expand(B, -1)]
        if cond is not None:
            parts.append(cond.reshape(B, -1).float())
        with torch.no_grad():
            delta = self.mean_scales[k] * self.mean_net(torch.cat(parts, dim=-1))  # (B, D)
        return delta.reshape(x.shape).to(device=x.device, dtype=x.dtype)
