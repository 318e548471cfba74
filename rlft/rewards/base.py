"""The reward protocol, the checked call every learner goes through, and `build_reward` (YAML -> reward).

A reward maps a batch x (B, *event) to r (B,). It is differentiable where its math allows
(`differentiable = True`), may carry a genuine reward r* (`true_reward`) beside the nominal r (e.g. a
learned oracle r next to an exact lookup r*), and may declare a closed form (`exact_form`) for which the
exact tilted target is known (`rlft.models.gmm.GaussianMixture.tilt`).

A conditional reward (`conditional = True`) depends on the task's condition c (`rlft.conditions`): it is called as
r(x, cond) with cond (B, d), one condition per sample; `evaluate(reward, x, cond=cond)` passes it, and an
unconditional reward (the default) is called as r(x) whatever the task, so it keeps working unchanged in a
conditional task. `AtCondition(reward, c)` is the unconditional reward x -> r(x, c) at one condition, with its
closed form (`exact_form_at(c)`), which is what per-condition evaluation and exact targets use.

A YAML task names a reward by its registry name (`reward: {type: quadratic, center: [...], scale: 2}`; the
names live in `rlft.registry`, which imports a reward's module only when it is built) or by an import path
to the user's own class or function (`reward: {type: "my_pkg.rewards:MyReward", ...}`); the remaining keys
are the constructor's keyword arguments, checked against its signature.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch

import rlft.registry as registry
from rlft.config import ConfigError, check_kwargs


#: the registry name of a reward served by a pool of Ray actors, and the keys of a reward mapping that ask for one
POOL_TYPE = "reward_pool"
POOL_KEYS = ("workers", "batch_size", "num_cpus", "num_gpus", "max_retries")


class RewardError(ValueError):
    """A reward returned something unusable (NaN/inf, wrong shape, not a tensor)."""


class Reward:
    """Base class of rewards: override `__call__` (and optionally `true_reward`)."""

    #: Registry / display name.
    name: str = "reward"
    #: Whether gradients of r with respect to x are meaningful (differentiable learners need them).
    differentiable: bool = True
    #: ("quadratic", {"center", "scale"}) or ("linear", {"direction"}) when the tilt has a closed form.
    exact_form: tuple[str, dict[str, Any]] | None = None
    #: True when r depends on the condition: called as r(x, cond), cond (B, d) (module docstring).
    conditional: bool = False

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def exact_form_at(self, cond: torch.Tensor) -> tuple[str, dict[str, Any]] | None:
        """The closed form of x -> r(x, cond) at one condition cond (d,); an unconditional reward's own form."""
        return self.exact_form

    @property
    def has_true_reward(self) -> bool:
        """True when the reward knows a genuine reward r* beside the nominal r."""
        return type(self).true_reward is not Reward.true_reward

    def true_reward(self, x: torch.Tensor, *cond: torch.Tensor) -> torch.Tensor:
        """The genuine reward r* (defaults to r itself when the reward is the genuine one); a conditional reward
        is called as true_reward(x, cond)."""
        return self(x, *cond)

    def to(self, device: str | torch.device) -> "Reward":
        return self


class FunctionReward(Reward):
    """Wraps a plain function x -> r (a user's reward written as a function)."""

    def __init__(self, fn: Callable[..., torch.Tensor], name: str | None = None, differentiable: bool = True,
                 conditional: bool | None = None):
        """`conditional` None: the function is conditional when it has a parameter named `cond` (fn(x, cond))."""
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "function")
        self.differentiable = differentiable
        self.conditional = _has_cond_parameter(fn) if conditional is None else bool(conditional)

    def __call__(self, x: torch.Tensor, *cond: torch.Tensor) -> torch.Tensor:
        return self.fn(x, *cond)


class AtCondition(Reward):
    """x -> r(x, c) at one fixed condition c (d,): an unconditional reward, with the closed form at c.

    An unconditional reward is returned as it is by `at_condition`, so wrapping never changes it."""

    def __init__(self, reward: Reward, cond: torch.Tensor) -> None:
        self.reward = reward
        self.cond = torch.as_tensor(cond).reshape(-1)
        self.name = f"{getattr(reward, 'name', 'reward')}@condition"
        self.differentiable = getattr(reward, "differentiable", True)
        self.exact_form = reward.exact_form_at(self.cond) if hasattr(reward, "exact_form_at") else None

    def _cond(self, x: torch.Tensor) -> torch.Tensor:
        return self.cond.to(device=x.device, dtype=x.dtype).reshape(1, -1).expand(x.shape[0], -1)  # (B, d)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.reward(x, self._cond(x))

    @property
    def has_true_reward(self) -> bool:
        return getattr(self.reward, "has_true_reward", False)

    def true_reward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reward.true_reward(x, self._cond(x))


def is_conditional(reward: Any) -> bool:
    """True when a reward is called as r(x, cond) (`Reward.conditional`)."""
    return bool(getattr(reward, "conditional", False))


def at_condition(reward: Reward, cond: torch.Tensor | None) -> Reward:
    """The unconditional reward x -> r(x, cond) for one condition (d,); an unconditional reward (or cond None) as is."""
    if cond is None or not is_conditional(reward):
        return reward
    return AtCondition(reward, cond)


