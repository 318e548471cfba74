"""Pretrained diffusion models behind the one interface (`DiffusionModel`), and `build_model` for configs."""

from __future__ import annotations

import rlft.registry as registry
from rlft.models.base import CoefficientChain, ControlledChain, DiffusionModel
from rlft.models.gmm import ExactTarget, GaussianMixture, GMMModel, OptimalControl

__all__ = ["DiffusionModel", "CoefficientChain", "ControlledChain", "GaussianMixture", "GMMModel", "ExactTarget", "OptimalControl", "build_model"]


def build_model(cfg, num_steps: int) -> DiffusionModel:
    """Builds the pretrained chain a `rlft.config` model config describes, with K = num_steps.

    The builder is `registry.resolve("model", cfg.type)`, a callable `(cfg, num_steps) -> DiffusionModel`; its
    module is imported only now (the TFBind8 builder lives with its task, the diffusers one beside diffusers).
    """
    return registry.resolve("model", cfg.type)(cfg, num_steps)
