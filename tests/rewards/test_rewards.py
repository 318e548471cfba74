"""Rewards: built-in values by hand, the checked `evaluate`, the registry's errors and user rewards."""

from __future__ import annotations

import math

import pytest
import torch

from rlft import registry
from rlft.config import ConfigError
from rlft.rewards import FunctionReward, Reward, RewardError, build_reward, evaluate, register_reward, registered_rewards
from rlft.rewards.builtin import DistanceToModeReward, LinearReward, QuadraticReward

F64 = torch.float64


# -- built-ins ------------------------------------------------------------------------------------


def test_builtin_values_by_hand():
    x = torch.tensor([[1.0, 1.0], [0.5, 2.0]], dtype=F64)
    torch.testing.assert_close(LinearReward([1.0, -2.0])(x), torch.tensor([-1.0, -3.5], dtype=F64))
    # -scale/2 |x - c|^2 with c = (1, 0), scale = 2: |(0, 1)|^2 = 1, |(-0.5, 2)|^2 = 4.25
    torch.testing.assert_close(QuadraticReward([1.0, 0.0], scale=2.0)(x), torch.tensor([-1.0, -4.25], dtype=F64))
    # -scale * min distance to modes (0, 0), (3, 4)
    d2m = DistanceToModeReward(modes=[[0.0, 0.0], [3.0, 4.0]], scale=2.0)
    y = torch.tensor([[3.0, 0.0], [3.0, 3.0], [0.0, 0.0]], dtype=F64)
    torch.testing.assert_close(d2m(y), torch.tensor([-6.0, -2.0, 0.0], dtype=F64))
    # images / sequences are flattened
    torch.testing.assert_close(LinearReward([1.0, -2.0])(x.reshape(2, 1, 2)), torch.tensor([-1.0, -3.5], dtype=F64))


def test_distance_to_mode_takes_the_modes_of_the_gmm(gmm2d):
    reward = build_reward({"type": "distance_to_mode", "scale": 1.0}, model=gmm2d)
    means = gmm2d.data.means.to(F64)
    torch.testing.assert_close(reward(means), torch.zeros(3, dtype=F64), atol=1e-6, rtol=0)
    assert float(reward(means[:1] + torch.tensor([[0.1, 0.0]], dtype=F64))) == pytest.approx(-0.1, abs=1e-6)


def test_quadratic_reward_rejects_a_wrong_event_size():
    with pytest.raises(ValueError, match=r"center has 2 entries, samples have 3"):
        QuadraticReward([0.0, 0.0])(torch.zeros(4, 3))


# -- evaluate(): the checked call -----------------------------------------------------------------


def _bad_at(index: int, value: float):
    def fn(x):
        r = x.sum(-1).clone()
        r[index] = value
        return r

    return FunctionReward(fn, name="my_bad_reward")


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_evaluate_names_the_reward_and_the_batch_index_of_a_non_finite_value(value):
    with pytest.raises(RewardError, match=r"'my_bad_reward' returned .* at batch index 2 \(1 of 5 values"):
        evaluate(_bad_at(2, value), torch.zeros(5, 2))


@pytest.mark.parametrize("shape", [(4, 1), (4, 3), (3,)])
def test_evaluate_names_the_shape_of_a_wrong_output(shape):
    reward = FunctionReward(lambda x: torch.zeros(shape), name="shaped")
    with pytest.raises(RewardError, match=rf"'shaped' must return shape \(4,\).*got {re_shape(shape)}"):
        evaluate(reward, torch.zeros(4, 3))


def re_shape(shape: tuple[int, ...]) -> str:
    return r"\(" + r", ".join(map(str, shape)) + (r",\)" if len(shape) == 1 else r"\)")


def test_evaluate_rejects_a_non_tensor_and_checks_true_reward():
    with pytest.raises(RewardError, match=r"'listy' must return a torch.Tensor .* \(got list\)"):
        evaluate(FunctionReward(lambda x: [0.0] * x.shape[0], name="listy"), torch.zeros(2, 2))
    out = evaluate(QuadraticReward([0.0, 0.0]), torch.ones(3, 2), true=True)
    torch.testing.assert_close(out, torch.full((3,), -1.0))
    assert not QuadraticReward([0.0, 0.0]).has_true_reward


