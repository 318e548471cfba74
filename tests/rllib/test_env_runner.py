"""BulkEnvRunner: the same episodes as RLlib's SingleAgentEnvRunner, in the numpy form PPO's connectors accept."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ray.rllib.algorithms.ppo import PPOConfig
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.env.single_agent_env_runner import SingleAgentEnvRunner

from rlft.config import DEFAULT_TASK
from rlft.rllib.env_runner import ENV_ID, RLLIB_ENV, VECTORIZE_MODE, BulkEnvRunner
from rlft.rllib.modules import DriftPolicyModule, RestartPolicyModule, drift_model_config

K, B = 6, 8
TASK = dict(DEFAULT_TASK, num_steps=K)


def drift_config(runner_cls, stds) -> PPOConfig:
    return (
        PPOConfig()
        .environment(RLLIB_ENV, env_config={ENV_ID: "drift", "task": TASK}, normalize_actions=False, clip_actions=False)
        .env_runners(num_env_runners=0, num_envs_per_env_runner=B, gym_env_vectorize_mode=VECTORIZE_MODE, env_runner_cls=runner_cls)
        .rl_module(rl_module_spec=RLModuleSpec(module_class=DriftPolicyModule, model_config=drift_model_config(stds)))
        .debugging(seed=11)
    )


@pytest.fixture(scope="module")
def stds():
    from envs.base import build_task_objects

    _, model, _ = build_task_objects(TASK)
    return [model.std(k) for k in range(K)]


def perturb(runner) -> None:
    """Gives the policy a non-zero mean so that ACTION_DIST_INPUTS and the actions depend on it."""
    module = runner.module
    with torch.no_grad():
        torch.manual_seed(5)
        torch.nn.init.normal_(module.mean_net[-1].weight, std=0.5)


def test_bulk_runner_episodes_equal_the_default_runners(stds):
    default = SingleAgentEnvRunner(config=drift_config(SingleAgentEnvRunner, stds))
    bulk = BulkEnvRunner(config=drift_config(BulkEnvRunner, stds))
    perturb(default), perturb(bulk)
    # one call each: RLlib's runner re-seeds its env at every `sample(num_episodes=...)` call (it sets
    # _needs_initial_reset), BulkEnvRunner seeds once and continues the env's generator
    for _ in range(1):
        torch.manual_seed(100)
        ref = default.sample(num_episodes=B)
        torch.manual_seed(100)
        out = bulk.sample(num_episodes=B)
        assert len(ref) == len(out) == B
        for a, b in zip(ref, out):
            assert len(a) == len(b) == K and a.is_terminated and b.is_terminated and not b.is_truncated
            assert a.is_numpy and b.is_numpy
            for get in ("get_observations", "get_actions", "get_rewards"):
                x, y = getattr(a, get)(), getattr(b, get)()
                assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y), get
            assert sorted(a.extra_model_outputs) == sorted(b.extra_model_outputs)
            for key in a.extra_model_outputs:
                x, y = a.get_extra_model_outputs(key), b.get_extra_model_outputs(key)
                assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y), key
            assert a.get_return() == b.get_return()
    metrics = bulk.get_metrics()
    assert metrics["num_episodes"] == B and metrics["num_env_steps_sampled"] == B * K


def test_bulk_runner_episodes_go_through_ppos_learner(stds):
    """One PPO update from BulkEnvRunner episodes (AddOneTs..., GAE, the PPO loss) runs and changes the policy."""
    config = drift_config(BulkEnvRunner, stds).training(train_batch_size_per_learner=B * K, minibatch_size=B * K, num_epochs=1, lr=1e-2)
    runner = BulkEnvRunner(config=config)
    episodes = runner.sample(num_episodes=B)
    learner = config.build_learner(env=runner.env.unwrapped)
    before = {k: v.copy() for k, v in learner.module["default_policy"].get_state().items()}
    results = learner.update(episodes=episodes)
    assert np.isfinite(float(results["default_policy"]["policy_loss"].peek()))
    after = learner.module["default_policy"].get_state()
    assert any(not np.array_equal(before[k], after[k]) for k in before)


def test_bulk_runner_on_the_restart_env_returns_whole_episodes():
    config = (
        PPOConfig()
        .environment(RLLIB_ENV, env_config={ENV_ID: "restart", "task": TASK, "budget": 3 * K}, normalize_actions=False, clip_actions=False)
        .env_runners(num_env_runners=0, num_envs_per_env_runner=B, gym_env_vectorize_mode=VECTORIZE_MODE, env_runner_cls=BulkEnvRunner)
        .rl_module(rl_module_spec=RLModuleSpec(module_class=RestartPolicyModule, model_config={"event_dim": 2}))
        .debugging(seed=2)
    )
    runner = BulkEnvRunner(config=config)
    episodes = runner.sample(num_episodes=3 * B)
    assert len(episodes) == 3 * B
    lengths = {len(e) for e in episodes}
    assert len(lengths) > 1 and max(lengths) <= 3 * K and min(lengths) >= K
    for e in episodes:
        obs = e.get_observations()
        assert e.is_terminated and obs.shape == (len(e) + 1, 5)
        assert obs[-1, 2] == 1.0 and (obs[:-1, 2] < 1.0).all()  # level K only at the end
        assert e.get_actions().dtype == np.int64 and set(np.unique(e.get_actions())) <= {0, 1}


def test_learner_batch_rows_are_episodes_then_their_bootstrap_row(stds):
    """The layout `FPGRewardConnector` relies on: each episode's rows s_0..s_{L-1}, then one bootstrap row s_L (mask
    False), episodes one after another, so row t's next state is row t + 1."""
    config = drift_config(BulkEnvRunner, stds).training(train_batch_size_per_learner=B * K, minibatch_size=B * K)
    runner = BulkEnvRunner(config=config)
    episodes = runner.sample(num_episodes=B)
    expected = np.concatenate([e.get_observations() for e in episodes])  # (B (K+1), obs)
    learner = config.build_learner(env=runner.env.unwrapped)
    batch = learner._learner_connector(rl_module=learner.module, batch={}, episodes=episodes, shared_data={}, metrics=None)
    mb = batch["default_policy"]
    assert np.array_equal(mb[Columns.OBS].numpy(), expected)
    mask = mb[Columns.LOSS_MASK].numpy().reshape(B, K + 1)
    assert mask[:, :K].all() and not mask[:, K].any()


