"""PPO+KL: the KL connectors against closed forms, one iteration with 2 remote EnvRunners, and checkpoints."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from ray.rllib.core.columns import Columns

from rlft.config import DEFAULT_TASK, task_from_dict
from rlft.learners import build_learner
from rlft.models import build_model
from rlft.rewards import build_reward
from rlft.checkpoint import flatten_state as _flatten, unflatten_state as _unflatten
from rlft.rllib.adapter import WEIGHTS_FILE
from rlft.rllib.connectors import KLPenaltyConnector
from rlft.rllib.modules import DriftPolicyModule, drift_model_config, drift_spaces


def small_task(**learner) -> dict:
    task = dict(DEFAULT_TASK, num_steps=8)
    task["learner"] = {"type": "ppo_kl", "episodes_per_iteration": 32, "num_envs": 16, "minibatch_size": 128, "num_epochs": 1,
                       "save_rllib_checkpoint": False, **learner}
    return task


def build(task_dict):
    task = task_from_dict(task_dict)
    model = build_model(task.model, task.num_steps)
    return build_learner(task, model, build_reward(task.reward, model=model))


class _Modules(dict):
    """A stand-in for the MultiRLModule a learner connector receives."""


def test_kl_penalty_connector_subtracts_alpha_times_the_closed_form():
    g = torch.Generator().manual_seed(0)
    delta, std = torch.randn(6, 2, generator=g), torch.rand(6, generator=g) + 0.1
    adi = torch.cat([delta, torch.log(std)[:, None].expand(6, 2)], dim=-1)
    mask = torch.tensor([True, True, False, True, True, False])
    rewards = torch.randn(6, generator=g)
    batch = {"default_policy": {Columns.ACTION_DIST_INPUTS: adi, Columns.LOSS_MASK: mask, Columns.REWARDS: rewards.clone(),
                                Columns.TERMINATEDS: ~mask, Columns.TRUNCATEDS: torch.zeros(6, dtype=torch.bool)}}
    model = build_model(task_from_dict(small_task()).model, 8)
    obs_space, act_space = drift_spaces(model)
    module = DriftPolicyModule(observation_space=obs_space, action_space=act_space, model_config=drift_model_config([1.0] * 8))
    out = KLPenaltyConnector(alpha=0.7)(rl_module=_Modules(default_policy=module), batch=batch, episodes=[])
    expected = rewards - 0.7 * (delta.pow(2).sum(-1) / (2 * std**2)) * mask.float()
    assert torch.allclose(out["default_policy"][Columns.REWARDS], expected, rtol=1e-5)


# KLLossScaleConnector's scale is pinned by tests/rllib/test_ppo_kl_math.py against the std RLlib's GAE really
# standardised the advantages with (and the learner's gradient against the closed-form dJ/dtheta), not restated here.


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_one_ppo_kl_iteration_with_two_env_runners(ray_session):
    task = small_task()
    task["run"] = {"num_env_runners": 2, "cpus_per_env_runner": 0.5, "num_envs_per_env_runner": 16}
    learner = build(task)
    try:
        assert learner.algo.env_runner_group.num_remote_env_runners() == 2
        metrics = learner.train_iteration()
        assert learner.iteration == 1 and learner.reward_queries == 32  # 2 runners x 16 envs, one reward each
        assert all(np.isfinite(v) for v in metrics.values())
        assert metrics["episodes"] == 32 and "kl_to_pretrained" in metrics and "path_kl" in metrics
        x = torch.randn(5, 2)
        assert learner.control()(3, x, None).shape == (5, 2)
    finally:
        learner.algo.stop()


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_checkpoint_round_trip_is_data_only(ray_session, tmp_path):
    """save -> train on -> load restores the policy, the value net, the optimizer and the counters (no unpickling)."""
    learner = build(small_task(save_rllib_checkpoint=True))
    try:
        learner.train_iteration()
        before = learner.module_state()
        adam = lambda: learner.algo.learner_group.get_state(components="learner")["learner"]["optimizer"]  # noqa: E731
        moments = adam()["default_policy_default_optimizer"]["state"]["state"]
        learner.save_checkpoint(str(tmp_path))
        assert {WEIGHTS_FILE, "rlft.json", "rllib"} <= set(os.listdir(tmp_path))
        state = json.loads((tmp_path / "rlft.json").read_text())
        assert (state["format"], state["version"], state["iteration"]) == ("rlft-rllib", 2, 1)
        learner.train_iteration()
        moved = learner.module_state()
        assert any(not np.array_equal(before[k], moved[k]) for k in before)
        learner.load_checkpoint(str(tmp_path))
        after = learner.module_state()
        assert learner.iteration == 1 and learner.reward_queries == 32
        assert all(np.array_equal(before[k], after[k]) for k in before)
        restored = adam()["default_policy_default_optimizer"]["state"]["state"]
        assert all(np.array_equal(np.asarray(moments[i]["exp_avg_sq"]), np.asarray(restored[i]["exp_avg_sq"])) for i in moments)
        # the EnvRunner's copy was synced too
        runner_state = learner.algo.env_runner.module.get_state()
        assert all(np.array_equal(before[k], runner_state[k]) for k in runner_state)
        # a version-1 directory (state.json, written before rlft.checkpoint) still loads
        (tmp_path / "state.json").write_text(json.dumps({**state, "version": 1}))
        (tmp_path / "rlft.json").unlink()
        learner.train_iteration()
        learner.load_checkpoint(str(tmp_path))
        assert learner.iteration == 1 and all(np.array_equal(before[k], v) for k, v in learner.module_state().items())
    finally:
        learner.algo.stop()


def test_env_spec_ships_the_typed_model_and_a_reward_solved_once_on_the_driver(monkeypatch):
    """An EnvRunner's env is built from the EnvSpec's env_config: the same typed model config, and an f-regularised
    reward whose lambda the driver solved (building the env draws no pretrained sample)."""
    import rlft.rewards.f_regularised as f_regularised
    from rlft.config import model_config_from_dict
    from rlft.rllib.adapter import EnvSpec
    from rlft.rllib.env_runner import make_env

    reward = {"type": "f_regularised", "base": dict(DEFAULT_TASK["reward"]), "divergence": "js", "alpha": 0.5, "num_samples": 256}
    task = task_from_dict(dict(DEFAULT_TASK, num_steps=8, reward=reward))
    model = build_model(task.model, task.num_steps)
    spec = EnvSpec.of("drift", task, model)
    solved = f_regularised.pretrained_lambda(build_reward(reward["base"]), model, "js", 0.5, 256)
    assert spec.reward["lambda_"] == solved and "lambda_" not in task.reward
    config = spec.env_config()
    assert model_config_from_dict(config["task"]["model"]) == task.model and config["env_id"] == "drift"

    def no_sampling(*args, **kwargs):
        raise AssertionError("an EnvRunner re-solved lambda")

    monkeypatch.setattr(f_regularised, "pretrained_lambda", no_sampling)
    env = make_env({**config, "num_envs": 4})
    assert type(env.unwrapped).__name__ == "DenoisingDriftEnv" and env.unwrapped.reward.lambda_ == solved
    assert env.unwrapped.num_envs == 4 and env.unwrapped.num_steps == 8


@pytest.mark.parametrize("learner, match", [
    ({"kl_mode": "loss"}, "kl_mode 'loss' was removed.*biased.*use kl_mode: reward"),
    ({"env": "restart"}, "ppo_kl needs a drift env"),
    ({"env": "nowhere:x/Y-v0"}, "module 'nowhere' cannot be imported"),
    ({"env": "x/Y-v0"}, "not registered with Gymnasium"),
    ({"lambda_": 1.5}, r"lambda_ must be in \[0, 1\] \(got 1.5\)"),
    ({"kl_coeff": 1.0}, "kl_coeff is not a known key"),
])
def test_option_errors_name_the_key_the_rule_and_the_fix_before_ray_starts(learner, match):
    from rlft.config import ConfigError
    from rlft.learners import check_learner_spec

    with pytest.raises(ConfigError, match=match):
        check_learner_spec({"type": "ppo_kl", **learner})


def test_flatten_round_trip():
    state = {"a": {"w": np.arange(6.0).reshape(2, 3), 3: [np.ones(2), 0.5, "adam", None, True]}, "step": np.int64(4)}
    tensors, meta = _flatten(state)
    json.dumps(meta)
    back = _unflatten(tensors, json.loads(json.dumps(meta)))
    assert np.array_equal(back["a"]["w"], state["a"]["w"]) and back["a"][3][1:] == [0.5, "adam", None, True]
    assert np.array_equal(back["a"][3][0], np.ones(2)) and back["step"] == 4


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(600)
def test_ppo_kl_with_a_lora_policy_on_a_diffusers_model(ray_session, tmp_path):
    """`policy: lora`: one PPO+KL iteration fine-tunes only the LoRA of a (tiny, random) diffusers UNet."""
    from rlft.models.diffusers_chain import DiffusersChain
    from rlft.tasks.digits_unet import digits_scheduler_config, tiny_unet_config

    DiffusersChain.from_config(tiny_unet_config((8, 16)), digits_scheduler_config(), num_steps=3, seed=0).save_pretrained(tmp_path / "unet")
    task = {"model": {"type": "diffusers", "path": str(tmp_path / "unet")}, "reward": {"type": "linear", "direction": [0.01] * 64},
            "alpha": 1.0, "num_steps": 3, "seed": 0,
            "learner": {"type": "ppo_kl", "policy": "lora", "lora_rank": 2, "episodes_per_iteration": 4, "num_envs": 4,
                        "minibatch_size": 12, "num_epochs": 1, "save_rllib_checkpoint": False}}
    learner = build(task)
    try:
        delta0 = learner.control()(1, torch.randn(2, 1, 8, 8), None)
        assert torch.equal(delta0, torch.zeros_like(delta0))
        metrics = learner.train_iteration()
        assert np.isfinite(metrics["policy_loss"]) and learner.reward_queries == 4
        state = learner.module_state()
        assert any("lora_" in k for k in state)
    finally:
        learner.algo.stop()
