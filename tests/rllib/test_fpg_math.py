"""f-PG's discriminator is calibrated: trained by the learner's own step, its logit is log p_pi / p_* (MATH.md §5).

f-PG's reward is -f'(p_pi / p_*) with the ratio exp(logit) of a discriminator trained by logistic loss on agent
states (label 1) against expert states (label 0) (`rlft.rllib.fpg`); at the optimum of that loss with balanced
classes, logit(x) = log p_pi(x) / p_*(x). So the check that pins it: two Gaussians with a known density ratio,

    level K (data end):  p_pi = N(0, 1)         p_* = N(1, 1.5^2)       (the expert data itself)
    level 2:             p_pi = N(-0.5, 1)      p_* = N(0.8, 0.8^2 1.5^2 + 0.6^2)   (the data through the forward kernel
                                                                                     scale 0.8, std 0.6 of level 2)

trained through `FPGLearner.update_discriminator` (the real step: its sampling of levels, `ExpertStates`, the
`DiscriminatorModule` at f-PG's default size, Adam at the default disc_lr, the logistic loss) on a local learner, and
the logit compared with the closed-form log ratio over the central 90 % of the mass the discriminator sees (the 50/50
mixture of agent and expert states, per level; the mean weighted by that mixture's density). Tolerance: mean |error|
< 0.15 and max |error| < 0.5 there (the log ratio spans -3.4..1.3 nats over that range; measured 0.04 / 0.05 mean and
0.08 / 0.18 max at levels 2 / K). A discriminator blind to the level would be off by ~0.5 on the mean (one level's
log ratio against the other's), so the level input is pinned too. The same check with the logistic loss's labels
swapped (a monkeypatched `binary_cross_entropy_with_logits` that trains agent = 0, expert = 1) must fail: the logit is
then -log p_pi / p_*.

The discriminator step runs in float32 (the learner casts agent states to float32; the expert set is float32); the
closed forms are float64. Fixed seeds; one CPU thread.
"""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pytest
import torch
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.multi_rl_module import MultiRLModuleSpec
from ray.rllib.core.rl_module.rl_module import RLModuleSpec

from rlft.rllib import fpg
from rlft.rllib.fpg import FPGConfig, FPGLearner, FPGOptions
from rlft.rllib.keys import (
    ALPHA, CENTER, DISC_BATCH_SIZE, DISCRIMINATOR, EVENT_DIM, EXPERT_DATA, FPG_COEFF, FPG_DIVERGENCE, HIDDEN,
    KERNEL_SCALES, KERNEL_STDS, LOGIT_CLIP, LOGITS, NFE_COST, NUM_DISC_UPDATES, NUM_LAYERS, NUM_STEPS, SEED, SHAPING,
    SHAPING_COEFF,
)
from rlft.rllib.modules import DiscriminatorModule, DriftPolicyModule, drift_model_config

K = 4
#: per level: (agent mean, agent std); the expert data is N(EXPERT_MEAN, EXPERT_STD^2), diffused to level l by
#: x_l = scale_l x + std_l eps
AGENT = {K: (0.0, 1.0), 2: (-0.5, 1.0)}
EXPERT_MEAN, EXPERT_STD = 1.0, 1.5
KERNEL = {K: (1.0, 0.0), 2: (0.8, 0.6)}
NUM_SAMPLES = 20000  # agent states per level and expert data points
NUM_UPDATES = 1200  # discriminator steps (f-PG's default is 50 per iteration, run every iteration)
MEAN_TOL, MAX_TOL = 0.15, 0.5


def expert_law(level: int) -> tuple[float, float]:
    scale, std = KERNEL[level]
    return scale * EXPERT_MEAN, math.sqrt((scale * EXPERT_STD) ** 2 + std**2)


def log_normal(x: np.ndarray, mean: float, std: float) -> np.ndarray:
    return -0.5 * ((x - mean) / std) ** 2 - math.log(std) - 0.5 * math.log(2 * math.pi)


def log_ratio(x: np.ndarray, level: int) -> np.ndarray:
    """log p_pi(x) / p_*(x) at a level (float64)."""
    return log_normal(x, *AGENT[level]) - log_normal(x, *expert_law(level))


def samples(law: tuple[float, float], n: int, g: np.random.Generator) -> np.ndarray:
    return law[0] + law[1] * g.standard_normal(n)


