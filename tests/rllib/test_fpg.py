"""f-PG: the discriminator separates two known Gaussians, the relabelled rewards point towards the expert, and
the reward connector, the shapings and the expert's forward diffusion match their closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from ray.rllib.core.columns import Columns

from rlft.config import DEFAULT_TASK, task_from_dict
from rlft.divergences import get_divergence
from rlft.learners import build_learner
from rlft.models import build_model
from rlft.models.gmm import GaussianMixture, GMMModel
from rlft.rewards import build_reward
from rlft.rllib.connectors import FPGRewardConnector, FPGRewardSpec, fpg_reward
from rlft.rllib.fpg import ExpertStates, expert_samples, level_kernels
from rlft.rllib.keys import DISC_ACCURACY, DISC_LOSS, DISCRIMINATOR, FPG_REWARD, LOGITS, NUM_DISC_UPDATES
from rlft.rllib.restart import shape_rewards

K = 4
EXPERT = {"type": "gmm", "weights": [1.0], "means": [[1.0, 1.0]], "stds": [0.3]}
DIVERGENCES = ["kl", "forward_kl", "js", "chi2", "hellinger", "gamma:0.5"]


@pytest.fixture(scope="module")
def fpg(ray_session):
    task = dict(DEFAULT_TASK, num_steps=K)
    task["learner"] = {"type": "fpg", "expert": EXPERT, "num_expert_samples": 4000, "episodes_per_iteration": 16,
                       "num_envs": 16, "minibatch_size": 64, "num_epochs": 1, "num_disc_updates": 5,
                       "save_rllib_checkpoint": False}
    cfg = task_from_dict(task)
    model = build_model(cfg.model, cfg.num_steps)
    learner = build_learner(cfg, model, build_reward(cfg.reward, model=model))
    yield learner
    learner.algo.stop()


def disc_logits(learner, x: torch.Tensor, level: int = K) -> torch.Tensor:
    obs = torch.cat([x.float(), torch.full((x.shape[0], 1), level / K)], dim=-1)
    module = learner.algo.learner_group._learner.module[DISCRIMINATOR]
    with torch.no_grad():
        return module.forward_inference({Columns.OBS: obs})[LOGITS]


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_one_fpg_iteration_on_the_drift_env(fpg):
    metrics = fpg.train_iteration()
    assert fpg.reward_queries == 0  # f-PG reads expert samples, never the reward
    assert {DISC_LOSS, DISC_ACCURACY, FPG_REWARD} <= set(metrics)
    assert all(np.isfinite(v) for v in metrics.values())
    assert fpg.control()(1, torch.zeros(3, 2), None).shape == (3, 2)


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_discriminator_separates_two_gaussians_and_rewards_point_to_the_expert(fpg):
    """Agent N((-1,-1), 0.3^2 I) vs expert N((1,1), 0.3^2 I) at level K: accuracy ~ 1, and every f gives expert-like
    states a higher reward -f'(ratio) than agent-like ones (so the policy gradient moves towards the expert)."""
    learner = fpg.algo.learner_group._learner
    g = torch.Generator().manual_seed(0)
    agent = torch.randn(4000, 2, generator=g) * 0.3 - 1.0
    obs = torch.cat([agent, torch.ones(4000, 1)], dim=-1).numpy()
    cfg = learner.config.learner_config_dict
    old = cfg[NUM_DISC_UPDATES]
    cfg[NUM_DISC_UPDATES] = 200
    try:
        stats = learner.update_discriminator(obs)
    finally:
        cfg[NUM_DISC_UPDATES] = old
    assert stats["disc_accuracy"] > 0.95
    test_agent = torch.randn(500, 2, generator=g) * 0.3 - 1.0
    test_expert = torch.randn(500, 2, generator=g) * 0.3 + 1.0
    la, le = disc_logits(fpg, test_agent), disc_logits(fpg, test_expert)
    assert (la > 0).float().mean() > 0.97 and (le < 0).float().mean() > 0.97  # logit = log p_agent / p_expert
    for name in DIVERGENCES:
        ra, re = fpg_reward(la, name, 5.0), fpg_reward(le, name, 5.0)
        assert ra.mean() < re.mean(), name
    # on the level-K states the learned log-ratio increases along the direction from expert to agent
    line = torch.linspace(-1.0, 1.0, 9)[:, None].expand(9, 2)
    assert (disc_logits(fpg, line).diff() < 0).all()


def test_fpg_reward_is_minus_f_prime_of_exp_logit():
    logits = torch.tensor([-7.0, -1.0, 0.0, 0.5, 9.0])
    clipped = logits.clamp(-5, 5)
    for name in DIVERGENCES:
        f_prime = get_divergence(name).f_prime
        assert torch.allclose(fpg_reward(logits, name, 5.0), -f_prime(torch.exp(clipped)))
        centred = fpg_reward(logits, name, 5.0, center=True)
        assert torch.allclose(centred, -f_prime(torch.exp(clipped)) + f_prime(torch.tensor(1.0)), atol=1e-6)
        assert abs(float(fpg_reward(torch.zeros(1), name, 5.0, center=True))) < 1e-6


class _Disc(torch.nn.Module):
    """logit = obs[:, 0], a discriminator whose answer the test knows."""

    def forward_inference(self, batch):
        return {LOGITS: batch[Columns.OBS][:, 0]}


