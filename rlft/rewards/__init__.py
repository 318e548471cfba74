"""Rewards: the protocol, the checked evaluation, the registry YAML names, and the built-ins."""

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

__all__ = [
    "Reward", "RewardError", "FunctionReward", "build_reward", "check_reward_values", "evaluate",
    "register_reward", "registered_rewards", "resolve_reward",
]
