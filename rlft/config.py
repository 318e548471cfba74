"""Task configuration: YAML -> typed, frozen, validated dataclasses.

A task (`tune_configs/*.yaml`, ISSUE contract):

    model:  {type: gmm, weights: [...], means: [[...], ...], stds: [...]}   # or scorenet / diffusers + path
    reward: {type: quadratic, center: [...], scale: 2.0}                    # or linear, any registered name,
                                                                            # or "module:Class" of your own
    alpha: 1.0
    num_steps: 100
    seed: 0
    learner: {type: NAME, ...}                                              # learners (later issues)

Unknown keys and wrong types are rejected with the dotted path of the key. A file may name a base file
with `base: other.yaml` (relative to itself) and override a few keys; mappings merge recursively.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

import yaml


#: most chain steps a task may ask for (beyond it the chain's tables alone would not fit in memory)
MAX_NUM_STEPS = 100_000


class ConfigError(ValueError):
    """A configuration value is missing, unknown, or of the wrong type; the message names its path."""


# -- generic checking -----------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (arg,) = typing.get_args(tp) or (Any,)
        return f"list of {_type_name(arg)}"
    if origin is dict:
        return "mapping"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def check_value(value: Any, tp: Any, path: str) -> Any:
    """Checks (and lightly coerces: int -> float) `value` against the annotation `tp`; returns the value."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{path} must be one of {list(choices)} (got {value!r})")
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        dataclass_args = [a for a in args if dataclasses.is_dataclass(a)]
        if dataclass_args and isinstance(value, dict):
            return _dispatch_union(value, dataclass_args, path)
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return check_value(value, arg, path)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{path} must be {_type_name(tp)} (got {value!r})")
    if origin is list:
        (arg,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path} must be a {_type_name(tp)} (got {value!r})")
        return [check_value(v, arg, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path} must be a mapping (got {value!r})")
        _, val_tp = typing.get_args(tp) or (str, Any)
        return {k: check_value(v, val_tp, f"{path}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path} must be a number (got {value!r})")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path} must be an integer (got {value!r})")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path} must be true or false (got {value!r})")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path} must be a string (got {value!r})")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{path} must be {_type_name(tp)} (got {value!r})")
    return value


def _dispatch_union(value: dict, options: list[type], path: str) -> Any:
    """Picks the dataclass whose `type` Literal matches value['type']."""
    by_type = {}
    for cls in options:
        hints = typing.get_type_hints(cls)
        for choice in typing.get_args(hints.get("type", Any)):
            by_type[choice] = cls
    kind = value.get("type")
    if kind not in by_type:
        raise ConfigError(f"{path}.type must be one of {sorted(by_type)} (got {kind!r})")
    return from_dict(by_type[kind], value, path)


