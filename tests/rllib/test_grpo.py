"""GRPO (`rlft.rllib.grpo`): group advantages against a reference loop, the surrogate gradient against the closed-form
dJ/dtheta of a linear-Gaussian chain, option errors before Ray, and one iteration + checkpoint + `rlft.load` on Ray.

The gradient test runs the real learner pipeline of `GRPOLearner` (AddOneTs..., `KLPenaltyConnector`,
`GroupAdvantageConnector` in GAE's place, no critic) and `compute_loss_for_module` at the behaviour parameters (one
epoch, ratio = 1) on the chain of tests/rllib/test_ppo_kl_math.py (J(theta) in closed form, float64). With
normalize_std off the loss gradient is -(G - 1) / (G K) dJ/dtheta in expectation (`rlft.rllib.grpo`), so
g = -K G / (G - 1) grad L is compared with dJ/dtheta; independent batches give the standard error.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from ray.rllib.algorithms.ppo import PPOConfig
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.env.single_agent_episode import SingleAgentEpisode
from ray.rllib.evaluation.postprocessing import Postprocessing

from rlft.config import ConfigError
from rlft.learners import check_learner_spec
from rlft.rllib.connectors import GroupAdvantageConnector, group_advantages
from rlft.rllib.grpo import GRPOLearner
from rlft.rllib.keys import ALPHA, GROUP_SIZE, KL_LOSS_COEFF, NORMALIZE_STD, STD_EPS, VALUE_NET
from rlft.rllib.modules import DriftPolicyModule, drift_model_config
from tests.rllib.test_ppo_kl_math import (
    ACT_SPACE, ALPHA_, K, OBS_SPACE, S_K, THETA, ThetaTimesX, closed_form_grad, mean_se, simulate,
)

G = 8
EPISODES_PER_BATCH = 2000  # a multiple of G
BATCHES = 20


def build_learner(normalize_std: bool, alpha: float = ALPHA_, group_size: int = G):
    """A local `GRPOLearner` configured as `rlft.rllib.grpo.GRPO` configures it (no critic, gamma 1, entropy 0)."""
    config = (
        PPOConfig()
        .environment(observation_space=OBS_SPACE, action_space=ACT_SPACE, normalize_actions=False, clip_actions=False)
        .rl_module(rl_module_spec=RLModuleSpec(
            module_class=DriftPolicyModule, model_config=drift_model_config(list(S_K), mean_scale="one", **{VALUE_NET: False})))
        .learners(learner_class=GRPOLearner, learner_config_dict={
            ALPHA: alpha, GROUP_SIZE: group_size, NORMALIZE_STD: normalize_std, STD_EPS: 1e-4})
        .training(gamma=1.0, lr=1e-3, num_epochs=1, clip_param=0.2, entropy_coeff=0.0, use_kl_loss=False, use_critic=False)
        .debugging(seed=0)
    )
    learner = config.build_learner()
    module = learner.module[DEFAULT_MODULE_ID]
    module.double()
    module.mean_net = ThetaTimesX(THETA)
    return learner, module


def run_pipeline(learner, episodes) -> dict:
    out = learner._learner_connector(rl_module=learner.module, batch={}, episodes=episodes, shared_data={}, metrics=None)
    return out[DEFAULT_MODULE_ID]


def loss_grad(learner, module, mb: dict) -> float:
    config = learner.config.get_config_for_module(DEFAULT_MODULE_ID)
    fwd = module.forward_train(mb)
    loss = learner.compute_loss_for_module(module_id=DEFAULT_MODULE_ID, config=config, batch=mb, fwd_out=fwd)
    return float(torch.autograd.grad(loss, module.mean_net.theta)[0])


# -- advantages -------------------------------------------------------------------------------------------------


def reference_advantages(returns: list[float], group_size: int, normalize_std: bool, eps: float) -> list[float]:
    """The per-group loop: mean and (ddof 1) std of each run of group_size returns, in plain Python."""
    out = []
    for start in range(0, len(returns), group_size):
        group = returns[start : start + group_size]
        mean = sum(group) / len(group)
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / (len(group) - 1))
        out += [(r - mean) / (std + eps) if normalize_std else r - mean for r in group]
    return out


@pytest.mark.parametrize("normalize_std", [True, False])
def test_group_advantages_equal_a_per_group_loop(normalize_std):
    g = torch.Generator().manual_seed(0)
    returns = torch.randn(5 * 6, generator=g, dtype=torch.float64) * 3 + 1  # 5 groups of 6
    adv, scale = group_advantages(returns, 6, normalize_std, eps=1e-3)
    expected = torch.tensor(reference_advantages(returns.tolist(), 6, normalize_std, 1e-3), dtype=torch.float64)
    assert torch.allclose(adv, expected, atol=1e-12)
    assert torch.allclose(adv.reshape(5, 6).sum(1), torch.zeros(5, dtype=torch.float64), atol=1e-12)
    if normalize_std:
        assert torch.allclose((returns - returns.reshape(5, 6).mean(1).repeat_interleave(6)) / scale, expected, atol=1e-12)
    with pytest.raises(ValueError, match="groups of 7"):
        group_advantages(returns, 7)


def random_episodes(n: int, seed: int, lengths=(3, 4)) -> tuple[list[SingleAgentEpisode], np.ndarray, np.ndarray]:
    """n episodes of random lengths, rewards and behaviour means (obs [x, k/K] of the test chain's spaces); also each
    episode's reward sum and path KL sum_k delta_k^2 / (2 s_k^2)."""
    rng = np.random.default_rng(seed)
    episodes, reward_sums, kls = [], [], []
    for _ in range(n):
        L = int(rng.choice(lengths))
        delta = rng.standard_normal(L)
        log_std = np.log(np.asarray(S_K[:L]))
        rewards = rng.standard_normal(L)
        obs = np.stack([rng.standard_normal(L + 1), np.arange(L + 1) / K], axis=1).astype(np.float32)
        episodes.append(SingleAgentEpisode(
            observations=list(obs), actions=list(rng.standard_normal((L, 1)).astype(np.float32)), rewards=list(rewards),
            extra_model_outputs={Columns.ACTION_LOGP: list(np.zeros(L, np.float32)),
                                 Columns.ACTION_DIST_INPUTS: list(np.stack([delta, log_std], 1).astype(np.float32))},
            terminated=True, observation_space=OBS_SPACE, action_space=ACT_SPACE, len_lookback_buffer=0))
        reward_sums.append(rewards.astype(np.float32).sum())
        kls.append(float(np.sum(delta.astype(np.float32) ** 2 / (2 * np.exp(2 * log_std.astype(np.float32))))))
    return episodes, np.asarray(reward_sums), np.asarray(kls)


@pytest.mark.parametrize("normalize_std", [True, False])
def test_the_learner_pipeline_gives_every_step_its_groups_advantage(normalize_std):
    """GRPOLearner's connector pipeline on episodes of unequal lengths: each row of episode i carries the reference
    loop's A_i of R_i = sum r - alpha path KL, and the direct KL column is alpha (G-1)/G / scale_g."""
    group_size, alpha = 4, 0.7
    learner, _ = build_learner(normalize_std, alpha=alpha, group_size=group_size)
    episodes, reward_sums, kls = random_episodes(3 * group_size, seed=1)
    lens = [len(e) + 1 for e in episodes]  # + the bootstrap row AddOneTs... appends (loss mask False)
    mb = run_pipeline(learner, episodes)
    returns = (reward_sums - alpha * kls).tolist()
    expected = reference_advantages(returns, group_size, normalize_std, 1e-4)
    rows = np.repeat(expected, lens)
    assert np.allclose(mb[Postprocessing.ADVANTAGES].numpy(), rows, atol=2e-5)
    groups = np.asarray(returns).reshape(-1, group_size)
    scale = groups.std(1, ddof=1) + 1e-4 if normalize_std else np.ones(len(groups))
    coeff = np.repeat(alpha * (group_size - 1) / group_size / scale, group_size)
    assert np.allclose(mb[KL_LOSS_COEFF].numpy(), np.repeat(coeff, lens), rtol=1e-5)
    with pytest.raises(ValueError, match="not whole groups of 4"):
        run_pipeline(learner, episodes[:-1])


def test_a_group_of_different_conditions_is_refused():
    connector = GroupAdvantageConnector(alpha=0.0, group_size=2)
    module = SimpleNamespace(event_dim=1, cond_dim=1)
    obs = torch.tensor([[0.0, 0.0, 5.0], [1.0, 1.0, 5.0], [0.0, 0.0, 5.0], [1.0, 1.0, 5.0],  # group 0: condition 5, 5
                        [0.0, 0.0, 1.0], [1.0, 1.0, 1.0], [0.0, 0.0, 2.0], [1.0, 1.0, 2.0]])  # group 1: 1, 2
    counts = torch.tensor([2, 2, 2, 2])
    connector._check_groups(obs[:4], counts[:2], module)  # one condition per group: fine
    with pytest.raises(ValueError, match="group 1 .* different conditions"):
        connector._check_groups(obs, counts, module)


# -- the surrogate gradient against the closed form ---------------------------------------------------------------


def estimate_gradients() -> dict[str, np.ndarray]:
    """-K G/(G-1) grad L per independent batch: the learner's, with the advantages' sign flipped, and with the direct
    KL term's sign flipped."""
    learner, module = build_learner(normalize_std=False)
    factor = -K * G / (G - 1)
    out: dict[str, list[float]] = {"grpo": [], "flipped_advantage": [], "flipped_direct": []}
    for b in range(BATCHES):
        episodes, _ = simulate(EPISODES_PER_BATCH, seed=2000 + b)
        mb = run_pipeline(learner, episodes)
        out["grpo"].append(factor * loss_grad(learner, module, mb))
        mb[Postprocessing.ADVANTAGES] = -mb[Postprocessing.ADVANTAGES]
        out["flipped_advantage"].append(factor * loss_grad(learner, module, mb))
        mb[Postprocessing.ADVANTAGES] = -mb[Postprocessing.ADVANTAGES]
        mb[KL_LOSS_COEFF] = -mb[KL_LOSS_COEFF]
        out["flipped_direct"].append(factor * loss_grad(learner, module, mb))
    return {k: np.asarray(v) for k, v in out.items()}


@pytest.fixture(scope="module")
def gradients() -> dict[str, np.ndarray]:
    return estimate_gradients()


def test_grpo_gradient_matches_the_closed_form(gradients):
    """-K G/(G-1) grad L within 3 s.e. of dJ/dtheta = -50.34 (group normalisation off).

    Measured: see the report line on failure."""
    exact = closed_form_grad()
    m, se = mean_se(gradients["grpo"])
    assert abs(m - exact) < 3 * se, f"GRPO gradient {m:.3f} +- {se:.3f}, closed form {exact:.3f}"


@pytest.mark.parametrize("variant", ["flipped_advantage", "flipped_direct"])
def test_a_flipped_sign_is_detected(gradients, variant):
    """The advantage's sign flipped, or the direct KL term's: > 5 s.e. from dJ/dtheta."""
    exact = closed_form_grad()
    m, se = mean_se(gradients[variant])
    assert abs(m - exact) > 5 * se, f"{variant}: {m:.3f} +- {se:.3f}, closed form {exact:.3f}"


# -- options ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("learner, match", [
    ({"episodes_per_iteration": 100}, r"episodes_per_iteration must be a multiple of group_size = 16 .*\(got 100\); use episodes_per_iteration: 96"),
    ({"num_envs": 20, "group_size": 8}, r"num_envs must be a multiple of group_size = 8 .*\(got 20\)"),
    ({"group_size": 1}, r"group_size must be >= 2"),
    ({"gamma": 0.9}, r"gamma must be 1.0 for grpo"),
    ({"std_eps": 0.0}, r"std_eps must be > 0"),
    ({"lr": 5e-5}, r"lr_final must be <= lr = 5e-05 .*\(got 0.0001\); use lr_final: 5e-06 or null"),
    ({"env": "restart"}, "needs a drift env"),
])
def test_option_errors_before_ray_starts(learner, match):
    with pytest.raises(ConfigError, match=match):
        check_learner_spec({"type": "grpo", **learner})