def test_episode_factory_builds_what_the_constructor_builds():
    import gymnasium as gym

    from rlft.rllib.env_runner import EpisodeFactory

    obs_space = gym.spaces.Box(-np.inf, np.inf, (3,), np.float32)
    act_space = gym.spaces.Discrete(2)
    factory = EpisodeFactory(obs_space, act_space)
    assert factory.use_fast  # the fast path is active on the pinned RLlib
    g = np.random.default_rng(0)
    args = (g.normal(size=(5, 3)).astype(np.float32), g.integers(0, 2, 4), g.normal(size=4).astype(np.float32),
            {"action_logp": g.normal(size=4).astype(np.float32)}, True, False, 1.0, 2.0)
    fast = factory(*args)
    factory.use_fast = False
    slow = factory(*args)
    a, b = fast.get_state(), slow.get_state()
    a.pop("id_"), b.pop("id_")
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict) and "data" in a[key]:  # a buffer
            assert {k: v for k, v in a[key].items() if k != "data"} == {k: v for k, v in b[key].items() if k != "data"}, key
            assert all(np.array_equal(x, y) for x, y in zip(a[key]["data"], b[key]["data"])), key
        elif key == "extra_model_outputs":
            assert a[key].keys() == b[key].keys()
        else:
            assert a[key] == b[key], key
    assert fast.get_duration_s() == slow.get_duration_s() == 1.0 and len(fast) == len(slow) == 4