def _has_cond_parameter(fn: Callable) -> bool:
    try:
        return "cond" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def check_reward_values(values: Any, batch: int, name: str, what: str = "reward") -> torch.Tensor:
    """Checks a reward's output: a finite tensor of shape (batch,) (integer/bool values are cast to float).

    Raises `RewardError` naming the index."""
    if not isinstance(values, torch.Tensor):
        raise RewardError(f"{what} {name!r} must return a torch.Tensor of shape ({batch},) (got {type(values).__name__})")
    if values.shape != (batch,):
        hint = " (did you forget to sum over the event dimensions?)" if values.ndim > 1 and values.shape[0] == batch else ""
        raise RewardError(
            f"{what} {name!r} must return shape ({batch},), one value per sample (got {tuple(values.shape)}){hint}"
        )
    if not (values.is_floating_point() or values.is_complex()):  # an integer/bool score: rlft's statistics need floats
        values = values.to(torch.get_default_dtype())
    bad = ~torch.isfinite(values.detach())
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        raise RewardError(
            f"{what} {name!r} returned {values[i].item()} at batch index {i} "
            f"({int(bad.sum())} of {batch} values are NaN/inf); fix the reward or clip its input"
        )
    return values


def evaluate(reward: Reward | Callable, x: torch.Tensor, true: bool = False, cond: torch.Tensor | None = None) -> torch.Tensor:
    """r(x) (or r*(x) with true=True), checked for shape and finiteness; keeps gradients.

    A conditional reward is called as r(x, cond) and needs cond (B, d); an unconditional one ignores cond."""
    name = getattr(reward, "name", getattr(reward, "__name__", type(reward).__name__))
    args: tuple[torch.Tensor, ...] = ()
    if is_conditional(reward):
        if cond is None:
            raise RewardError(f"reward {name!r} depends on the condition: evaluate it with cond (B, d) "
                              "(a conditional task's `conditions:` supply it)")
        if cond.shape[0] != x.shape[0]:
            raise RewardError(f"reward {name!r}: cond has {cond.shape[0]} rows, x has {x.shape[0]}; pass one condition per sample")
        args = (cond.to(device=x.device, dtype=x.dtype),)
    values = reward.true_reward(x, *args) if true else reward(x, *args)
    return check_reward_values(values, x.shape[0], name, "true_reward" if true else "reward")


# -- registry -------------------------------------------------------------------------------------


def register_reward(name: str) -> Callable:
    """Class (or factory) decorator: makes `reward: {type: name, ...}` available in YAML (this process only).

    A thin wrapper over `rlft.registry.register("reward", name, factory)`; on Ray workers name the reward as
    "module:attr" instead, or register it in a module every worker imports.
    """

    def wrap(factory):
        if registry.target("reward", name) is not None:
            raise ValueError(f"a reward named {name!r} is built in ({registry.target('reward', name)}); choose another name")
        known = registry.resolve("reward", name) if name in registry.names("reward") else None
        if known is not None and known is not factory:
            raise ValueError(f"a reward named {name!r} is already registered ({known!r})")
        registry.register("reward", name, factory)
        if isinstance(factory, type):
            factory.name = name
        return factory

    return wrap


def registered_rewards() -> list[str]:
    """Names usable as `reward.type` (built-ins and run-time registrations)."""
    return registry.names("reward")


def resolve_reward(type_name: str) -> Callable[..., Reward]:
    """The factory behind a registry name or a "module:attribute" import path (`registry.resolve`)."""
    return registry.resolve("reward", type_name)


def build_reward(spec: dict[str, Any], path: str = "reward", **context: Any) -> Reward:
    """Builds a reward from its YAML mapping; `context` (e.g. model=...) is passed where the factory accepts it.

    A plain function whose signature is (x) becomes a `FunctionReward`; a class or factory is called with
    the remaining keys as keyword arguments, each checked against its signature.
    """
    if not isinstance(spec, dict) or "type" not in spec:
        raise ConfigError(f"{path} must be a mapping with a 'type' key (got {spec!r})")
    spec = pool_spec(spec)
    params = {k: v for k, v in spec.items() if k != "type"}
    try:
        factory = resolve_reward(spec["type"])
    except ValueError as err:
        raise ConfigError(f"{path}.type: {err}") from None
    if not isinstance(factory, type) and not params and _is_plain_reward_fn(factory):
        return FunctionReward(factory, name=spec["type"])
    if not isinstance(factory, type) and not params and _has_cond_parameter(factory):
        return FunctionReward(factory, name=spec["type"], conditional=True)  # r(x, cond)
    kwargs = check_kwargs(factory, params, path, context)
    out = factory(**kwargs)
    if isinstance(out, Reward):
        return out
    if callable(out):
        return FunctionReward(out, name=spec["type"])
    raise ConfigError(f"{path}.type {spec['type']!r} did not produce a reward (got {type(out).__name__})")


def pool_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """A mapping with `workers:` (served by Ray actors, `rlft.rewards.remote.RewardPool`) rewritten as
    {type: reward_pool, reward: <the mapping without the pool keys>, workers: M, ...}; others unchanged."""
    if not isinstance(spec, dict) or "workers" not in spec:
        return spec
    inner = {k: v for k, v in spec.items() if k not in POOL_KEYS}
    return {"type": POOL_TYPE, "reward": inner, **{k: spec[k] for k in POOL_KEYS if k in spec}}


def _is_plain_reward_fn(fn: Callable) -> bool:
    try:
        params = [p for p in inspect.signature(fn).parameters.values() if p.default is inspect.Parameter.empty]
    except (TypeError, ValueError):
        return False
    return len(params) == 1