def test_default_lr_decays_linearly_to_lr_final_at_the_last_iteration():
    """GRPO's default schedule: lr 1e-3 at the first update, 1e-4 at the last of run.iterations (rlft.rllib.grpo)."""
    from rlft.rllib.adapter import lr_schedule
    from rlft.rllib.grpo import GRPOOptions

    o = GRPOOptions()
    assert (o.lr, o.lr_final) == (1e-3, 1e-4)
    steps = o.episodes_per_iteration * 100
    assert lr_schedule(o.lr, o.lr_final, 100, steps) == [[0, 1e-3], [99 * steps, 1e-4]]
    assert lr_schedule(o.lr, None, 100, steps) == 1e-3


# -- on Ray: one iteration, a data-only checkpoint, rlft.load without Ray ----------------------------------------


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_one_grpo_iteration_checkpoint_and_rlft_load(ray_session, tmp_path):
    """No value network anywhere; the checkpoint loads back into the learner and, without Ray, into `rlft.load`'s
    sampler, whose control equals the learner's."""
    import json

    from rlft.api import load
    from rlft.config import DEFAULT_TASK, task_from_dict
    from rlft.learners import build_learner
    from rlft.models import build_model
    from rlft.rewards import build_reward

    task_dict = dict(DEFAULT_TASK, num_steps=8)
    task_dict["learner"] = {"type": "grpo", "group_size": 4, "episodes_per_iteration": 16, "num_envs": 16,
                            "minibatch_size": 64, "num_epochs": 1, "save_rllib_checkpoint": False}
    task = task_from_dict(task_dict)
    model = build_model(task.model, task.num_steps)
    learner = build_learner(task, model, build_reward(task.reward, model=model))
    try:
        metrics = learner.train_iteration()
        assert learner.reward_queries == 16 and metrics["episodes"] == 16
        assert all(np.isfinite(v) for v in metrics.values())
        assert "group_return_std" in metrics and "path_kl" in metrics and metrics.get("vf_loss", 0.0) == 0.0
        state = learner.module_state()
        assert state and not any(k.startswith("value_net") for k in state)
        learner.save_checkpoint(str(tmp_path))
        assert json.loads((tmp_path / "rlft.json").read_text())["learner"] == "GRPO"
        learner.train_iteration()
        learner.load_checkpoint(str(tmp_path))
        assert all(np.array_equal(state[k], v) for k, v in learner.module_state().items())
        x = torch.randn(5, 2)
        expected = learner.control()(3, x, None)
    finally:
        learner.algo.stop()
    sampler = load(tmp_path)
    assert torch.allclose(sampler.control(3, x, None), expected, atol=1e-6)


