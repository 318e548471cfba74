"""The options every differentiable learner takes (rlft.control.rollout), and its training-metric keys.

Typed and frozen (CleanRL's `Args`): one docstring per field; the YAML `learner:` section is parsed into a
subclass of `DifferentiableOptions` by `rlft.learners.parse_options`, and the checks that need no model run in
`__post_init__`, so a malformed option fails before Ray starts. `None` marks a value the learner derives at
construction (`DifferentiableLearner.resolve`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

from rlft.config import ConfigError
from rlft.control.networks import NETWORK_KINDS

# training-metric keys (what train_iteration returns)
TRAIN_OBJECTIVE = "train_objective"
LR = "lr"
GRAD_NORM = "grad_norm"
GRAD_NORM_MAX = "grad_norm_max"
DRIFT_UPDATES = "drift_updates"


@dataclasses.dataclass(frozen=True)
class DifferentiableOptions:
    """Options every differentiable learner takes (the YAML `learner:` keys); model-independent checks run here."""

    lr: float | None = None
    """Adam learning rate of the drift control at the start of the cosine schedule; None = the learner's default."""
    lr_final: float = 1e-4
    """Drift learning rate at the end of the schedule (and after it)."""
    batch_size: int = 512
    """Trajectories per drift update."""
    drift_iterations: int | None = None
    """Length of the learning-rate schedule, in drift updates (training may continue past it at lr_final);
    None = the learner's default."""
    drift_iterations_per_train_iteration: int | None = None
    """Drift updates per `train_iteration()` call; None = ceil(drift_iterations / run.iterations), so that the
    runner's `run.iterations` calls run the whole schedule."""
    hidden: int = 64
    """Width of the control network (and of the learner's other networks)."""
    depth: int = 3
    """Hidden layers of those networks."""
    time_frequencies: int = 8
    """Sinusoidal time features of the control network: sin/cos(pi 2^j t), j < this."""
    network: str = "auto"
    """Control network: auto | mlp | conv (auto: MLP, or convolutions for long (L, A) sequences)."""
    checkpointing: bool = False
    """Recompute each window of steps in the backward pass (gradient checkpointing) to save memory."""
    segment_steps: int = 0
    """Steps per window (0 = ceil(sqrt(K))); the same windows are used with and without checkpointing."""
    max_grad_norm: float | None = None
    """Clip the drift gradient's norm to this value (0 = no clipping); None = the learner's default."""
    lora_rank: int = 4
    """Rank of the LoRA adapter (diffusers models only)."""

    #: options that must be finite and > 0, integers >= 1 and integers >= 0 (when not None)
    POSITIVE: ClassVar[tuple[str, ...]] = ("lr", "lr_final")
    AT_LEAST_ONE: ClassVar[tuple[str, ...]] = (
        "batch_size", "drift_iterations", "drift_iterations_per_train_iteration", "hidden", "depth", "time_frequencies", "lora_rank")
    AT_LEAST_ZERO: ClassVar[tuple[str, ...]] = ("segment_steps",)

    def __post_init__(self) -> None:
        for name in self.POSITIVE:
            v = getattr(self, name)
            if v is not None and not (v > 0 and math.isfinite(v)):
                raise ConfigError(f"learner.{name} must be a finite number > 0 (got {v}); e.g. 1e-3")
        for name in self.AT_LEAST_ONE:
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(f"learner.{name} must be an integer >= 1 (got {v})")
        for name in self.AT_LEAST_ZERO:
            if getattr(self, name) < 0:
                raise ConfigError(f"learner.{name} must be an integer >= 0 (got {getattr(self, name)})")
        if self.lr is not None and self.lr_final > self.lr:
            raise ConfigError(f"learner.lr_final must be <= learner.lr (got lr_final={self.lr_final}, lr={self.lr}); lower lr_final")
        if self.max_grad_norm is not None and not self.max_grad_norm >= 0:
            raise ConfigError(f"learner.max_grad_norm must be >= 0 (got {self.max_grad_norm}); 0 turns clipping off")
        if self.network not in NETWORK_KINDS:
            raise ConfigError(f"learner.network must be one of {list(NETWORK_KINDS)} (got {self.network!r})")