# -- registry -------------------------------------------------------------------------------------


def test_registry_lists_valid_types_and_names_unknown_keys():
    assert {"linear", "quadratic", "distance_to_mode", "mlp_oracle", "f_regularised"} <= set(registered_rewards())
    with pytest.raises(ConfigError, match=r"reward.type: .*'nope' is not known; choose one of .*'quadratic'"):
        build_reward({"type": "nope"})
    with pytest.raises(ConfigError, match=r"reward.foo is not a parameter of QuadraticReward; valid: \['center', 'scale'\]"):
        build_reward({"type": "quadratic", "center": [0.0, 0.0], "foo": 1})
    with pytest.raises(ConfigError, match=r"reward.center is required"):
        build_reward({"type": "quadratic"})
    with pytest.raises(ConfigError, match=r"module 'no_such_module_xyz' cannot be imported"):
        build_reward({"type": "no_such_module_xyz:R"})


def test_a_users_module_class_and_function_resolve(tmp_path, monkeypatch):
    (tmp_path / "rlft_user_rewards_t1.py").write_text(
        "import torch\n"
        "from rlft.rewards import Reward\n"
        "class Shifted(Reward):\n"
        "    def __init__(self, shift: float = 0.0):\n"
        "        self.shift = shift\n"
        "    def __call__(self, x):\n"
        "        return x.sum(-1) + self.shift\n"
        "def norm_reward(x):\n"
        "    return -x.norm(dim=-1)\n"
        "def scaled(scale: float):\n"
        "    return lambda x: scale * x[:, 0]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    x = torch.tensor([[3.0, 4.0]])
    cls = build_reward({"type": "rlft_user_rewards_t1:Shifted", "shift": 1.5})
    torch.testing.assert_close(evaluate(cls, x), torch.tensor([8.5]))
    fn = build_reward({"type": "rlft_user_rewards_t1:norm_reward"})
    assert isinstance(fn, FunctionReward)
    torch.testing.assert_close(evaluate(fn, x), torch.tensor([-5.0]))
    factory = build_reward({"type": "rlft_user_rewards_t1:scaled", "scale": 2.0})
    torch.testing.assert_close(evaluate(factory, x), torch.tensor([6.0]))
    with pytest.raises(ConfigError, match=r"reward.shift must be"):
        build_reward({"type": "rlft_user_rewards_t1:Shifted", "shift": "big"})
    with pytest.raises(ConfigError, match=r"has no attribute 'Missing'"):
        build_reward({"type": "rlft_user_rewards_t1:Missing"})


def test_register_reward_is_a_thin_wrapper_over_the_registry(monkeypatch):
    monkeypatch.setitem(registry._OBJECTS, "reward", dict(registry._OBJECTS["reward"]))  # undone after the test

    @register_reward("doubled_sum_test")
    class DoubledSum(Reward):
        def __call__(self, x):
            return 2.0 * x.sum(-1)

    assert DoubledSum.name == "doubled_sum_test" and "doubled_sum_test" in registered_rewards()
    assert registry.resolve("reward", "doubled_sum_test") is DoubledSum
    torch.testing.assert_close(evaluate(build_reward({"type": "doubled_sum_test"}), torch.ones(3, 2)), torch.full((3,), 4.0))
    assert register_reward("doubled_sum_test")(DoubledSum) is DoubledSum  # registering the same class again is harmless
    with pytest.raises(ValueError, match=r"'doubled_sum_test' is already registered"):
        register_reward("doubled_sum_test")(lambda x: x.sum(-1))
    with pytest.raises(ValueError, match=r"'quadratic' is built in \(rlft.rewards.builtin:QuadraticReward\)"):
        register_reward("quadratic")(DoubledSum)