# -- conditions: the drift env draws training conditions per group; held-out ones never ----------------------------

COND_TASK = {
    "model": {"type": "gmm", "weights": [0.5, 0.5], "means": [[1.0, 1.0], [-1.0, -1.0]], "stds": [0.5, 0.5]},
    "reward": {"type": "quadratic", "center": "condition", "scale": 1.0}, "alpha": 1.0, "num_steps": 4, "seed": 0,
    "conditions": {"train": [[1.0, 0.5], [-1.0, 1.0], [0.5, -1.0]], "eval": [[0.0, 2.0], [2.0, 0.0]]},
}


def test_the_drift_env_gives_each_group_one_training_condition_and_the_reward_gets_it():
    from envs.drift import DenoisingDriftEnv
    from rlft.rewards import evaluate

    env = DenoisingDriftEnv(task=COND_TASK, num_envs=12, group_size=4, seed=0)
    train, held = env.conditions.train, env.conditions.eval
    assert env.single_observation_space.shape == (2 + 1 + 2,)
    seen = set()
    obs, _ = env.reset(seed=0)
    for _ in range(6):  # six rounds of K steps (NEXT_STEP autoreset draws new conditions)
        cond = torch.as_tensor(obs[:, 3:])  # (B, 2)
        groups = cond.reshape(3, 4, 2)
        assert torch.equal(groups, groups[:, :1].expand(-1, 4, -1)), "a group's sub-envs must share their condition"
        assert len({tuple(g[0].tolist()) for g in groups}) == 3, "3 groups <= 3 training conditions: all distinct"
        is_train = (cond[:, None] == train[None]).all(-1).any(-1)
        is_held = (cond[:, None] == held[None]).all(-1).any(-1)
        assert is_train.all() and not is_held.any(), "only training conditions may be drawn in training"
        seen |= {tuple(c) for c in cond.tolist()}
        for _ in range(env.num_steps):
            obs, reward, terminated, _, _ = env.step(env.pretrained_action())
        x = env.x.clone()
        expected = evaluate(env.reward, x, cond=cond.to(x.dtype))  # -|x - c|^2 / 2 at each row's own condition
        assert np.allclose(reward, expected.numpy(), rtol=1e-5) and terminated.all()
        assert np.allclose(reward, (-0.5 * ((x - cond.to(x.dtype)) ** 2).sum(-1)).numpy(), rtol=1e-5)
        obs, *_ = env.step(np.zeros((12, 2), np.float32))  # the autoreset step
    assert seen == {tuple(c) for c in train.tolist()}
    with pytest.raises(ValueError, match="group_size must divide num_envs = 12"):
        DenoisingDriftEnv(task=COND_TASK, num_envs=12, group_size=5)


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_grpo_on_a_conditional_task(ray_session, tmp_path):
    """One iteration on a conditional task: the policy sees the condition (obs D + 1 + d), every batch group holds one
    condition (the connector raises otherwise), the control takes cond, and `rlft.load` rebuilds it without Ray."""
    from rlft.api import load
    from rlft.config import task_from_dict
    from rlft.learners import build_learner
    from rlft.models import build_model
    from rlft.rewards import build_reward

    task = task_from_dict({**COND_TASK, "learner": {
        "type": "grpo", "group_size": 4, "episodes_per_iteration": 16, "num_envs": 16, "minibatch_size": 64, "num_epochs": 1,
        "save_rllib_checkpoint": False}})
    model = build_model(task.model, task.num_steps)
    learner = build_learner(task, model, build_reward(task.reward, model=model))
    try:
        assert learner.env.env_kwargs[GROUP_SIZE] == 4 and learner.env.env_kwargs["conditions"] == COND_TASK["conditions"]
        metrics = learner.train_iteration()
        assert np.isfinite(metrics["group_return_std"]) and learner.reward_queries == 16
        x, c = torch.randn(5, 2), torch.tensor([[1.0, 0.5]]).expand(5, 2)
        expected = learner.control()(1, x, c)
        assert expected.shape == (5, 2) and not torch.equal(expected, learner.control()(1, x, -c))  # it reads c
        learner.save_checkpoint(str(tmp_path))
    finally:
        learner.algo.stop()
    assert torch.allclose(load(tmp_path).control(1, x, c), expected, atol=1e-6)