def test_reward_connector_gives_each_step_the_value_of_its_next_state():
    # two episodes (lengths 2 and 3) as RLlib batches them: each followed by its bootstrap row (mask False)
    obs = torch.tensor([[0.1, 0, 0.0], [0.2, 0, 0.5], [0.3, 0, 1.0],
                        [-0.4, 0, 0.0], [0.5, 0, 0.25], [0.6, 0, 0.5], [-0.7, 0, 1.0]])
    mask = torch.tensor([True, True, False, True, True, True, False])
    terminal = torch.tensor([False, True, False, False, False, True, False])
    batch = {"default_policy": {Columns.OBS: obs, Columns.LOSS_MASK: mask, Columns.TERMINATEDS: terminal,
                                Columns.ACTIONS: torch.zeros(7, 2), Columns.REWARDS: torch.full((7,), 9.0)}}
    spec = FPGRewardSpec(fpg_divergence="kl", fpg_coeff=2.0, logit_clip=5.0, center=False, event_dim=2, num_steps=2)
    out = FPGRewardConnector(spec=spec)(rl_module={DISCRIMINATOR: _Disc()}, batch=batch, episodes=[])
    r = out["default_policy"][Columns.REWARDS]
    nxt = torch.tensor([0.2, 0.3, 0.0, 0.5, 0.6, -0.7, 0.0])
    expected = 2.0 * -(torch.log(torch.exp(nxt)) + 1.0) * mask.float()
    assert torch.allclose(r, expected, atol=1e-6)


def test_shapings():
    g = torch.tensor([-1.0, -2.0, -0.5, -3.0, 0.0])
    level = torch.tensor([3, 4, 0, 1, 2])
    level_next = torch.tensor([4, 5, 1, 2, 3])
    terminal = torch.tensor([False, True, False, False, False])
    mask = torch.tensor([True, True, True, True, False])
    actions = torch.tensor([1, 1, 0, 0, 1])
    assert torch.equal(shape_rewards("none", g, level, level_next, actions, terminal, mask, 5), g)
    tw = shape_rewards("time_weighted", g, level, level_next, actions, terminal, mask, 5, coeff=0.5)
    assert torch.allclose(tw, g - 0.5 * (1 - level_next / 5))
    term = shape_rewards("terminal", g, level, level_next, actions, terminal, mask, 5, nfe_cost=0.1)
    # terminal value only at the end; NOISE at level 0 is a no-op and costs nothing, at level 1 it costs 0.1
    assert torch.allclose(term, torch.tensor([0.0, -2.0, 0.0, -0.1, 0.0]))
    g2 = torch.tensor([-1.0, -3.0, -2.0, -4.0, -7.0, 5.0])
    lv = torch.tensor([0, 0, 1, 1, 1, 2])
    lv_next = torch.tensor([1, 1, 2, 2, 2, 3])
    t2 = torch.tensor([False, False, False, False, False, True])
    m2 = torch.ones(6, dtype=torch.bool)
    la = shape_rewards("level_aware", g2, lv, lv_next, torch.ones(6), t2, m2, 3, coeff=1.0)
    # centred per next level among non-terminal rows: level 1 {-1,-3} mean -2, level 2 {-2,-4,-7} mean -13/3
    assert torch.allclose(la, torch.tensor([1.0, -1.0, -2 + 13 / 3, -4 + 13 / 3, -7 + 13 / 3, 5.0]), atol=1e-6)


def test_expert_states_are_the_data_diffused_by_the_forward_kernel():
    model = GMMModel(GaussianMixture.create([1.0], [[0.0, 0.0]], 1.0), num_steps=10)
    scales, stds = level_kernels(model)
    ab = model.coefficients.alpha_bar
    for level in range(11):
        assert math.isclose(scales[level], math.sqrt(ab[level] / ab[10]), rel_tol=1e-9)
        assert math.isclose(stds[level], math.sqrt(1 - ab[level] / ab[10]), rel_tol=1e-9, abs_tol=1e-12)
    data = torch.full((1, 2), 3.0)  # a point mass: x_l ~ N(3 scale_l, std_l^2)
    expert = ExpertStates(data, scales, stds)
    g = torch.Generator().manual_seed(0)
    n = 20000
    for level in (0, 4, 10):
        x = expert.sample(torch.full((n,), level), g).double()
        se = max(stds[level], 1e-3) / math.sqrt(n)
        assert abs(float(x.mean()) - 3 * scales[level]) < 6 * se
        assert abs(float(x.std()) - stds[level]) < 0.03 * stds[level] + 1e-6


def test_expert_samples_from_the_exact_target():
    cfg = task_from_dict(dict(DEFAULT_TASK, num_steps=5))
    model = build_model(cfg.model, 5)
    reward = build_reward(cfg.reward, model=model)
    x = expert_samples({"type": "target"}, cfg, model, reward, 100, seed=3)
    ref = model.exact_target(reward, cfg.alpha).mixture.sample(100, torch.Generator().manual_seed(3))
    assert torch.allclose(x, ref.float())
    with pytest.raises(ValueError, match="expert.type"):
        expert_samples({"type": "nope"}, cfg, model, reward, 10, seed=0)