def train_discriminator() -> tuple[FPGLearner, dict[str, float]]:
    """A local `FPGLearner` with f-PG's default discriminator settings, trained by `update_discriminator` on agent
    states at levels K and 2 against the expert data (diffused by the learner's `ExpertStates`)."""
    g = np.random.default_rng(0)
    opts = FPGOptions()
    scales, stds = [1.0] * (K + 1), [0.0] * (K + 1)
    for level, (scale, std) in KERNEL.items():
        scales[level], stds[level] = scale, std
    agent = {level: samples(law, NUM_SAMPLES, g) for level, law in AGENT.items()}
    data = samples((EXPERT_MEAN, EXPERT_STD), NUM_SAMPLES, g)
    obs = np.concatenate([np.stack([x, np.full_like(x, level / K)], axis=-1) for level, x in agent.items()]).astype(np.float32)
    settings = {
        FPG_DIVERGENCE: opts.fpg_divergence, FPG_COEFF: opts.fpg_coeff, LOGIT_CLIP: opts.logit_clip, CENTER: True,
        NUM_DISC_UPDATES: NUM_UPDATES, DISC_BATCH_SIZE: opts.disc_batch_size, EVENT_DIM: 1, NUM_STEPS: K,
        SHAPING: "none", SHAPING_COEFF: opts.shaping_coeff, NFE_COST: opts.nfe_cost,
        EXPERT_DATA: data[:, None].astype(np.float32), KERNEL_SCALES: scales, KERNEL_STDS: stds, ALPHA: 0.0, SEED: 0,
    }
    obs_space = gym.spaces.Box(-np.inf, np.inf, (2,), np.float32)
    act_space = gym.spaces.Box(-np.inf, np.inf, (1,), np.float32)
    config = (
        FPGConfig()
        .environment(observation_space=obs_space, action_space=act_space, normalize_actions=False, clip_actions=False)
        .rl_module(
            rl_module_spec=MultiRLModuleSpec(rl_module_specs={
                DEFAULT_MODULE_ID: RLModuleSpec(module_class=DriftPolicyModule, model_config=drift_model_config([1.0] * K)),
                DISCRIMINATOR: RLModuleSpec(module_class=DiscriminatorModule, learner_only=True, model_config={
                    EVENT_DIM: 1, HIDDEN: opts.disc_hidden, NUM_LAYERS: opts.disc_num_layers}),
            }),
            algorithm_config_overrides_per_module={DISCRIMINATOR: FPGConfig.overrides(lr=opts.disc_lr)},
        )
        .learners(learner_class=FPGLearner, learner_config_dict=settings)
        .debugging(seed=0)
    )
    torch.manual_seed(0)
    learner = config.build_learner()
    stats = learner.update_discriminator(obs)
    return learner, stats


def logit_errors(learner: FPGLearner, level: int) -> np.ndarray:
    """logit - log p_pi / p_* on a grid over the central 90 % of the level's 50/50 agent/expert mixture."""
    g = np.random.default_rng(1)
    mix = np.concatenate([samples(AGENT[level], 200000, g), samples(expert_law(level), 200000, g)])
    lo, hi = np.quantile(mix, [0.05, 0.95])
    x = np.linspace(lo, hi, 401)
    obs = torch.as_tensor(np.stack([x, np.full_like(x, level / K)], axis=-1), dtype=torch.float32)
    with torch.no_grad():
        logits = learner.module[DISCRIMINATOR].forward_inference({Columns.OBS: obs})[LOGITS].double().numpy()
    # weight the grid by the mixture density, so the mean error is the error over the mass, not over the interval
    w = 0.5 * np.exp(log_normal(x, *AGENT[level])) + 0.5 * np.exp(log_normal(x, *expert_law(level)))
    return logits - log_ratio(x, level), w / w.sum()


class SwappedLabels:
    """torch.nn.functional as `rlft.rllib.fpg` sees it, but with the logistic loss's targets swapped (agent 0, expert 1)."""

    def __getattr__(self, name):
        return getattr(torch.nn.functional, name)

    @staticmethod
    def binary_cross_entropy_with_logits(logits, target, *args, **kwargs):
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, 1.0 - target, *args, **kwargs)


@pytest.fixture(scope="module")
def trained():
    """{False: the discriminator as f-PG trains it, True: the same with the logistic loss's labels swapped}."""
    out = {False: train_discriminator()[0]}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fpg, "F", SwappedLabels())
        out[True] = train_discriminator()[0]
    return out


@pytest.mark.parametrize("level", sorted(AGENT))
def test_discriminator_logit_is_the_log_density_ratio(trained, level):
    """mean |logit - log p_pi/p_*| < 0.15 and max < 0.5 over the central 90 % of the mass, at the data end (level K)
    and at an intermediate level (the expert's forward diffusion and the level input both enter)."""
    err, w = logit_errors(trained[False], level)
    mean_abs, max_abs = float((np.abs(err) * w).sum()), float(np.abs(err).max())
    assert mean_abs < MEAN_TOL and max_abs < MAX_TOL, f"level {level}: mean |error| {mean_abs:.3f}, max {max_abs:.3f}"


@pytest.mark.parametrize("level", sorted(AGENT))
def test_swapped_labels_fail_the_calibration_check(trained, level):
    """With the labels swapped the logit is -log p_pi/p_*: the check above rejects it by a wide margin (measured mean
    |error| 1.90 / 1.46 at levels 2 / K; the same figures as with the labels swapped in fpg.py itself)."""
    err, w = logit_errors(trained[True], level)
    mean_abs = float((np.abs(err) * w).sum())
    assert mean_abs > 4 * MEAN_TOL, f"level {level}: swapped discriminator's mean |error| is only {mean_abs:.3f}"
