"""Rewards: the protocol, the checked evaluation and `build_reward`; the closed-form built-ins (`builtin`) and the
f-regularised reward (`f_regularised`). Task-specific rewards live with their task (`rlft.tasks`); every
`reward.type` name is looked up in `rlft.registry`."""

from rlft.rewards.base import (
    FunctionReward,
    Reward,
    RewardError,
    build_reward,
    check_reward_values,
    evaluate,
    register_reward,
    registered_rewards,
    resolve_reward,
)
from rlft.rewards.f_regularised import FRegularisedReward, prepare_reward_spec

__all__ = [
    "Reward", "RewardError", "FunctionReward", "build_reward", "check_reward_values", "evaluate",
    "register_reward", "registered_rewards", "resolve_reward", "FRegularisedReward", "prepare_reward_spec",
]
