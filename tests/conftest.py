"""Shared fixtures: small float64 Gaussian mixtures, and one local Ray instance per test session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # one dedicated test turns token auth on
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from rlft.models.gmm import GaussianMixture, GMMModel  # noqa: E402

# Small models run faster on one thread, and a second thread only contends with Ray's workers on a
# 2-core CI machine (measured: 300 DSM steps took 66 s with 2 threads under load, 2.6 s with 1).
torch.set_num_threads(1)


@pytest.fixture
def gmm2d() -> GMMModel:
    """2-D, 3-component mixture with unequal weights and stds, K = 50, float64."""
    mix = GaussianMixture.create([0.5, 0.3, 0.2], [[1.5, 0.5], [-1.0, 1.0], [0.0, -1.5]], [0.4, 0.3, 0.5])
    return GMMModel(mix, num_steps=50).to(dtype=torch.float64)


@pytest.fixture
def gmm3d() -> GMMModel:
    """3-D, 2-component mixture, K = 40, float64."""
    mix = GaussianMixture.create([0.6, 0.4], [[1.0, 0.0, -1.0], [-1.0, 1.0, 0.5]], [0.5, 0.7])
    return GMMModel(mix, num_steps=40).to(dtype=torch.float64)


@pytest.fixture(scope="session")
def ray_session():
    """A fresh local Ray instance (2 CPUs, no dashboard) shared by the whole test session."""
    import ray

    ray.init(
        address="local", num_cpus=2, num_gpus=0, include_dashboard=False,
        object_store_memory=200 * 1024**2, log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"}},
    )
    yield ray
    ray.shutdown()
