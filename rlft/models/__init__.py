"""Pretrained diffusion models behind the one interface (`DiffusionModel`), and `build_model` for configs."""

from __future__ import annotations

from pathlib import Path

from rlft.models.base import CoefficientChain, DiffusionModel
from rlft.models.gmm import ExactTarget, GaussianMixture, GMMModel, OptimalControl
from rlft.schedule import VPSchedule

__all__ = ["DiffusionModel", "CoefficientChain", "GaussianMixture", "GMMModel", "ExactTarget", "OptimalControl", "build_model"]


def build_model(cfg, num_steps: int) -> DiffusionModel:
    """Builds the pretrained chain a `rlft.config.ModelConfig` describes, with K = num_steps."""
    if cfg.type == "gmm":
        schedule = VPSchedule(beta_min=cfg.beta_min, beta_max=cfg.beta_max)
        return GMMModel.create(cfg.weights, cfg.means, cfg.stds, num_steps=num_steps, schedule=schedule)
    if cfg.type == "tfbind8":  # built once into a cache (rlft.tasks.tfbind8)
        from rlft.tasks.tfbind8 import PretrainSettings, pretrained_model

        settings = PretrainSettings(steps=cfg.pretrain_steps, hidden=cfg.hidden, depth=cfg.depth)
        return pretrained_model(num_steps, cache_dir=cfg.cache_dir, settings=settings)
    path = Path(cfg.path)
    if cfg.type == "scorenet":
        if not path.is_dir():
            raise FileNotFoundError(
                f"model.path {cfg.path!r} does not exist; pretrain a score network first with "
                "`rlft pretrain --data DATA.npy --out DIR` and point model.path at DIR"
            )
        from rlft.models.scorenet import load_scorenet

        return load_scorenet(path, num_steps=num_steps)
    if cfg.type == "diffusers":
        from rlft.models.diffusers_chain import DiffusersChain

        return DiffusersChain.from_pretrained(
            cfg.path, num_steps=num_steps, scheduler=cfg.scheduler, eta=cfg.eta,
            subfolder_unet=cfg.subfolder_unet, subfolder_scheduler=cfg.subfolder_scheduler,
        )
    raise ValueError(f"unknown model type {cfg.type!r}")
