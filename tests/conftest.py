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


# The 2-D, 3-component mixture most tests use (unequal weights and stds), as plain lists.
MIX2D = {"weights": [0.5, 0.3, 0.2], "means": [[1.5, 0.5], [-1.0, 1.0], [0.0, -1.5]], "stds": [0.4, 0.3, 0.5]}


def make_mixture() -> GaussianMixture:
    """`MIX2D` as a float64 `GaussianMixture` (a fresh object on each call)."""
    return GaussianMixture.create(MIX2D["weights"], MIX2D["means"], MIX2D["stds"])


def make_gmm(num_steps: int = 50, dtype: torch.dtype = torch.float64, schedule=None, mixture=None) -> GMMModel:
    """The exact chain of `MIX2D` (or of `mixture`) with K = num_steps, states in `dtype`."""
    return GMMModel(mixture or make_mixture(), num_steps=num_steps, schedule=schedule).to(dtype=dtype)


def make_gaussian_chain(mean, std: float = 1.0, num_steps: int = 10, dtype: torch.dtype = torch.float64, schedule=None) -> GMMModel:
    """The exact chain of one isotropic Gaussian N(mean, std^2 I): closed forms everywhere."""
    return GMMModel.create([1.0], [list(mean)], [std], num_steps=num_steps, schedule=schedule).to(dtype=dtype)


@pytest.fixture
def mix2d() -> GaussianMixture:
    """`MIX2D` as a float64 `GaussianMixture`."""
    return make_mixture()


@pytest.fixture
def gmm_factory():
    """`make_gmm`: builds the exact `MIX2D` chain with any K, dtype and schedule."""
    return make_gmm


@pytest.fixture
def gaussian_chain_factory():
    """`make_gaussian_chain`: the exact chain of one Gaussian (any mean, std, K)."""
    return make_gaussian_chain


@pytest.fixture
def quadratic_reward():
    """r(x) = -1/2 |x - (1, 0.5)|^2 on 2-D states: a closed-form tilt of `MIX2D` (QuadraticReward)."""
    from rlft import registry

    return registry.resolve("reward", "quadratic")(center=[1.0, 0.5], scale=1.0)


@pytest.fixture
def gmm_task_dict() -> dict:
    """A task mapping (for `rlft.config.task_from_dict`) on `MIX2D` with a quadratic reward, K = 10."""
    return {
        "model": {"type": "gmm", **MIX2D},
        "reward": {"type": "quadratic", "center": [1.0, 0.5], "scale": 1.0},
        "alpha": 1.0,
        "num_steps": 10,
        "seed": 0,
    }


@pytest.fixture
def gmm2d() -> GMMModel:
    """2-D, 3-component mixture with unequal weights and stds (`MIX2D`), K = 50, float64."""
    return make_gmm(50)


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
