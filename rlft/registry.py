"""One lazy table from the names a YAML file uses to the code behind them.

    kind        name in YAML                  target ("module:attr", imported only when resolved)
    learner     learner.type                  a `rlft.learners.Learner` subclass with an `Options` dataclass
    reward      reward.type                   a `rlft.rewards.base.Reward` class or factory
    model       model.type                    a builder `(cfg, num_steps) -> DiffusionModel`
    divergence  divergence options            a factory `() -> rlft.divergences.FDivergence`
    sampler     guidance / sampler options    a sampler or guidance class

Importing this module imports nothing else of rlft (no side-effect registration): a name is turned into an
object by `resolve`, which imports its module then. A user's own component is named `"my_module:MyThing"`
(importable on every Ray worker) or registered at run time with `register`.

A new algorithm family adds one line to `_TABLE["learner"]`.
"""

from __future__ import annotations

import importlib
from typing import Any

KINDS = ("learner", "reward", "model", "divergence", "sampler")

_TABLE: dict[str, dict[str, str]] = {
    "learner": {
        "elegant": "rlft.control.elegant:ElegantLearner",
        "no_kl": "rlft.control.baselines:NoKLLearner",
        "truncation": "rlft.control.baselines:TruncationLearner",
        "random_k": "rlft.control.baselines:RandomKLearner",
        "adjoint_matching": "rlft.control.adjoint_matching:AdjointMatchingLearner",
        "smeme": "rlft.control.smeme:SMEMELearner",
        "ppo_kl": "rlft.rllib.ppo_kl:PPOKL",
        "fpg": "rlft.rllib.fpg:FPGLearnerAdapter",
        "grpo": "rlft.rllib.grpo:GRPO",
        "discriminator_guidance": "rlft.guidance.discriminator_guidance:DiscriminatorGuidanceLearner",
    },
    "reward": {
        "linear": "rlft.rewards.builtin:LinearReward",
        "quadratic": "rlft.rewards.builtin:QuadraticReward",
        "distance_to_mode": "rlft.rewards.builtin:DistanceToModeReward",
        "f_regularised": "rlft.rewards.f_regularised:f_regularised",
        "mlp_oracle": "rlft.tasks.oracle:MLPOracleReward",
        "digit_classifier": "rlft.tasks.digits:DigitClassifierReward",
        "tfbind8_exact": "rlft.tasks.tfbind8:TFBind8ExactReward",
        "tfbind8_learned": "rlft.tasks.tfbind8:TFBind8LearnedReward",
        "reward_pool": "rlft.rewards.remote:RewardPool",
        "http": "rlft.rewards.http:HTTPReward",
    },
    "model": {
        "gmm": "rlft.models.gmm:build_gmm_model",
        "scorenet": "rlft.models.scorenet:build_scorenet_model",
        "diffusers": "rlft.models.diffusers_chain:build_diffusers_model",
        "tfbind8": "rlft.tasks.tfbind8:build_tfbind8_model",
    },
    "divergence": {
        "kl": "rlft.divergences:kl",
        "reverse_kl": "rlft.divergences:kl",
        "forward_kl": "rlft.divergences:forward_kl",
        "chi2": "rlft.divergences:chi2",
        "js": "rlft.divergences:js",
        "hellinger": "rlft.divergences:hellinger",
    },
    "sampler": {
        "classifier": "rlft.guidance.classifier:ClassifierGuidance",
        "expected_reward": "rlft.guidance.classifier:ExpectedRewardGuidance",
        "restart": "rlft.guidance.restart:restart_sample",
        "discriminator": "rlft.guidance.discriminator_guidance:DiscriminatorGuidance",
    },
}

#: objects registered at run time (`register(kind, name, obj)`), looked up before the table
_OBJECTS: dict[str, dict[str, Any]] = {kind: {} for kind in KINDS}


class RegistryError(ValueError):
    """A name that is not in the table, or a target that cannot be imported."""


def _check_kind(kind: str) -> None:
    if kind not in _TABLE:
        raise RegistryError(f"registry kind {kind!r} is not one of {list(KINDS)}")


def names(kind: str) -> list[str]:
    """The names a YAML file may use for `kind` (built-ins and run-time registrations), sorted."""
    _check_kind(kind)
    return sorted(set(_TABLE[kind]) | set(_OBJECTS[kind]))


def target(kind: str, name: str) -> str | None:
    """The "module:attr" a built-in name points to (None for run-time registrations and unknown names)."""
    _check_kind(kind)
    return _TABLE[kind].get(name)


def register(kind: str, name: str, obj: Any) -> Any:
    """Makes `name` resolve to `obj` (an object, or a "module:attr" string imported lazily); returns `obj`.

    Registered objects live in this process only: on Ray workers name a "module:attr" instead, or register
    in a module every worker imports.
    """
    _check_kind(kind)
    if not isinstance(name, str) or not name:
        raise RegistryError(f"a {kind} name must be a non-empty string (got {name!r})")
    if isinstance(obj, str):
        _TABLE[kind][name] = obj
        _OBJECTS[kind].pop(name, None)
    else:
        _OBJECTS[kind][name] = obj
    return obj


def import_target(spec: str, what: str = "object") -> Any:
    """Imports "module:attr" (attr may be dotted); errors name the path and what to check."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise RegistryError(f"{what} {spec!r} must be written 'module:attr' (e.g. 'my_rewards:MyReward')")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise RegistryError(
            f"{what} {spec!r}: module {module_name!r} cannot be imported ({err}); it must be importable from the "
            "working directory or PYTHONPATH on the driver and on every Ray worker"
        ) from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise RegistryError(f"{what} {spec!r}: module {module_name!r} has no attribute {attr!r}") from None
    return obj


def resolve(kind: str, name: str) -> Any:
    """The object behind `name`: a run-time registration, a built-in (imported now), or "module:attr".

    Raises:
        RegistryError: listing the valid names when `name` is unknown.
    """
    _check_kind(kind)
    if not isinstance(name, str):
        raise RegistryError(f"{kind} type must be a string, one of {names(kind)} (got {name!r})")
    if name in _OBJECTS[kind]:
        return _OBJECTS[kind][name]
    if name in _TABLE[kind]:
        return import_target(_TABLE[kind][name], f"built-in {kind} {name!r} ->")
    if ":" in name:
        return import_target(name, f"{kind} type")
    raise RegistryError(f"{kind} type {name!r} is not known; choose one of {names(kind)} or name your own as 'module:attr'")