def from_dict(cls: type, data: Any, path: str = "") -> Any:
    """Builds the frozen dataclass `cls` from a mapping, rejecting unknown keys and wrong types."""
    where = path or "config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping (got {data!r})")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = unknown[0]
        raise ConfigError(f"{_join(path, key)} is not a known key; valid keys here: {sorted(fields)}")
    kwargs = {}
    for name, f in fields.items():
        sub = _join(path, name)
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{sub} is required ({_type_name(hints[name])})")
            continue
        kwargs[name] = check_value(data[name], hints[name], sub)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"{where}: {err}") from None


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def check_kwargs(factory: Any, params: dict[str, Any], path: str, context: dict[str, Any] | None = None) -> dict:
    """Checks YAML keyword arguments against a callable's signature (names and annotated types).

    Parameters named in `context` (e.g. `model`) are filled from it, never from YAML.
    """
    context = context or {}
    target = factory.__init__ if isinstance(factory, type) else factory
    sig = inspect.signature(target)
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # annotations a user wrote that do not resolve: skip type checks
        hints = {}
    accepted = {n: p for n, p in sig.parameters.items() if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    takes_any = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    kwargs = {}
    for key, value in params.items():
        if key in context:
            raise ConfigError(f"{path}.{key} is filled in by rlft and cannot be set in the config")
        if key not in accepted and not takes_any:
            raise ConfigError(f"{path}.{key} is not a parameter of {getattr(factory, '__name__', factory)}; valid: {sorted(set(accepted) - set(context))}")
        kwargs[key] = check_value(value, hints[key], f"{path}.{key}") if key in hints else value
    for name, p in accepted.items():
        if name in context:
            kwargs[name] = context[name]
        elif name not in kwargs and p.default is inspect.Parameter.empty:
            raise ConfigError(f"{path}.{name} is required by {getattr(factory, '__name__', factory)}")
    return kwargs


# -- the task ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GMMModelConfig:
    """An analytic Gaussian mixture (the exact test bed)."""

    type: Literal["gmm"]
    weights: list[float]
    """Mixture weights, one per component; must sum to 1."""
    means: list[list[float]]
    """Component means, C lists of D numbers."""
    stds: Union[list[float], float]
    """Component standard deviations (isotropic), one per component or one shared number."""
    beta_min: float = 0.1
    """VP schedule beta at noise time 0."""
    beta_max: float = 20.0
    """VP schedule beta at noise time T."""

    def __post_init__(self) -> None:
        if len(self.means) == 0 or len({len(m) for m in self.means}) != 1:
            raise ConfigError(f"model.means must be C lists of the same length D (got {self.means!r})")
        if len(self.weights) != len(self.means):
            raise ConfigError(f"model.weights has {len(self.weights)} entries but model.means has {len(self.means)} components")
        if isinstance(self.stds, list) and len(self.stds) != len(self.means):
            raise ConfigError(f"model.stds has {len(self.stds)} entries but model.means has {len(self.means)} components")
        numbers = [*self.weights, *(self.stds if isinstance(self.stds, list) else [self.stds]), *sum(self.means, []),
                   self.beta_min, self.beta_max]
        if not all(math.isfinite(v) for v in numbers):
            raise ConfigError("model: weights, means, stds, beta_min and beta_max must be finite numbers (one is NaN or inf)")
        if any(w < 0 for w in self.weights) or abs(sum(self.weights) - 1.0) > 1e-6:
            raise ConfigError(f"model.weights must be >= 0 and sum to 1 (got {self.weights}, sum {sum(self.weights):.6g}); "
                              "divide each weight by their sum")
        stds = self.stds if isinstance(self.stds, list) else [self.stds]
        if any(not s > 0 for s in stds):
            raise ConfigError(f"model.stds must be > 0 (got {self.stds}); a standard deviation is a positive number")
        if not 0 < self.beta_min < self.beta_max:
            raise ConfigError(f"model.beta_min and beta_max must satisfy 0 < beta_min < beta_max (got {self.beta_min}, "
                              f"{self.beta_max}); the defaults are 0.1 and 20")


@dataclass(frozen=True)
class ScoreNetModelConfig:
    """A small score network pretrained with `rlft pretrain` and saved in a directory."""

    type: Literal["scorenet"]
    path: str
    """Directory written by `rlft pretrain` (config.json + model.safetensors)."""


@dataclass(frozen=True)
class DiffusersModelConfig:
    """A diffusers UNet2DModel / UNet2DConditionModel with a DDPM or DDIM (eta > 0) scheduler."""

    type: Literal["diffusers"]
    path: str
    """Local directory (or hub id where the network allows) holding `unet/` and `scheduler/` subfolders."""
    scheduler: Literal["ddpm", "ddim"] = "ddpm"
    """Which scheduler's transition the chain uses."""
    eta: float = 1.0
    """DDIM stochasticity (must be > 0: the chain needs Gaussian transitions)."""
    subfolder_unet: str = "unet"
    """Subfolder of `path` with the UNet."""
    subfolder_scheduler: str = "scheduler"
    """Subfolder of `path` with the scheduler config."""
    cond_seq_len: int = 77
    """UNet2DConditionModel: tokens of encoder_hidden_states (a task's embedded prompts are flat, length x dim)."""


@dataclass(frozen=True)
class TFBind8ModelConfig:
    """The TFBind8 sequence diffusion (8x4 one-hot DNA), trained on first use into a cache (`rlft.tasks.tfbind8`)."""

    type: Literal["tfbind8"]
    cache_dir: Union[str, None] = None
    """Cache root (default $RLFT_CACHE, else ~/.cache/rlft)."""
    pretrain_steps: int = 4000
    """Denoising-score-matching steps when the model is built."""
    hidden: int = 64
    """Transformer width of the score network."""
    depth: int = 1
    """Transformer layers of the score network."""


ModelConfig = Union[GMMModelConfig, ScoreNetModelConfig, DiffusersModelConfig, TFBind8ModelConfig]

#: the model config classes by their `type`
MODEL_CONFIGS: dict[str, type] = {
    typing.get_args(typing.get_type_hints(cls)["type"])[0]: cls for cls in typing.get_args(ModelConfig)
}


def model_config_to_dict(cfg: ModelConfig) -> dict[str, Any]:
    """The typed model config as a plain JSON/YAML-able mapping (with its `type`); inverse of
    `model_config_from_dict`. This is what crosses a process boundary (Ray workers, RLlib modules, checkpoints)."""
    if not any(isinstance(cfg, cls) for cls in MODEL_CONFIGS.values()):
        raise ConfigError(f"model config must be one of {sorted(c.__name__ for c in MODEL_CONFIGS.values())} (got {cfg!r})")
    return dataclasses.asdict(cfg)


def model_config_from_dict(data: dict[str, Any] | ModelConfig, path: str = "model") -> ModelConfig:
    """Builds the typed model config a mapping describes, dispatching on its `type` (an already typed config
    is returned as is). Errors name the key under `path`, e.g. `model.type must be one of [...]`."""
    if any(isinstance(data, cls) for cls in MODEL_CONFIGS.values()):
        return data  # type: ignore[return-value]
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must be a mapping with a `type` (one of {sorted(MODEL_CONFIGS)}) (got {data!r})")
    return check_value(data, ModelConfig, path)


@dataclass(frozen=True)
class TaskConfig:
    """One fine-tuning task: a pretrained model, a reward, and the KL weight alpha."""

    model: ModelConfig
    """The pretrained diffusion model."""
    reward: dict[str, Any] | None = None
    """The reward: {type: NAME or "module:attr", **constructor arguments}; None only for a learner that needs none
    (its class says `needs_reward = False`, e.g. smeme; checked by `rlft.learners.check_reward_needed`)."""
    alpha: float = 1.0
    """KL weight alpha > 0 of the entropy-regularised objective (alpha = 0 only with learner no_kl)."""
    num_steps: int = 100
    """K, the number of chain steps."""
    seed: int = 0
    """Seed of every random draw in the run."""
    learner: dict[str, Any] | None = None
    """The learner: {type: NAME, ...} (learner-specific keys are checked by the learner)."""
    run: dict[str, Any] | None = None
    """How `rlft train` / `rlft sweep` run it: iterations, evaluation, checkpoints, resources, storage
    (checked by `rlft.run_config.RunConfig`)."""
    sweep: dict[str, Any] | None = None
    """Grid for `rlft sweep`: {dotted.key: [values, ...]}, e.g. {alpha: [0.1, 0.3, 1.0]}."""
    conditions: dict[str, Any] | None = None
    """A conditional task's conditions {train: [...], eval: [...]} (parsed by `rlft.conditions.parse_conditions`);
    None = unconditional."""

    def __post_init__(self) -> None:
        # alpha = 0 is a learner's call (one that keeps the KL term rejects it when it is built: ELEGANT's
        # kl_penalty); without a learner it is an error here
        if not math.isfinite(self.alpha):
            raise ConfigError(f"alpha must be a finite number > 0 (got {self.alpha}); e.g. alpha: 1.0")
        if self.alpha < 0 or (self.alpha == 0 and not self.learner):
            raise ConfigError(f"alpha must be > 0 (got {self.alpha}); use alpha=0 only with learner type 'no_kl'")
        if not 1 <= self.num_steps <= MAX_NUM_STEPS:
            rule = ">= 1" if self.num_steps < 1 else f"<= {MAX_NUM_STEPS}"
            raise ConfigError(f"num_steps must be {rule} (got {self.num_steps}); chains use 10 to 1000 steps, e.g. num_steps: 100")
        if self.reward is not None and "type" not in self.reward:
            raise ConfigError("reward.type is required (e.g. quadratic, linear, or 'module:Class')")


def _merge(base: dict, override: dict) -> dict:
    """Recursive merge; a mapping whose `type` changes replaces the base mapping whole (its keys differ)."""
    out = dict(base)
    for k, v in override.items():
        old = out.get(k)
        same_kind = isinstance(old, dict) and isinstance(v, dict) and v.get("type", old.get("type")) == old.get("type")
        out[k] = _merge(old, v) if same_kind else v
    return out


def load_yaml(path: str | os.PathLike, _chain: tuple[Path, ...] = ()) -> dict:
    """Reads a YAML file, following `base:` (relative to the file) and merging overrides."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"config {str(p)!r} is a directory; give a YAML file, e.g. tune_configs/gmm_elegant.yaml")
    if not p.is_file():
        where = f" (named by `base:` in {str(_chain[-1])!r})" if _chain else ""
        raise ConfigError(f"config file {str(p)!r} does not exist{where}; check the path (relative to {os.getcwd()})")
    if p.resolve() in _chain:
        loop = " -> ".join(str(c) for c in (*_chain, p.resolve()))
        raise ConfigError(f"base: loop: {loop}; a file may not be its own base, directly or through others: "
                          "remove one `base:` line")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML; fix it at the line shown: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping at the top level (model:, reward:, alpha:, ...)")
    base = data.pop("base", None)
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"base in {str(p)!r} must be a file name (got {base!r}), e.g. base: base_gmm.yaml")
        data = _merge(load_yaml(p.parent / base, (*_chain, p.resolve())), data)
    return data


def task_from_dict(data: dict) -> TaskConfig:
    """Validates a task mapping (extra top-level sections used by runners are removed first)."""
    return from_dict(TaskConfig, data)


def load_task(path: str | os.PathLike, overrides: dict | None = None) -> TaskConfig:
    """Reads and validates a task YAML file."""
    data = load_yaml(path)
    if overrides:
        data = _merge(data, overrides)
    return task_from_dict(data)


#: The embedded default task of `rlft demo`: a 2-D, 4-component mixture with a quadratic reward.
DEFAULT_TASK: dict[str, Any] = {
    "model": {
        "type": "gmm",
        "weights": [0.25, 0.25, 0.25, 0.25],
        "means": [[2.0, 2.0], [-2.0, 2.0], [2.0, -2.0], [-2.0, -2.0]],
        "stds": [0.4, 0.4, 0.4, 0.4],
    },
    "reward": {"type": "quadratic", "center": [1.0, 1.5], "scale": 1.0},
    "alpha": 1.0,
    "num_steps": 100,
    "seed": 0,
}
